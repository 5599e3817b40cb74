"""`memft export`: a run directory -> a standalone Hugging Face model directory (LoRA merged)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from memft import registry
from memft.data.formats import pad_token_id
from memft.errors import UserError
from memft.models.expert_lora import LoraExperts, is_fused_experts
from memft.models.load import load_model, load_tokenizer
from memft.models.peft_interop import NotRepresentable, write_peft_adapter
from memft.outputs import check_writable_dir
from memft.recipe import StrategySpec
from memft.registry import BuildContext
from memft.train import checkpoint
from memft.train.loop import RECIPE_FILE, saved_recipe


def export_run(run_dir: Path, out_dir: Path) -> Path:
    """Rebuild the run's model, load its newest checkpoint's trainable weights, merge adapters, save.

    A QLoRA run is exported on the full-precision base: its adapters, the fused experts' ones included,
    are merged into unquantized weights (merging into 4-bit weights would round them away). The adapters
    are also written in peft's layout under OUT/adapter when peft can hold them exactly.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not (run_dir / RECIPE_FILE).exists():
        raise UserError(f"{run_dir} is not a memft run directory (no {RECIPE_FILE}); pass the `output.dir` of a run")
    ckpt = checkpoint.latest(run_dir)
    if ckpt is None:
        raise UserError(f"{run_dir} has no complete checkpoint to export (was it run with `output.checkpoints=false`?)")
    check_writable_dir(out_dir, "the export directory")  # before the model loads: a bad OUT costs no waiting
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir} exists and is not empty; choose a new directory so nothing is overwritten")

    recipe = saved_recipe(run_dir)
    for spec in recipe.strategies:
        if why := registry.get(spec.name).rewires:
            raise UserError(f"{run_dir} was trained with `{spec.name}`: {why}, so a plain transformers model "
                            "saved from these weights would compute something else; use the run with memft instead")
    recipe.strategies = [StrategySpec(name="lora" if s.name == "qlora" else s.name,
                                      params=_lora_params(s) if s.name == "qlora" else s.params)
                         for s in recipe.strategies]
    tokenizer = load_tokenizer(recipe.model)
    if recipe.data.format == "chat":  # export renders conversations with the template the run trained on
        from memft.data.chat import set_chat_template

        set_chat_template(tokenizer, recipe.data)
    loaded = load_model(recipe.model, num_labels=recipe.model.num_labels, pad_token_id=pad_token_id(tokenizer))
    model = loaded.model
    ctx = BuildContext(recipe=recipe, device=model.device, is_moe=loaded.is_moe)
    originals = experts_by_weight(model)  # before the strategies wrap them
    for s in registry.compose(recipe):
        model = s.apply(model, ctx)
    if checkpoint.check(ckpt).get("sharded"):  # written by the ranks of a torchrun job: gather its shards
        from memft.train.dist_checkpoint import consolidated_trainable

        weights = consolidated_trainable(ckpt)
    else:
        weights = load_file(str(ckpt / checkpoint.TRAINABLE_FILE))
    missing, unexpected = _load_by_name(model, weights)
    if missing or unexpected:
        raise UserError(f"checkpoint {ckpt} does not match the rebuilt model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_adapter(model, out_dir / ADAPTER_DIR)
    merge_expert_adapters(model, originals)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(out_dir)
    tokenizer.init_kwargs.pop("local_files_only", None)  # how memft loaded it offline, not part of the tokenizer
    tokenizer.save_pretrained(out_dir)
    return out_dir


ADAPTER_DIR = "adapter"
"""Under OUT: the run's adapters for `peft.PeftModel.from_pretrained(base, OUT/adapter)`."""


def experts_by_weight(model: nn.Module) -> dict[int, nn.Module]:
    """Every fused experts module of `model`, keyed by its `gate_up_proj` parameter's id.

    A `LoraExperts` keeps the wrapped module's parameters themselves, not the module, so this (taken before
    the strategies wrap the experts) is how `merge_expert_adapters` finds the module to put back."""
    return {id(m.gate_up_proj): m for m in model.modules() if is_fused_experts(m)}


@torch.no_grad()
def merge_expert_adapters(model: nn.Module, originals: dict[int, nn.Module]) -> int:
    """Replace every `LoraExperts` by the experts module it wraps, holding `W + s B A`; returns how many.

    `originals` is `experts_by_weight(model)` from before the wrapping."""
    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraExperts)]
    for name, wrapper in wrapped:
        original = originals.get(id(_plain_weight(wrapper.gate_up_base)))
        if original is None:
            raise RuntimeError(f"{name}: the experts module this adapter wraps was not recorded before wrapping")
        # in the original's dtype: merge()'s default for provider storage is float32
        for param, merged in wrapper.merge(original.gate_up_proj.dtype).items():
            getattr(original, param).copy_(merged)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, original)
    return len(wrapped)


def _plain_weight(base) -> torch.Tensor | None:
    """The fused parameter behind a wrapper's base weights: itself, or what a dense provider holds."""
    return base if isinstance(base, torch.Tensor) else getattr(base, "weight", None)


def _write_adapter(model: nn.Module, adapter_dir: Path) -> None:
    """The adapters in peft's layout, when peft can hold them exactly (else none: never a lossy adapter)."""
    if not (hasattr(model, "peft_config") or any(isinstance(m, LoraExperts) for m in model.modules())):
        return
    try:
        write_peft_adapter(model, adapter_dir)
    except NotRepresentable:
        pass


def _lora_params(spec: StrategySpec) -> dict:
    quant_only = {"quant_type", "double_quant", "compute_dtype"}
    return {k: v for k, v in spec.params.items() if k not in quant_only}


def _load_by_name(model, weights: dict) -> tuple[list[str], list[str]]:
    params = dict(model.named_parameters())
    unexpected = [k for k in weights if k not in params]
    for name, tensor in weights.items():
        if name in params:
            params[name].data.copy_(tensor)
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    return missing, unexpected
