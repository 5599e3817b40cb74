"""`memft export`: a run directory -> a standalone Hugging Face model directory (LoRA merged)."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from memft import registry
from memft.data.formats import pad_token_id
from memft.errors import UserError
from memft.models import load_model, load_tokenizer
from memft.outputs import check_writable_dir
from memft.recipe import StrategySpec
from memft.registry import BuildContext
from memft.train import checkpoint
from memft.train.loop import RECIPE_FILE, saved_recipe


def export_run(run_dir: Path, out_dir: Path) -> Path:
    """Rebuild the run's model, load its newest checkpoint's trainable weights, merge adapters, save.

    A QLoRA run is exported on the full-precision base: its adapters are merged into unquantized
    weights (merging into 4-bit weights would round them away).
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
    loaded = load_model(recipe.model, num_labels=recipe.model.num_labels, pad_token_id=pad_token_id(tokenizer))
    model = loaded.model
    ctx = BuildContext(recipe=recipe, device=model.device, is_moe=loaded.is_moe)
    for s in registry.compose(recipe):
        model = s.apply(model, ctx)
    weights = load_file(str(ckpt / checkpoint.TRAINABLE_FILE))
    missing, unexpected = _load_by_name(model, weights)
    if missing or unexpected:
        raise UserError(f"checkpoint {ckpt} does not match the rebuilt model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


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
