"""`full`: full-parameter fine-tuning, the plain-backprop baseline every other strategy is compared to."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from pydantic import Field

from memft.registry import BuildContext, Patterns, Strategy, StrategyParams, register

if TYPE_CHECKING:
    from torch import nn


class FullParams(StrategyParams):
    freeze: Patterns = Field(default_factory=list)
    """Regular expressions; parameters whose name matches one stay frozen (e.g. `embed_tokens`)."""


@register
class Full(Strategy):
    name = "full"
    Params = FullParams
    order = 20
    summary = "Full-parameter fine-tuning: every weight learns (the plain-backprop baseline)."
    trains_base = True
    conflicts = {
        "lora": "`full` already trains every weight; use `lora` alone for adapters.",
        "qlora": "`qlora` freezes a 4-bit base; use `qlora` alone, or `full` on unquantized weights.",
    }

    def apply(self, model: nn.Module, ctx: BuildContext) -> nn.Module:
        patterns = [re.compile(p) for p in self.params.freeze]
        frozen = 0
        for name, p in model.named_parameters():
            p.requires_grad_(not any(rx.search(name) for rx in patterns))
            frozen += 0 if p.requires_grad else p.numel()
        if patterns:
            ctx.notes.append(f"full: {frozen:,} parameters frozen by `freeze`")
        return model
