"""Putting `lora` / `qlora` adapters on a model: what they cover, checked before peft allocates anything, then
peft's adapters on the linear layers and memft's `LoraExperts` on the fused routed experts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import nn

from memft.errors import UserError
from memft.registry import BuildContext
from memft.strategies.lora import HEADS, SHARED_EXPERT, LoraParams


def _is_shared_expert(name: str) -> bool:
    return f".{SHARED_EXPERT}." in f".{name}" or name.endswith(f"{SHARED_EXPERT}_gate")


def _linear_layer_names(model: nn.Module, shared: bool = True) -> list[str]:
    """Suffixes of every `nn.Linear` (4-bit ones included) except the output and classification heads (and, with
    `shared=False`, the shared expert's)."""
    heads = {id(model.get_output_embeddings())} if hasattr(model, "get_output_embeddings") else set()
    heads |= {id(getattr(model, name)) for name in HEADS if hasattr(model, name)}
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, nn.Linear) and id(m) not in heads and (shared or not _is_shared_expert(name))})


def _shared_expert_names(model: nn.Module) -> list[str]:
    """peft suffixes of the shared expert's linear layers (`shared_expert.gate_proj`, ..., `shared_expert_gate`)."""
    return sorted({name[name.index(SHARED_EXPERT):] for name, m in model.named_modules()
                   if isinstance(m, nn.Linear) and _is_shared_expert(name)})


def _experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every routed-experts module: fused 3-D weights, or weights already stored elsewhere."""
    from memft.models.expert_lora import is_fused_experts, stored_experts

    return [(name, m) for name, m in model.named_modules() if is_fused_experts(m) or stored_experts(m)]


@dataclass
class Coverage:
    """What the adapters sit on, decided from the params and the model before anything is allocated."""

    linear: Literal["all-linear"] | list[str]
    """peft's `target_modules`: `all-linear` on dense models, spelled-out suffixes on MoE models."""
    exclude: list[str]
    """peft's `exclude_modules` (the shared expert's linear layers when they stay frozen)."""
    experts: bool = False
    """The routed experts get memft's `LoraExperts`."""
    router: bool = False
    """The routers' weights train in full."""
    shared: bool | None = None
    """The shared expert's linear layers are adapted (None: the model has no shared expert)."""


def _coverage(model: nn.Module, params: LoraParams, ctx: BuildContext, label: str) -> Coverage:
    """Resolve `target_modules`, `target_experts` and `target_router` on this model.

    On MoE models peft gets only `nn.Linear` names: its `all-linear` would add the fused experts and the router
    through `target_parameters` (a delta weight per expert), which memft's expert LoRA replaces.

    Raises:
        UserError: `target_experts: shared` on a model without a shared expert.
    """
    if not ctx.is_moe:
        return Coverage(params.target_modules, [])
    all_linear = params.target_modules == "all-linear"
    choice = all_linear if params.target_experts is None else params.target_experts
    shared = _shared_expert_names(model)
    if choice == "shared" and not shared:
        raise UserError(f"{label} `target_experts: shared`: this model has no shared expert (only Qwen2-MoE-style "
                        "models have one); use `target_experts: true` or `false`")
    keep_shared = choice in (True, "shared")
    if all_linear:
        linear = _linear_layer_names(model, shared=keep_shared)
    else:
        linear = sorted(set(params.target_modules) | (set(shared) if keep_shared else set()))
    # exclude the shared expert only where a suffix would reach it (a dense MLP's `down_proj` in a mixed stack)
    reached = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _is_shared_expert(n)
               and any(_hit(n, t) for t in linear)]
    # experts stored in 4 bits while loading are modules named like linear layers (`experts.down_proj`): not peft's
    from memft.models.expert_lora import EXPERT_PARAMS, stored_experts

    stored = sorted(f"{name}.{w}" for name, m in _experts_modules(model) if stored_experts(m) for w in EXPERT_PARAMS)
    return Coverage(linear=linear, exclude=(shared if reached and not keep_shared else []) + stored,
                    experts=choice is True, router=params.target_router, shared=keep_shared if shared else None)


