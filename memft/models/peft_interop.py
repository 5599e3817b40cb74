"""memft's expert adapters in peft 0.21's `target_parameters` layout, so `PeftModel.from_pretrained` loads them.

peft adapts a fused 3-D parameter (E, out, in) through `lora.ParamWrapper` with one `nn.Linear` pair for all
experts: `lora_A.weight` (r*E, in) and `lora_B.weight` (out, r*E). Its delta weight for expert e is

    A_e = lora_A.weight.reshape(E, r, in)[e]                  rows e*r .. e*r + r - 1
    B_e = lora_B.weight.reshape(out, r, E)[:, :, e]           columns j*E + e, j = 0 .. r-1
    W_e + scaling * B_e @ A_e,  scaling = alpha / r  (alpha / sqrt(r) with rslora)

i.e. every expert has its own rank-r A_e and B_e, exactly memft's `LoraExperts` factors (`gate_up_lora_A[e]`,
`gate_up_lora_B[e]`, ...), so the mapping is exact: a permutation of the same numbers, nothing dropped.

Two parameters of one module are nested wrappers: peft wraps them in the module's registration order
(`gate_up_proj` first in every transformers 5 experts class), so `gate_up_proj`'s adapter sits one
`base_layer.` deeper than `down_proj`'s. A wrong guess cannot load silently: the two projections' factors
have different shapes (out 2I vs H), and peft refuses a shape mismatch.

peft refuses `lora_dropout` on a `ParamWrapper`, so the adapter is written with `lora_dropout: 0`;
dropout acts only in training, so the adapted model computes the same function.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from memft.models.expert_lora import LoraExperts

ADAPTER_WEIGHTS = "adapter_model.safetensors"
NESTING = ("gate_up_proj", "down_proj")
"""The experts' fused parameters in the order peft wraps them: the first is innermost."""


class NotRepresentable(ValueError):
    """The adapted model has trainable weights a peft adapter cannot hold exactly."""


def write_peft_adapter(model: nn.Module, out_dir: Path) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` for `PeftModel.from_pretrained(base, out_dir)`.

    `model` is a peft model whose fused experts may be `LoraExperts`, or a plain model with `LoraExperts` only.

    Raises:
        NotRepresentable: trainable weights the adapter would leave out, or expert adapters whose rank or
            scale differ from the linear adapters' (one peft config holds one of each).
    """
    experts = {name: m for name, m in model.named_modules() if isinstance(m, LoraExperts)}
    prefix = "" if _peft_config(model) is not None else "base_model.model."
    tensors = _peft_linear_tensors(model, experts)
    for name, module in experts.items():
        tensors |= expert_tensors(module, f"{prefix}{name}")
    _check_everything_written(model, tensors)
    config = _adapter_config(model, experts)  # checked before anything is written
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(out_dir / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    config.save_pretrained(str(out_dir))  # adapter_config.json
    return out_dir


def expert_tensors(module: LoraExperts, name: str) -> dict[str, torch.Tensor]:
    """peft's state-dict entries for one `LoraExperts` at `name` (peft's saved form, `base_model.model....`)."""
    factors = {"gate_up_proj": (module.gate_up_lora_A, module.gate_up_lora_B),
               "down_proj": (module.down_lora_A, module.down_lora_B)}
    tensors = {}
    for depth, param in enumerate(NESTING):
        A, B = factors[param]  # (E, r, in), (E, out, r)
        wrapper = name + ".base_layer" * (len(NESTING) - 1 - depth)
        tensors[f"{wrapper}.lora_A.weight"] = A.reshape(-1, A.shape[-1])  # (E*r, in): expert-major rows
        tensors[f"{wrapper}.lora_B.weight"] = B.permute(1, 2, 0).reshape(B.shape[1], -1)  # (out, r*E): expert-minor
    return tensors


def _peft_config(model: nn.Module):
    configs = getattr(model, "peft_config", None)
    return configs.get("default") if isinstance(configs, dict) else None


def _peft_linear_tensors(model: nn.Module, experts: dict[str, LoraExperts]) -> dict[str, torch.Tensor]:
    """peft's own adapter state dict (linear adapters, heads), without memft's expert factors in it."""
    if _peft_config(model) is None:
        return {}
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    # memft's factors (`...experts.gate_up_lora_A`) contain "lora_", so peft's filter keeps them: drop them here
    return {k: v for k, v in state.items() if not any(k.startswith(f"{name}.") for name in experts)}


def _check_everything_written(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    written = sum(t.numel() for t in tensors.values())
    if trained != written:
        raise NotRepresentable(f"the model trains {trained:,} values and a peft adapter would hold {written:,}: "
                               "weights other than LoRA factors and peft's saved modules train too")


def _adapter_config(model: nn.Module, experts: dict[str, LoraExperts]):
    """The model's LoRA config (a copy) with the experts' fused parameters added to `target_parameters`."""
    from peft import LoraConfig

    config = _peft_config(model)
    if config is None:  # experts only
        some = next(iter(experts.values()))
        config = LoraConfig(r=some.r, lora_alpha=some.alpha, target_modules=[],
                            use_rslora=some.scaling != some.alpha / some.r)
    config = copy.deepcopy(config)
    if experts:
        _check_same_scale(config, experts)
        owners = sorted({name.rpartition(".")[2] for name in experts})  # "experts" in transformers 5
        config.target_parameters = sorted({*(config.target_parameters or []),
                                           *(f"{owner}.{param}" for owner in owners for param in NESTING)})
        config.lora_dropout = 0.0  # peft's ParamWrapper refuses dropout; the adapted function is the same
    config.inference_mode = True
    return config


def _check_same_scale(config, experts: dict[str, LoraExperts]) -> None:
    scale = config.lora_alpha / (config.r ** 0.5 if config.use_rslora else config.r)
    odd = [name for name, m in experts.items() if m.r != config.r or abs(m.scaling - scale) > 1e-12 * scale]
    if odd:
        raise NotRepresentable(f"the expert adapters at {odd[0]} use r={experts[odd[0]].r}, scaling "
                               f"{experts[odd[0]].scaling:g}, the linear adapters r={config.r}, scaling {scale:g}")
