"""`lora` and `qlora`: low-rank adapters through peft, on a full-precision or a 4-bit NF4 base.

LoRA (Hu et al. 2021) freezes the base and learns `W + (alpha / r) * B @ A` on the target layers.
QLoRA (Dettmers et al. 2023) does the same on a base whose `nn.Linear` weights are stored in 4-bit
NormalFloat through bitsandbytes, computing in `compute_dtype`.

Mixture-of-Experts models in transformers 5 keep their experts as fused 3-D parameters
(`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`), not `nn.Linear`. Older peft's `all-linear`
missed them; peft 0.21 resolves `all-linear` on such models to the linear layers *plus* the fused
experts and the router weight (through `target_parameters`). memft does not guess: `target_experts`
forces the choice either way, and the plan reports what the adapted model really covers.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import ConfigDict, Field, field_validator, model_validator
from torch import nn

from memft.errors import UserError
from memft.registry import BuildContext, Strategy, StrategyParams, register

EXPERT_PARAMETERS = ("experts.gate_up_proj", "experts.down_proj")
HEADS = ("lm_head", "score", "classifier")
"""Output / classification heads: never quantized (a new head must train in full precision)."""


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
    target_experts: bool | None = None
    """MoE only. null: whatever `target_modules` resolves to in peft (0.21's `all-linear` includes the fused
    experts); true: always adapt the fused expert weights (`experts.gate_up_proj`, `experts.down_proj`) via
    peft `target_parameters`; false: only `nn.Linear` layers, never the routed experts."""
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
        if self.target_modules == [] and not self.target_experts:
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


def _linear_layer_names(model: nn.Module) -> list[str]:
    """Suffixes of every `nn.Linear` (4-bit ones included) except the output and classification heads."""
    heads = {id(model.get_output_embeddings())} if hasattr(model, "get_output_embeddings") else set()
    heads |= {id(getattr(model, name)) for name in HEADS if hasattr(model, name)}
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, nn.Linear) and id(m) not in heads})


def _widths(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a layer LoRA can adapt (linear, 4-bit linear, embedding, convolution), else None."""
    if isinstance(getattr(module, "in_features", None), int) and isinstance(getattr(module, "out_features", None), int):
        return module.in_features, module.out_features  # also bitsandbytes' Linear4bit, whose weight is packed
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() >= 2:  # convolutions, transformers' Conv1D
        return weight.shape[1], weight.shape[0]
    return None


def _targeted_widths(model: nn.Module, params: LoraParams, ctx: BuildContext, label: str) -> dict[str, tuple]:
    """{name: (in, out)} of the weights the adapters will sit on, checked before peft allocates anything.

    Raises:
        UserError: a `target_modules` suffix that names no layer LoRA can adapt.
    """
    layers = {name: w for name, m in model.named_modules() if (w := _widths(m)) is not None}
    if params.target_modules == "all-linear":
        short = set(_linear_layer_names(model))
        targeted = {n: w for n, w in layers.items() if n.rsplit(".", 1)[-1] in short}
    else:  # peft's rule for a list: the full name, or a suffix after a dot
        def hit(name, pattern):
            return name == pattern or name.endswith(f".{pattern}")

        unmatched = [p for p in params.target_modules if not any(hit(n, p) for n in layers)]
        if unmatched:
            raise UserError(
                f"{label} `target_modules`: {', '.join(map(repr, unmatched))} "
                f"{'matches' if len(unmatched) == 1 else 'match'} no linear layer of the model; its linear layers "
                f"are {', '.join(_linear_layer_names(model))} (or use `target_modules: all-linear`)")
        targeted = {n: w for n, w in layers.items() if any(hit(n, p) for p in params.target_modules)}
    if params.target_experts and ctx.is_moe:
        targeted |= {n: (p.shape[-1], p.shape[-2]) for n, p in model.named_parameters()
                     if p.dim() == 3 and n.endswith(EXPERT_PARAMETERS)}
    if not targeted:  # `target_modules: []` with `target_experts: true` on a dense model
        raise UserError(f"{label}: nothing to adapt: `target_modules` is empty and the model has no routed experts "
                        "for `target_experts: true`; name module suffixes or use `target_modules: all-linear`")
    return targeted


def _check_rank(targeted: dict[str, tuple], params: LoraParams, label: str) -> None:
    """Refuse an `r` above every adapted layer's rank (its smaller side): B @ A could not use it anywhere, and
    peft would allocate r * (in + out) values per layer, 256 GB for `r: 1e9` on a small model.

    A rank above *some* layers' smaller side is allowed: all-linear also adapts narrow layers (Qwen2-MoE's
    `shared_expert_gate` has one output), where a larger rank only costs a little memory."""
    name, widths = max(targeted.items(), key=lambda item: min(item[1]))
    if params.r > min(widths):
        raise UserError(
            f"{label} `r` ({params.r}) is larger than any adapted layer can use: the widest, `{name}` "
            f"({widths[0]} -> {widths[1]}), has rank {min(widths)}; use `r` <= {min(widths)}")


def _lora_config(model: nn.Module, params: LoraParams, ctx: BuildContext):
    from peft import LoraConfig, TaskType

    seq_cls = ctx.recipe.model.task == "sequence_classification"
    targets = params.target_modules
    if params.target_experts is False and targets == "all-linear":
        targets = _linear_layer_names(model)  # spelled out, so peft does not add the fused experts
    return LoraConfig(
        r=params.r,
        lora_alpha=params.alpha,
        lora_dropout=params.dropout,
        target_modules=targets,
        target_parameters=list(EXPERT_PARAMETERS) if params.target_experts and ctx.is_moe else None,
        use_rslora=params.rslora,
        bias=params.bias,
        # SEQ_CLS makes peft train (and save) the new classification head as well
        task_type=TaskType.SEQ_CLS if seq_cls else TaskType.CAUSAL_LM,
    )


def _attach(model: nn.Module, params: LoraParams, ctx: BuildContext, label: str) -> nn.Module:
    from peft import get_peft_model

    _check_rank(_targeted_widths(model, params, ctx, label), params, label)
    peft_model = get_peft_model(model, _lora_config(model, params, ctx))
    adapted = sorted({n.split(".lora_A")[0] for n, _ in peft_model.named_parameters() if ".lora_A." in n})
    ctx.notes.append(f"{label}: adapters on {len(adapted)} weights (r={params.r}, alpha={params.alpha:g})")
    if ctx.is_moe:  # report what the adapted model covers, not what we asked for
        if any(".experts." in name for name in adapted):
            ctx.notes.append(f"{label}: routed expert weights ARE adapted (fused 3-D parameters, via peft "
                             "`target_parameters`); `target_experts: false` leaves them frozen")
        else:
            ctx.notes.append(f"{label}: routed expert weights are NOT adapted (fused 3-D parameters); "
                             "set `target_experts: true` to adapt them")
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
                llm_int8_skip_modules=list(HEADS),  # transformers' own default misses BERT's `classifier`
            )
        }

    def apply(self, model: nn.Module, ctx: BuildContext) -> nn.Module:
        from peft import prepare_model_for_kbit_training

        # freezes the base and upcasts norms for stable training; checkpointing is the loop's job
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                # bitsandbytes >= 0.50.2 repacks 4-bit weights in place for its AVX512-BF16 CPU kernel on the first
                # no-grad forward in eval mode, and asserts on widths that are not multiples of 32: keep one layout
                # (and one numeric path) for training and evaluation, as on CPUs without that instruction set
                module.support_avx512bf16_for_cpu = False
        return _attach(model, self.params, ctx, "qlora")
