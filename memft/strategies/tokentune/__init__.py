"""`tokentune`: only a random subset of tokens carries gradients; the forward stays exact.

Simoulin et al., "Memory-Efficient Fine-Tuning of Transformers via Token Selection" (EMNLP 2024).
Per sequence and step, k tokens are selected (the first and last always). A packed row (`data.pack: true`)
is one sequence here: the k tokens are drawn among all the row's real tokens, the first and last of the row
forced, not per example (the gradients are still exact: the reference's under the same selection).
In every layer:

1. all rows run under `torch.no_grad()`: this gives the unselected rows' outputs exactly, and every
   row's (post-rotary) keys and values, and saves nothing for backward;
2. the selected rows run again with gradients, their queries attending over all keys and values
   (the unselected ones as constants) with the original positions and causal / padding mask, and in a
   packed row (`data.pack: true`) only within their own example
   (`memft.models.blocks`: one implementation for every Llama-family decoder and BERT encoder);
3. the selected rows are scattered into the no-grad output (out of place: only indices are saved).

So only the selected rows' activations (and each layer's keys/values, which the selected queries'
gradients need) are cached: activation memory shrinks with the selected fraction. The gradients
are those of the dense model in which every unselected row is detached where it enters each layer
(its hidden state, keys and values) — the naive reference the tests compare against.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from memft.registry import BuildContext, LossOutput, Strategy, StrategyParams, register

if TYPE_CHECKING:
    import torch
    from torch import nn

POSITIONS_KEY = "tokentune_positions"
"""Batch key holding the selected positions, (B, k) long, set by `on_step_start`."""


class TokenTuneParams(StrategyParams):
    tokens: int | None = Field(default=None, ge=1)
    """Tokens per sequence that carry gradients (a count). Give this or `fraction`."""
    fraction: float | None = Field(default=None, gt=0, le=1)
    """Share of each sequence's non-padding tokens that carry gradients (rounded up). Default 0.25."""
    loss_on: Literal["selected", "all"] = "selected"
    """`selected` (the paper's): cross-entropy on the selected positions only, LM head applied to those rows.
    `all`: every position's loss; unselected positions then only train the final norm and the LM head."""
    always_include: list[int] = Field(default_factory=list)
    """More positions selected every step, counted in the non-padding part (negative: from its end).
    The first and last non-padding positions are always selected."""

    @model_validator(mode="after")
    def _count_or_fraction(self) -> TokenTuneParams:
        if self.tokens is not None and self.fraction is not None:
            raise ValueError("give `tokens` or `fraction`, not both")
        if self.tokens is None and self.fraction is None:
            self.fraction = 0.25
        return self


