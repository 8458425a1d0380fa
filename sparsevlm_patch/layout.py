"""Layout of a spliced batch: where each sample's visual tokens and question text sit.

Upstream's `prepare_inputs_labels_for_multimodal` does not say where the visual tokens
landed. We learn it without re-implementing the splice: the hook passes a *probe* in
place of the labels (each text token labelled with its own column index), and upstream
moves the probe exactly as it moves labels: text tokens carry their index, visual
tokens and padding get IGNORE_INDEX. With the returned attention mask this gives the
whole layout, for any padding side, image count, anyres size or truncation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

IGNORE_INDEX = -100


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """Host tensor -> device without blocking the host (pinned, asynchronous copy)."""
    if torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


@dataclass
class SampleLayout:
    valid_count: int
    image_spans: List[Tuple[int, int]]  # (start, count) of each run of visual tokens
    question_span: Tuple[int, int]  # [start, end) of rater candidates (prompt text after the image)
    rater_fallback: bool = False  # no prompt text: the last visual token rates

    @property
    def visual_count(self) -> int:
        return sum(c for _, c in self.image_spans)


@dataclass
class BatchLayout:
    """Host-side description of one batch, plus the device masks the forward needs."""

    samples: List[SampleLayout]
    padding_side: Optional[str]
    length: int
    valid: torch.Tensor  # bool [B, L]
    visual: torch.Tensor  # bool [B, L]
    # Every sample's valid slots are a prefix (no pads, or pads only after the real tokens):
    # a causal pass serves, as no real token attends to a later slot.
    causal: bool = False

    @property
    def visual_counts(self) -> List[int]:
        return [s.visual_count for s in self.samples]

    def repeat(self, copies: int) -> "BatchLayout":
        """The layout of each sample repeated `copies` times in place (beams, sequences)."""
        return BatchLayout(
            samples=[s for s in self.samples for _ in range(copies)],
            padding_side=self.padding_side,
            length=self.length,
            valid=self.valid.repeat_interleave(copies, dim=0),
            visual=self.visual.repeat_interleave(copies, dim=0),
            causal=self.causal,
        )

    def padded_index(self, kind: str, device, width: int = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """[B, M] column indices of each sample's visual tokens or rater candidates
        (padded with 0) and their validity mask; M = the longest, or `width`."""
        rows = []
        for s in self.samples:
            if kind == "visual":
                rows.append([i for start, n in s.image_spans for i in range(start, start + n)])
            else:
                rows.append(list(range(*s.question_span)))
        width = width or max(1, max(len(r) for r in rows))
        index = torch.zeros(len(rows), width, dtype=torch.long)
        valid = torch.zeros(len(rows), width, dtype=torch.bool)
        for b, r in enumerate(rows):
            index[b, : len(r)] = torch.tensor(r, dtype=torch.long)
            valid[b, : len(r)] = True
        return to_device(index, device), to_device(valid, device)


def _runs(flags: List[bool]) -> List[Tuple[int, int]]:
    spans, start = [], None
    for i, f in enumerate(flags + [False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            spans.append((start, i - start))
            start = None
    return spans


def layout_from_probe(
    probe: torch.Tensor, valid: torch.Tensor, labels: Optional[torch.Tensor]
) -> BatchLayout:
    """Build the layout from upstream's relaid probe labels, its attention mask and the
    relaid real labels (None at inference). One host transfer per batch."""
    device = valid.device
    stacked = [probe, valid.long()] + ([labels] if labels is not None else [])
    host = torch.stack([t.to(torch.long) for t in stacked]).cpu()
    probe_h, valid_h = host[0], host[1].bool()
    labels_h = host[2] if labels is not None else None
    visual_h = valid_h & (probe_h == IGNORE_INDEX)

    samples, causal = [], True
    for b in range(probe_h.shape[0]):
        spans = _runs(visual_h[b].tolist())
        valid_pos = torch.nonzero(valid_h[b]).flatten().tolist()
        last_valid = valid_pos[-1] + 1 if valid_pos else 0
        causal = causal and last_valid == len(valid_pos)
        if spans:
            start = spans[-1][0] + spans[-1][1]
            end = last_valid
            if labels_h is not None:
                answers = torch.nonzero(labels_h[b, start:end] != IGNORE_INDEX).flatten()
                if len(answers):
                    end = start + int(answers[0])
            question = (start, max(start, end))
        else:
            question = (0, 0)
        fallback = bool(spans) and question[0] == question[1]
        if fallback:
            # No prompt text after the image (e.g. `--version plain`): the last visual token,
            # which sees the whole image and no answer, rates instead.
            last = spans[-1][0] + spans[-1][1] - 1
            question = (last, last + 1)
        samples.append(SampleLayout(len(valid_pos), spans, question, fallback))

    padding_side = None
    if any(s.valid_count < probe_h.shape[1] for s in samples):
        left = all(not valid_h[b, 0] or s.valid_count == probe_h.shape[1] for b, s in enumerate(samples))
        padding_side = "left" if left else "right"
    return BatchLayout(
        samples=samples,
        padding_side=padding_side,
        length=probe_h.shape[1],
        valid=to_device(valid_h, device),
        visual=to_device(visual_h, device),
        causal=causal,
    )
