"""Hand-off of a batch layout from the multimodal splice to the LM forward of the same call.

Upstream's `prepare_inputs_labels_for_multimodal` and `LlamaModel.forward` are two separate
calls; between them, `generate()` may copy or expand the embeddings (sampling, beams,
several sequences). A layout therefore belongs to a *call scope*: the LLaVA model's
`forward` or `generate`, in one thread. The splice puts the layout into the innermost open
scope; the next prefill of that model inside the scope takes it, whatever copy of the
embeddings it runs on; the scope drops whatever is left when its call ends, whether the
call returned or raised. Threads never see each other's scopes.

A splice outside any scope (a user calling `prepare_inputs_labels_for_multimodal` directly,
then the language model) hands its layout to every forward on the very tensor it returned,
for as long as that tensor lives: the layout describes that tensor and nothing else.
"""
from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from typing import Optional

from .layout import BatchLayout

_local = threading.local()


class LayoutMismatch(RuntimeError):
    """A layout was prepared in this call, but its prefill ran on other embeddings."""


def _stack() -> list:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def _loose() -> dict:
    loose = getattr(_local, "loose", None)
    if loose is None:
        loose = _local.loose = {}  # id(embeds) -> (embeds ref, model ref, layout)
    return loose


class Scope:
    """One model call: the layouts spliced in it, what a `generate()` call asked for
    (`generation`, for the fast path), and what to release when it ends."""

    def __init__(self, generation: Optional[dict] = None):
        self.layouts: dict = {}
        self.generation = generation
        self.on_exit: list = []


@contextmanager
def call_scope(generation: Optional[dict] = None):
    """The scope of one model call (`forward` / `generate`) in this thread."""
    stack = _stack()
    scope = Scope(generation)
    stack.append(scope)
    try:
        yield scope
    finally:
        stack.remove(scope)
        for release in scope.on_exit:
            release()


def generation_scope() -> Optional[Scope]:
    """The innermost open `generate()` call of this thread, if any."""
    for scope in reversed(_stack()):
        if scope.generation is not None:
            return scope
    return None


def put(model, layout: BatchLayout, embeds) -> None:
    """Hand `layout` (of `embeds`, spliced for `model`) to the model's next prefill."""
    stack = _stack()
    if stack:
        stack[-1].layouts[id(model)] = (model, layout, tuple(embeds.shape))
    else:
        loose = _loose()
        for key in [k for k, (ref, _, _) in loose.items() if ref() is None]:
            del loose[key]
        loose[id(embeds)] = (weakref.ref(embeds), weakref.ref(model), layout)


def take(model, embeds) -> Optional[BatchLayout]:
    """The layout handed over for this prefill of `model` on `embeds`, or None.

    Inside a scope the layout is recognised by shape: the same batch, or each sample
    repeated in place (`repeat_interleave`, as generation expands it for beams and
    sequences). Any other prefill in the scope of a splice is an error, never a silent
    dense run."""
    for scope in reversed(_stack()):
        entry = scope.layouts.get(id(model))
        if entry is None or entry[0] is not model:
            continue
        del scope.layouts[id(model)]
        _, layout, shape = entry
        return _expanded(layout, shape, embeds)
    entry = None if embeds is None else _loose().get(id(embeds))
    if entry is not None and entry[0]() is embeds and entry[1]() is model:
        return entry[2]
    return None


def discard(model) -> None:
    """Drop what this thread's open calls hold for `model` (a splice whose forward runs upstream)."""
    for scope in _stack():
        scope.layouts.pop(id(model), None)


def _expanded(layout: BatchLayout, shape: tuple, embeds) -> BatchLayout:
    got = None if embeds is None else tuple(embeds.shape)
    if got == shape:
        return layout
    if got is not None and got[1:] == shape[1:] and got[0] % shape[0] == 0:
        return layout.repeat(got[0] // shape[0])
    raise LayoutMismatch(
        f"sparsevlm_patch: the images of this call were spliced into embeddings of shape {list(shape)}, "
        f"but the language model's prefill ran on {'no embeddings' if got is None else list(got)}: this "
        "way of calling the model is not supported with pruning; call sparsevlm_patch.disable(model) "
        "to run it dense")