def _widths(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a layer LoRA can adapt (linear, 4-bit linear, embedding, convolution), else None."""
    from memft.models.expert_lora import ExpertWeights

    if isinstance(module, ExpertWeights):  # 4-bit fused experts: adapted by `LoraExperts`, not as a layer
        return None
    if isinstance(getattr(module, "in_features", None), int) and isinstance(getattr(module, "out_features", None), int):
        return module.in_features, module.out_features  # also bitsandbytes' Linear4bit, whose weight is packed
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() >= 2:  # convolutions, transformers' Conv1D
        return weight.shape[1], weight.shape[0]
    return None


def _hit(name: str, pattern: str) -> bool:
    """peft's rule for a list of names: the full name, or a suffix after a dot."""
    return name == pattern or name.endswith(f".{pattern}")


def _targeted_widths(model: nn.Module, params: LoraParams, coverage: Coverage, label: str) -> dict[str, tuple]:
    """{name: (in, out)} of the weights the adapters will sit on, checked before peft allocates anything.

    Raises:
        UserError: a `target_modules` suffix that names no layer LoRA can adapt; nothing to adapt at all.
    """
    layers = {name: w for name, m in model.named_modules() if (w := _widths(m)) is not None}
    if coverage.linear == "all-linear":
        short = set(_linear_layer_names(model))
        targeted = {n: w for n, w in layers.items() if n.rsplit(".", 1)[-1] in short}
    else:
        if isinstance(params.target_modules, list):
            unmatched = [p for p in params.target_modules if not any(_hit(n, p) for n in layers)]
            if unmatched:
                raise UserError(
                    f"{label} `target_modules`: {', '.join(map(repr, unmatched))} "
                    f"{'matches' if len(unmatched) == 1 else 'match'} no linear layer of the model; its linear "
                    f"layers are {', '.join(_linear_layer_names(model))} (or use `target_modules: all-linear`)")
        targeted = {n: w for n, w in layers.items() if any(_hit(n, p) for p in coverage.linear)
                    and not any(_hit(n, p) for p in coverage.exclude)}
    if coverage.experts:
        for name, m in _experts_modules(model):
            targeted[f"{name}.gate_up_proj"] = (m.hidden_dim, 2 * m.intermediate_dim)
            targeted[f"{name}.down_proj"] = (m.intermediate_dim, m.hidden_dim)
    if not targeted and not coverage.router:  # `target_modules: []` with `target_experts: true` on a dense model
        raise UserError(f"{label}: nothing to adapt: `target_modules` is empty and the model has no routed experts "
                        "for `target_experts: true`; name module suffixes or use `target_modules: all-linear`")
    return targeted


def _check_rank(targeted: dict[str, tuple], params: LoraParams, label: str) -> None:
    """Refuse an `r` above every adapted layer's rank (its smaller side): B @ A could not use it anywhere, and
    peft would allocate r * (in + out) values per layer, 256 GB for `r: 1e9` on a small model.

    A rank above *some* layers' smaller side is allowed: all-linear also adapts narrow layers (Qwen2-MoE's
    `shared_expert_gate` has one output), where a larger rank only costs a little memory."""
    if not targeted:  # only the routers train
        return
    name, widths = max(targeted.items(), key=lambda item: min(item[1]))
    if params.r > min(widths):
        raise UserError(
            f"{label} `r` ({params.r}) is larger than any adapted layer can use: the widest, `{name}` "
            f"({widths[0]} -> {widths[1]}), has rank {min(widths)}; use `r` <= {min(widths)}")


def _lora_config(params: LoraParams, ctx: BuildContext, coverage: Coverage):
    from peft import LoraConfig, TaskType

    seq_cls = ctx.recipe.model.task == "sequence_classification"
    return LoraConfig(
        r=params.r,
        lora_alpha=params.alpha,
        lora_dropout=params.dropout,
        target_modules=coverage.linear,
        exclude_modules=coverage.exclude or None,
        use_rslora=params.rslora,
        bias=params.bias,
        # SEQ_CLS makes peft train (and save) the new classification head as well
        task_type=TaskType.SEQ_CLS if seq_cls else TaskType.CAUSAL_LM,
    )


def attach(model: nn.Module, params: LoraParams, ctx: BuildContext, label: str,
            store_experts: Callable[[nn.Module], object] | None = None) -> nn.Module:
    """Freeze the base, add peft's adapters on the linear targets, (QLoRA: store the experts in 4 bits,
    `store_experts`), wrap the routed experts in `LoraExperts` and unfreeze the routers, as `params` ask."""
    from peft import get_peft_model

    coverage = _coverage(model, params, ctx, label)
    _check_rank(_targeted_widths(model, params, coverage, label), params, label)
    # the base is frozen in its own dtype: no float32 copy of bf16 weights (norms included: transformers'
    # RMSNorm already computes in float32 inside); only what trains is float32
    model.requires_grad_(False)
    if coverage.linear:
        # peft keeps half-precision adapters in float32 (`autocast_adapter_dtype`), casting x for them
        model = get_peft_model(model, _lora_config(params, ctx, coverage), autocast_adapter_dtype=True)
    if store_experts is not None:
        store_experts(model)
    from memft.models.expert_lora import wrap_experts  # here: it imports transformers' activations (a second)

    wrapped = wrap_experts(model, params.r, params.alpha, params.dropout, params.rslora) if coverage.experts else []
    routers = _train_routers(model) if coverage.router else 0
    adapted = sorted({n.split(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A." in n})
    ctx.notes.append(f"{label}: adapters on {len(adapted) + 2 * len(wrapped)} weights "
                     f"(r={params.r}, alpha={params.alpha:g})")
    if ctx.is_moe:
        ctx.notes += _coverage_notes(label, coverage, len(wrapped), routers)
    return model


def _train_routers(model: nn.Module) -> int:
    """Unfreeze every MoE router's weight (trained in full, in the model's dtype); returns how many."""
    from memft.models.blocks import layer_stack
    from memft.models.moe import router_of

    routers = [r for layer in layer_stack(model) if (r := router_of(layer)) is not None]
    for router in routers:
        router.weight.requires_grad_(True)
    return len(routers)


def _coverage_notes(label: str, coverage: Coverage, experts: int, routers: int) -> list[str]:
    """What the adapted model covers, from what was built (not from what was asked)."""
    notes = [f"{label}: routed expert weights ARE adapted (memft expert LoRA, no delta weight, {experts} layers); "
             "`target_experts: false` leaves them frozen" if experts else
             f"{label}: routed expert weights are NOT adapted (fused 3-D parameters); "
             "set `target_experts: true` to adapt them"]
    if coverage.shared is not None:
        notes.append(f"{label}: the shared expert's linear layers are {'' if coverage.shared else 'NOT '}adapted")
    notes.append(f"{label}: router weights train in full ({routers} layers)" if routers else
                 f"{label}: router weights are frozen; `target_router: true` trains them")
    return notes
