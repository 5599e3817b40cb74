"""`lora` and `qlora`: low-rank adapters on a frozen base, full precision or 4-bit NF4.

LoRA (Hu et al. 2021) freezes the base and learns `W + (alpha / r) * B @ A` on the target layers.
QLoRA (Dettmers et al. 2023) does the same on a base whose weights are stored in 4-bit NormalFloat
through bitsandbytes, computing in `compute_dtype`.

`nn.Linear` layers get peft's adapters. Mixture-of-Experts models in transformers 5 keep their routed
experts as fused 3-D parameters (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`), not `nn.Linear`;
peft's `target_parameters` LoRA on them saves a full delta weight per expert for backward. memft wraps
each fused experts module in its own `LoraExperts` instead (`memft/models/expert_lora.py`: per-expert
rank-r factors, no delta weight), and under QLoRA stores the fused experts in NF4 first
(`memft/models/nf4_experts.py`). peft never sees the experts or the router: `all-linear` is spelled out
on MoE models, `target_experts` decides the experts, `target_router` the router, and the plan reports
what the adapted model really covers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from memft.registry import BuildContext, Strategy, StrategyParams, register

if TYPE_CHECKING:
    import torch
    from torch import nn

HEADS = ("lm_head", "score", "classifier")
"""Output / classification heads: never quantized (a new head must train in full precision)."""
SHARED_EXPERT = "shared_expert"
"""Qwen2-MoE's always-on expert (`mlp.shared_expert.{gate,up,down}_proj`) and its gate (`mlp.shared_expert_gate`):
plain `nn.Linear` layers, which `target_experts` includes or leaves out with the routed experts."""


MAX_RANK = 65536
"""A schema bound on `r`, above any layer width; the model's own widths bound it tighter when it is built."""


class LoraParams(StrategyParams):
    model_config = ConfigDict(allow_inf_nan=False)  # an infinite `alpha` would make every update infinite

    r: int = Field(default=8, ge=1, le=MAX_RANK)
    """Rank of the update `B @ A`; at most the smaller side (min(in, out)) of the widest adapted layer."""
    alpha: float = Field(default=16.0, gt=0)
    """Scale: the update is multiplied by `alpha / r` (or `alpha / sqrt(r)` with `rslora`)."""
    dropout: float = Field(default=0.0, ge=0, lt=1)
    """Dropout on the adapter's input."""
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    """`all-linear` (every linear layer but the output head) or module-name suffixes, e.g. `[q_proj, v_proj]`;
    each suffix must name at least one linear layer of the model."""
    target_experts: bool | Literal["shared"] | None = None
    """MoE only. true: memft's expert LoRA on every routed expert (`LoraExperts`, no delta weight) plus the
    shared expert's linear layers (Qwen2-MoE); false: neither (only the other `target_modules`); `shared`: the
    shared expert's linear layers only, routed experts frozen; null: as true with `target_modules: all-linear`,
    else as false."""
    target_router: bool = False
    """MoE only: train each router's weight in full (it is small, experts x hidden); frozen by default."""
    rslora: bool = False
    """Rank-stabilised scaling `alpha / sqrt(r)` (Kalajdzievski 2023)."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases train alongside the adapters."""

    @field_validator("target_modules")
    @classmethod
    def _no_blank_names(cls, value):
        if isinstance(value, list) and any(not name.strip() for name in value):
            raise ValueError("a module name must not be empty")
        return value

    @model_validator(mode="after")
    def _adapts_something(self) -> LoraParams:
        if self.target_modules == [] and not self.target_experts and not self.target_router:
            raise ValueError("`target_modules: []` adapts nothing; name module suffixes such as `[q_proj, v_proj]`, "
                             "use `all-linear`, or (MoE, experts only) set `target_experts: true`")
        return self


class QLoraParams(LoraParams):
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type of the frozen base weights."""
    double_quant: bool = True
    """Quantize the quantization constants too (saves ~0.4 bits per weight)."""
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype of the de-quantized matmuls; `auto` follows `model.dtype` (float32 on the CPU)."""


@register
class Lora(Strategy):
    name = "lora"
    Params = LoraParams
    order = 20
    summary = "LoRA adapters on a frozen base (peft on linear layers, memft's expert LoRA on fused MoE experts)."
    trains_base = True
    conflicts = {"qlora": "`qlora` already adds LoRA adapters (on a 4-bit base); list only one of them."}

    def apply(self, model: nn.Module, ctx: BuildContext) -> nn.Module:
        from memft.strategies.lora.attach import attach

        return attach(model, self.params, ctx, "lora")


@register
class QLora(Strategy):
    name = "qlora"
    Params = QLoraParams
    order = 20
    summary = "QLoRA: LoRA adapters on a 4-bit NF4 base, fused MoE experts included (bitsandbytes; CPU and CUDA)."
    trains_base = True

    def check(self, recipe) -> list[str]:
        problems = []
        if recipe.model.dtype == "float64":
            problems.append("bitsandbytes 4-bit layers do not compute in float64; use `model.dtype: float32` with "
                            "`qlora`")
        if any(s.name == "meft" and (s.params or {}).get("key_init") == "ffn" for s in recipe.strategies):
            problems.append("meft `key_init: ffn` samples its keys from the FFN's full-precision weights, which "
                            "`qlora` stores in 4 bits; use `key_init: random` with `qlora`")
        return problems

    def load_kwargs(self, recipe) -> dict:
        from transformers import BitsAndBytesConfig

        return {
            "quantization_config": BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=self.params.quant_type,
                bnb_4bit_use_double_quant=self.params.double_quant,
                bnb_4bit_compute_dtype=self.compute_dtype(recipe),
                llm_int8_skip_modules=list(HEADS),  # transformers' own default misses BERT's `classifier`
            )
        }

    def compute_dtype(self, recipe) -> torch.dtype:
        import torch

        return getattr(torch, recipe.model.dtype if self.params.compute_dtype == "auto" else self.params.compute_dtype)

    def apply(self, model: nn.Module, ctx: BuildContext) -> nn.Module:
        from memft.models.nf4_experts import quantize_experts
        from memft.strategies.lora.attach import attach

        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                # bitsandbytes >= 0.50.2 repacks 4-bit weights in place for its AVX512-BF16 CPU kernel on the first
                # no-grad forward in eval mode, and asserts on widths that are not multiples of 32: keep one layout
                # (and one numeric path) for training and evaluation, as on CPUs without that instruction set
                module.support_avx512bf16_for_cpu = False
        p = self.params

        def store_experts(m: nn.Module) -> None:
            # bitsandbytes quantized the nn.Linear layers (the shared expert's too) while loading; the fused experts
            # it cannot see go to NF4 here, before `LoraExperts` wraps them and reads them one expert at a time
            quantize_experts(m, p.quant_type, p.double_quant, self.compute_dtype(ctx.recipe))

        return attach(model, p, ctx, "qlora", store_experts)
