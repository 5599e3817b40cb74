"""The run's numbers beyond metrics.jsonl: TensorBoard scalars and Weights & Biases (`log.tensorboard`, `log.wandb`).

Every record the loop writes to metrics.jsonl goes to each tracker the recipe turns on, under the same keys and at
the same step (numbers only: phases, per-layer lists and calibration tables stay in metrics.jsonl). A resumed run
continues where its checkpoint is: TensorBoard drops the events logged after that step by the interrupted run
(`purge_step`), and W&B continues the same run, whose id is kept in the run directory.
"""

from __future__ import annotations

import math
import secrets
from pathlib import Path

from memft.recipe import Recipe

TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id"


def scalars(record: dict) -> dict[str, float]:
    """The record's finite numbers, by key (`step` itself excluded)."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class Trackers:
    """The trackers `recipe.log` turns on, for a run in `run_dir` that starts (or resumes) after `step`."""

    def __init__(self, recipe: Recipe, run_dir: Path, step: int):
        self.writer = self.wandb_run = None
        log = recipe.log
        if log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run rewrites the steps after its checkpoint: TensorBoard forgets the old ones
            self.writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR), purge_step=step + 1 if step else None)
        if log.wandb is not None and log.wandb.mode != "disabled":
            import wandb

            id_file = run_dir / WANDB_ID_FILE
            run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
            id_file.write_text(run_id)
            w = log.wandb
            self.wandb_run = wandb.init(project=w.project, entity=w.entity, name=w.name or run_dir.name, tags=w.tags,
                                        mode=w.mode, dir=str(run_dir), id=run_id, resume="allow",
                                        config=recipe.model_dump(mode="json"))

    def log(self, record: dict) -> None:
        numbers, step = scalars(record), int(record["step"])
        if self.writer is not None:
            for key, value in numbers.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()
        if self.wandb_run is not None and numbers:
            self.wandb_run.log(numbers, step=step)

    def log_samples(self, step: int, rows: list[dict]) -> None:
        """`log.samples`' replies: TensorBoard text under `samples`, a W&B table `samples`."""
        if self.writer is not None:
            text = "\n\n".join(f"**{r['prompt']}**\n\n{r['reply']}" for r in rows)
            self.writer.add_text("samples", text, step)
            self.writer.flush()
        if self.wandb_run is not None:
            import wandb

            rows = [[step, r["prompt"], r["reply"]] for r in rows]
            table = wandb.Table(columns=["step", "prompt", "reply"], data=rows)
            self.wandb_run.log({"samples": table}, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