@register
class TokenTune(Strategy):
    name = "tokentune"
    Params = TokenTuneParams
    order = 40
    summary = "TokenTune: gradients through a random subset of tokens; exact forward, fewer cached activations."

    def check(self, recipe) -> list[str]:
        if recipe.train.gradient_checkpointing:
            return ["`tokentune` already keeps no activations for unselected tokens and re-runs layers its own way; "
                    "turn `train.gradient_checkpointing` off"]
        return []

    def apply(self, model: nn.Module, ctx: BuildContext) -> nn.Module:
        from memft.models.blocks import enable_row_attention, is_encoder, layer_stack, unwrap

        self.seed = ctx.recipe.train.seed
        self.task = ctx.recipe.model.task
        self.encoder = is_encoder(model)
        self.pad_id = getattr(unwrap(model).config, "pad_token_id", None)
        self._active: tuple[torch.Tensor, torch.Tensor] | None = None  # (positions, key_valid) during a forward
        self._segments: torch.Tensor | None = None  # packed batches: `segment_ids` of the forward's rows
        self._step, self._micro = -1, 0
        states = enable_row_attention(model)
        self._shared = states[0].shared
        for layer, state in zip(layer_stack(model), states):
            layer.forward = functools.partial(self._layer_forward, layer.forward, state)
        p = self.params
        amount = f"{p.tokens} tokens" if p.tokens is not None else f"{p.fraction:.0%} of the tokens"
        ctx.notes.append(f"tokentune: {amount} per sequence carry gradients; loss on {p.loss_on} positions")
        return model

    # ------------------------------------------------------------------ selection
    def on_step_start(self, step: int, batch: dict) -> dict:
        import torch

        from memft.strategies.tokentune.rows import select_positions

        if step != self._step:
            self._step, self._micro = step, 0
        # seeded by (seed, step, micro-batch): a resumed run picks the same tokens
        generator = torch.Generator().manual_seed(((self.seed * 1_000_003) + step) * 1009 + self._micro)
        self._micro += 1
        extra = None
        if self.task == "sequence_classification" and not self.encoder and self.pad_id is not None:
            # a decoder classifier pools the last token that is not the pad id: it must carry gradients
            ids = batch["input_ids"]
            extra = (torch.arange(ids.size(1), device=ids.device) * (ids != self.pad_id)).argmax(-1)
        positions = select_positions(batch["attention_mask"], tokens=self.params.tokens,
                                     fraction=self.params.fraction, always=self.params.always_include,
                                     generator=generator, extra=extra)
        return {**batch, POSITIONS_KEY: positions}

    def grad_tokens(self, batch: dict) -> int | None:
        return batch[POSITIONS_KEY].numel() if POSITIONS_KEY in batch else None

    def vary_for_profile(self, rng) -> None:
        self.params = self.params.model_copy(update={"tokens": None, "fraction": rng.uniform(0.05, 0.5)})

    def _selected_loss(self) -> bool:
        return self.task == "causal_lm" and self.params.loss_on == "selected"

    def count_targets(self, batch: dict) -> int | None:
        if POSITIONS_KEY not in batch or not self._selected_loss():
            return None
        from memft.strategies.tokentune.rows import next_labels

        return int((next_labels(batch["labels"]).gather(1, batch[POSITIONS_KEY]) != -100).sum())

    def router_logits(self, calls: list[torch.Tensor], batch: dict) -> torch.Tensor | None:
        positions = batch.get(POSITIONS_KEY)
        if positions is None or len(calls) != 2:
            return None
        from memft.models.blocks import scatter_rows

        # every row without autograd, then the selected rows with it: the selected rows carry the gradient
        full, rows = calls
        B, T = batch["attention_mask"].shape
        merged = scatter_rows(full.detach().view(B, T, -1), positions, rows.view(B, positions.size(1), -1))
        return merged.view(B * T, -1)

    # ------------------------------------------------------------------ forward
    def loss(self, model: nn.Module, batch: dict) -> LossOutput | None:
        positions = batch.get(POSITIONS_KEY)
        if positions is None:
            return None
        from memft.data.batching import segment_ids
        from memft.strategies.tokentune.rows import selected_loss

        plain = {k: v for k, v in batch.items() if k != POSITIONS_KEY}
        # a packed row's examples are segments: the selected rows' queries attend within their own example
        segments = segment_ids(batch["position_ids"]) if "position_ids" in batch else None
        self._active, self._segments = (positions, batch["attention_mask"].bool()), segments
        try:
            if not self._selected_loss():
                from memft.train.loop import default_loss

                return default_loss(model, plain, self.task)
            return selected_loss(model, plain, positions)
        finally:
            self._active, self._segments = None, None
            self._shared.clear()  # the rows' mask of this forward

    def _layer_forward(self, original, state, hidden_states, *args, **kwargs):
        if self._active is None:  # evaluation, generation: the plain layer
            return original(hidden_states, *args, **kwargs)
        import torch

        from memft.models.blocks import gather_rows, scatter_rows
        from memft.strategies.tokentune.rows import is_mask, row_kwargs

        positions, key_valid = self._active
        try:
            # 1) every row without grad: the unselected rows' exact outputs and all keys / values
            state.mode = "capture"
            with torch.no_grad():
                full = original(hidden_states.detach(), *args, **kwargs)
            # 2) the selected rows with grad, attending over every key under the original mask
            state.mode, state.positions, state.key_valid, state.causal = "rows", positions, key_valid, not self.encoder
            state.segments = self._segments
            row_args = [None if is_mask(a) else a for a in args]
            rows = original(gather_rows(hidden_states, positions), *row_args, **row_kwargs(kwargs, positions))
        finally:
            state.mode, state.keys, state.values, state.segments = None, None, None, None
        if isinstance(full, tuple):
            return (scatter_rows(full[0], positions, rows[0]), *full[1:])
        return scatter_rows(full, positions, rows)
