"""The model `memft eval` scores: a run directory, a local Hugging Face model directory, or a hub id."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from memft.data.formats import pad_token_id
from memft.errors import UserError
from memft.models.load import load_model, load_tokenizer, read_config_file, resolve_device
from memft.recipe import DataConfig, ModelConfig
from memft.train import checkpoint
from memft.train.loop import RECIPE_FILE, Trainer, restore_strategies, saved_recipe


@dataclass
class EvalModel:
    model: object
    tokenizer: object
    source: str
    """What was loaded, for the report: "run runs/lora (step-000200), lora" or "hub org/name"."""
    dtype: str
    adapters: list[str]
    """The run's strategies (LoRA adapters, MEFT's adapter, ...), empty for a plain model."""
    task: str = "causal_lm"
    """`causal_lm`, or `sequence_classification` for a model with a classification head."""
    label_names: list[str] | None = None
    """A classification run's string labels in its class order (None: the labels were the class ids)."""
    max_length: int = 512
    """Tokens per classified example (a run's `data.max_length`)."""
    data: DataConfig | None = None
    """A run's data block (how its examples were rendered, for `memft chat`); None for a plain model."""

    @classmethod
    def of(cls, trainer: Trainer, where: str) -> EvalModel:
        """A set-up trainer's model as trained (strategies applied); `where`: what to call it in reports."""
        r = trainer.recipe
        return cls(trainer.model, trainer.tokenizer, f"{where}, {trainer.model_source}", r.model.dtype,
                   [s.name for s in trainer.strategies], r.model.task, trainer.label_names, r.data.max_length, r.data)


def load(ref: str, *, dtype: str | None = None, device: str = "auto", trust_remote_code: bool = False) -> EvalModel:
    """`ref` is a run directory (its newest checkpoint with its strategies applied, so a LoRA run is
    scored with its adapters), a directory with config.json and weights, a built-in or a hub id. A local
    directory whose config names a `...ForSequenceClassification` architecture is loaded as a classifier."""
    run = Path(ref)
    if (run / RECIPE_FILE).is_file():
        return _from_run(run, dtype, device)
    config = read_config_file(run / "config.json") if (run / "config.json").is_file() else {}
    classifier = any("ForSequenceClassification" in a for a in config.get("architectures") or [])
    task = "sequence_classification" if classifier else "causal_lm"
    cfg = ModelConfig(name=ref, task=task, dtype=dtype or "float32", device=device, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(cfg)
    num_labels = (len(config.get("id2label") or {}) or config.get("num_labels") or 2) if classifier else None
    loaded = load_model(cfg, num_labels=num_labels, pad_token_id=pad_token_id(tokenizer))  # the pad id `classify` uses
    model = loaded.model.to(resolve_device(device))
    return EvalModel(model, tokenizer, loaded.source, cfg.dtype, [], task)


def _from_run(run: Path, dtype: str | None, device: str) -> EvalModel:
    recipe = saved_recipe(run)
    ckpt = checkpoint.latest(run)
    if ckpt is None:
        raise UserError(f"{run} has no complete checkpoint to evaluate (was it run with `output.checkpoints=false`?)")
    recipe.model.device = device
    if dtype:
        recipe.model.dtype = dtype
    trainer = Trainer(recipe, run_dir=run).setup_for_scoring()  # no training data needed
    state = checkpoint.load(ckpt, model=trainer.model)
    restore_strategies(trainer.strategies, state, ckpt)
    return EvalModel.of(trainer, f"run {run} ({ckpt.name})")
