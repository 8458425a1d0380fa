"""The language-model families the plugin prunes, and the check that refuses the others.

The plugin prunes by wrapping the forward of the LLaVA model's inner language model
(`get_model()`); a LLaVA whose LM is of another class would run dense in silence, so it is
refused instead. Classes are compared by name and module along the MRO, so nothing is
imported here (a family's codebase need not be installed) and `hooks.py` may import this
module. A new family is one row here plus its patch rows in `hooks.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .state import language_model, unwrap


@dataclass(frozen=True)
class Family:
    lm_class: str  # the language model whose forward the plugin wraps (it or a subclass)
    lm_module: str  # where `lm_class` is defined
    llava_class: str  # the LLaVA class that runs it (its splice and calls are the rows hooked)
    llava_module: str  # where `llava_class` is defined
    codebase: str  # the distribution that ships `llava_class`


FAMILIES = (
    Family("LlamaModel", "transformers.models.llama.modeling_llama", "LlavaLlamaForCausalLM",
           "llava.model.language_model.llava_llama", "llava-torch"),
    Family("MistralModel", "transformers.models.mistral.modeling_mistral", "LlavaMistralForCausalLM",
           "llava.model.language_model.llava_mistral", "llava-torch"),
    Family("Qwen2Model", "transformers.models.qwen2.modeling_qwen2", "LlavaQwenForCausalLM",
           "llavaction.model.language_model.llava_qwen", "LLaVA-NeXT (llavaction)"),
)


def _derives(cls, name: str, module: str) -> bool:
    return any((c.__name__, c.__module__) == (name, module) for c in cls.__mro__)


def family_of(model) -> Optional[Family]:
    """The supported family of `model`: its language model and its LLaVA class both the
    family's (another codebase's LLaVA class over the same LM has no hooked splice)."""
    for family in FAMILIES:
        if (_derives(type(language_model(model)), family.lm_class, family.lm_module)
                and _derives(type(unwrap(model)), family.llava_class, family.llava_module)):
            return family
    return None


def check_prunable(model, source: str, hint: str = "") -> None:
    """Raise ValueError if `model` is a LLaVA model whose language model the plugin cannot
    prune. `source` names what asked for pruning (an API call, a variable, a flag), `hint`
    how to run upstream instead. Models that are not LLaVA are left to the caller."""
    llava = unwrap(model)
    if not hasattr(llava, "get_vision_tower") or family_of(llava) is not None:
        return
    lm = type(language_model(llava))
    # The transformers class it derives from says more than LLaVA's subclass name.
    base = next((c for c in lm.__mro__ if c.__module__.startswith("transformers.models.")), lm)
    lm_name = lm.__name__ if base is lm else f"{lm.__name__} (subclass of {base.__module__}.{base.__name__})"
    supported = "; ".join(f"{f.lm_class} ({f.lm_module}), run by {f.llava_class} ({f.codebase})" for f in FAMILIES)
    raise ValueError(
        f"{source}: {type(llava).__module__}.{type(llava).__name__}'s language model is {lm_name}; "
        f"sparsevlm_patch cannot prune that pair (it would run dense). Supported language models: {supported}."
        + (f" {hint}" if hint else ""))
