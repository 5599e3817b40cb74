"""`lora` and `qlora`: low-rank adapters through peft, on a full-precision or a 4-bit NF4 base.

LoRA (Hu et al. 2021) freezes the base and learns `W + (alpha / r) * B @ A` on the target layers.
QLoRA (Dettmers et al. 2023) does the same on a base whose `nn.Linear` weights are stored in 4-bit
NormalFloat through bitsandbytes, computing in `compute_dtype`.

Mixture-of-Experts models in transformers 5 keep their experts as fused 3-D parameters
(`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`), not `nn.Linear`: `all-linear` adapts the
attention, the router and any shared expert, but not the routed experts. `target_experts: true`
adds adapters on the fused expert weights through peft's `target_parameters`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from memft.registry import BuildContext, Strategy, StrategyParams, register

EXPERT_PARAMETERS = ("experts.gate_up_proj", "experts.down_proj")


class LoraParams(StrategyParams):
    r: int = Field(default=8, ge=1)
    """Rank of the update `B @ A`."""
    alpha: float = Field(default=16.0, gt=0)
    """Scale: the update is multiplied by `alpha / r` (or `alpha / sqrt(r)` with `rslora`)."""
    dropout: float = Field(default=0.0, ge=0, lt=1)
    """Dropout on the adapter's input."""
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    """`all-linear` (every linear layer but the output head) or module-name suffixes, e.g. `[q_proj, v_proj]`."""
    target_experts: bool = False
    """MoE only: also adapt the fused expert weights (`experts.gate_up_proj`, `experts.down_proj`) via peft `target_parameters`."""
    rslora: bool = False
    """Rank-stabilised scaling `alpha / sqrt(r)` (Kalajdzievski 2023)."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases train alongside the adapters."""


class QLoraParams(LoraParams):
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type of the frozen base weights."""
    double_quant: bool = True
    """Quantize the quantization constants too (saves ~0.4 bits per weight)."""
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype of the de-quantized matmuls; `auto` follows `model.dtype` (float32 on the CPU)."""


def _lora_config(params: LoraParams, ctx: BuildContext):
    from peft import LoraConfig, TaskType

    seq_cls = ctx.recipe.model.task == "sequence_classification"
    return LoraConfig(
        r=params.r,
        lora_alpha=params.alpha,
        lora_dropout=params.dropout,
        target_modules=params.target_modules,
        target_parameters=list(EXPERT_PARAMETERS) if params.target_experts and ctx.is_moe else None,
        use_rslora=params.rslora,
        bias=params.bias,
        # SEQ_CLS makes peft train (and save) the new classification head as well
        task_type=TaskType.SEQ_CLS if seq_cls else TaskType.CAUSAL_LM,
    )


def _attach(model: nn.Module, params: LoraParams, ctx: BuildContext, label: str) -> nn.Module:
    from peft import get_peft_model

    peft_model = get_peft_model(model, _lora_config(params, ctx))
    adapted = sorted({n.split(".lora_A")[0] for n, _ in peft_model.named_parameters() if ".lora_A." in n})
    ctx.notes.append(f"{label}: adapters on {len(adapted)} weights (r={params.r}, alpha={params.alpha:g})")
    if ctx.is_moe:
        if params.target_experts:
            ctx.notes.append(f"{label}: routed expert weights ARE adapted (target_experts: true)")
        else:
            ctx.notes.append(
                f"{label}: routed expert weights are NOT adapted (fused 3-D parameters, missed by "
                "`all-linear`); set `target_experts: true` to adapt them"
            )
    return peft_model


@register
class Lora(Strategy):
    name = "lora"
    Params = LoraParams
    order = 20
    summary = "LoRA adapters (peft) on a frozen base; `target_experts` reaches fused MoE experts."
    trains_base = True
    conflicts = {"qlora": "`qlora` already adds LoRA adapters (on a 4-bit base); list only one of them."}

    def apply(self, model: nn.Module, ctx: BuildContext) -> nn.Module:
        return _attach(model, self.params, ctx, "lora")


@register
class QLora(Strategy):
    name = "qlora"
    Params = QLoraParams
    order = 20
    summary = "QLoRA: LoRA adapters on a 4-bit NF4 base (bitsandbytes; runs on CPU and CUDA)."
    trains_base = True

    def check(self, recipe) -> list[str]:
        if recipe.model.dtype == "float64":
            return ["bitsandbytes 4-bit layers do not compute in float64; use `model.dtype: float32` with `qlora`"]
        return []

    def load_kwargs(self, recipe) -> dict:
        import torch
        from transformers import BitsAndBytesConfig

        compute = recipe.model.dtype if self.params.compute_dtype == "auto" else self.params.compute_dtype
        return {
            "quantization_config": BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=self.params.quant_type,
                bnb_4bit_use_double_quant=self.params.double_quant,
                bnb_4bit_compute_dtype=getattr(torch, compute),
            )
        }

    def apply(self, model: nn.Module, ctx: BuildContext) -> nn.Module:
        from peft import prepare_model_for_kbit_training

        # freezes the base and upcasts norms for stable training; checkpointing is the loop's job
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return _attach(model, self.params, ctx, "qlora")
