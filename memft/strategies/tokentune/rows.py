"""TokenTune's work on the selected rows: choosing them, the layers' arguments for them, and their loss."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from memft.data.batching import model_inputs
from memft.models.blocks import gather_rows, unwrap
from memft.registry import LossOutput, at_least_float32
from memft.train.chunked_loss import head_loss, linear_cross_entropy, linear_head


def select_positions(attention_mask: torch.Tensor, *, tokens: int | None, fraction: float | None,
                     always: list[int], generator: torch.Generator,
                     extra: torch.Tensor | None = None) -> torch.Tensor:
    """Choose, per sequence, the positions that carry gradients.

    Args:
        attention_mask: (B, T), 1 at real tokens.
        tokens / fraction: how many of a sequence's n real tokens: `min(tokens, n)` or `ceil(fraction * n)`.
        always: positions always chosen, in the real-token part (negative counts from its end).
        extra: (B,) one more position per sequence to always choose (e.g. the token a classifier pools).

    Returns:
        (B, k) long, sorted per row; uniform without replacement among the real tokens beyond the
        forced ones. Rows needing fewer than k (the batch maximum) are filled with padding positions
        first, then with more real tokens: extra rows are harmless (masked, no loss) and keep the
        batch rectangular.
    """
    rows = []
    for b in range(attention_mask.size(0)):
        real = attention_mask[b].nonzero().flatten().cpu()
        n = real.numel()
        forced = {int(real[0]), int(real[-1])} | {int(real[i]) for i in always if -n <= i < n}
        if extra is not None:
            forced.add(int(extra[b]))
        want = min(tokens, n) if tokens is not None else math.ceil(fraction * n)
        rest = torch.tensor([int(p) for p in real if int(p) not in forced], dtype=torch.long)
        pick = rest[torch.randperm(rest.numel(), generator=generator)[:max(0, want - len(forced))]]
        rows.append((sorted(forced | set(pick.tolist())), real))
    k = max(len(chosen) for chosen, _ in rows)
    out = torch.empty(len(rows), k, dtype=torch.long)
    for b, (chosen, real) in enumerate(rows):
        taken = set(chosen)
        pads = [p for p in range(attention_mask.size(1)) if p not in taken and not attention_mask[b, p]]
        more = [int(p) for p in real if int(p) not in taken]
        out[b] = torch.tensor(sorted(chosen + (pads + more)[:k - len(chosen)]))
    return out.to(attention_mask.device)


def selected_loss(model: nn.Module, batch: dict, positions: torch.Tensor) -> LossOutput:
    """The cross-entropy of the next tokens at `positions` (B, k) only (`loss_on: selected`)."""
    inputs = model_inputs(batch)
    targets = next_labels(batch["labels"]).gather(1, positions)
    # the final norm and the LM head see the selected rows only: no full (B, T, vocab) logits. The whole model's
    # forward runs (not its decoder alone), so wrappers of the model (FSDP) see the loss as its output.
    norm = unwrap(model).get_decoder().norm
    hook = norm.register_forward_pre_hook(lambda m, args: (gather_rows(args[0], positions),))
    try:
        if (head := linear_head(unwrap(model))) is not None:  # not even the (B, k, vocab) logits
            return LossOutput(*head_loss(model, head, inputs, lambda hidden: linear_cross_entropy(hidden, head,
                                                                                                   targets)))
        logits = model(**inputs).logits  # (B, k, vocab)
    finally:
        hook.remove()
    loss_sum = F.cross_entropy(at_least_float32(logits).flatten(0, 1), targets.flatten(), ignore_index=-100,
                               reduction="sum")
    return LossOutput(loss_sum, int((targets != -100).sum()))


def next_labels(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels of the token each position predicts (-100 after the last)."""
    return F.pad(labels[:, 1:], (0, 1), value=-100)


def is_mask(arg) -> bool:
    return isinstance(arg, torch.Tensor) and arg.dim() == 4


def row_kwargs(kwargs: dict, positions: torch.Tensor) -> dict:
    """The layer's keyword arguments for a call on the selected rows only."""
    out = dict(kwargs)
    if "attention_mask" in out:
        out["attention_mask"] = None  # the row attention builds its mask from the original positions
    if out.get("position_embeddings") is not None:
        out["position_embeddings"] = tuple(gather_rows(t, positions) for t in out["position_embeddings"])
    if isinstance(out.get("position_ids"), torch.Tensor):
        out["position_ids"] = gather_rows(out["position_ids"][..., None], positions)[..., 0]
    if "cache_position" in out:
        out["cache_position"] = None
    return out
