"""TensorBoard and Weights & Biases (`log.tensorboard`, `log.wandb`): the metrics.jsonl numbers under the same keys
and steps, a resumed run continuing the same record, and a missing package named at validate."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from memft.errors import RecipeError
from memft.recipe import load
from memft.train import trackers
from memft.train.loop import Trainer

REPO = Path(__file__).resolve().parents[1]
QUICK = ["data.max_samples=80", "data.max_length=128", "train.batch_size=4", "log.progress=false",
         "output.plot=false", "train.eval_batches=2", "train.max_steps=4", "train.eval_every=2",
         "output.save_every=2", "output.keep_last=5", "train.warmup_steps=0"]


def train(run_dir: Path, *overrides: str, stop_after: int | None = None) -> Trainer:
    t = Trainer(load(REPO / "recipes" / "quickstart.yaml", [*QUICK, *overrides]), run_dir=run_dir).setup()
    if stop_after is not None:
        t.total_steps = stop_after
    t.train()
    return t


def jsonl_numbers(run_dir: Path) -> dict[str, dict[int, float]]:
    """metrics.jsonl as key -> step -> value (the last line for a step wins, as after a resume)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in trackers.scalars(record).items():
            out.setdefault(key, {})[record["step"]] = value
    return out


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / trackers.TENSORBOARD_DIR), size_guidance={"scalars": 0}).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_holds_the_metrics_and_a_resumed_run_rewrites_the_steps_after_its_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    straight = tmp_path / "straight"
    train(straight, "log.tensorboard=true")
    got = tensorboard_scalars(straight)
    want = jsonl_numbers(straight)
    assert {"loss", "lr", "grad_norm", "eval_loss", "tokens_per_s", "peak_mem_bytes"} <= set(got)
    assert set(got) == set(want)
    assert [s for s, _ in got["loss"]] == [1, 2, 3, 4] and [s for s, _ in got["eval_loss"]] == [0, 2, 4]
    for key, series in got.items():
        assert [s for s, _ in series] == list(want[key]), key
        assert [v for _, v in series] == pytest.approx(list(want[key].values()), rel=1e-6), key  # float32 events

    killed = tmp_path / "killed"
    train(killed, "log.tensorboard=true", stop_after=3)  # steps 1-3 logged, checkpoints at 2 and 3
    shutil.rmtree(killed / "checkpoints" / "step-000003")  # as if killed before step 3's checkpoint landed
    (killed / "summary.json").unlink()
    train(killed, "log.tensorboard=true")  # resumes at step 2: steps 3 and 4 again
    resumed = tensorboard_scalars(killed)
    assert [s for s, _ in resumed["loss"]] == [1, 2, 3, 4]  # step 3 once: the interrupted run's is purged
    assert resumed["loss"] == got["loss"] and resumed["eval_loss"] == got["eval_loss"]


class FakeRun:
    def __init__(self, **kwargs):
        self.init, self.logged, self.finished = kwargs, [], False

    def log(self, numbers, step):
        self.logged.append((step, numbers))

    def finish(self):
        self.finished = True


def test_wandb_gets_every_record_and_a_resumed_run_keeps_its_id(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    runs = []
    monkeypatch.setattr(wandb, "init", lambda **kwargs: runs.append(FakeRun(**kwargs)) or runs[-1])
    run_dir = tmp_path / "run"
    train(run_dir, "log.wandb={project: memft-test, tags: [ci]}", stop_after=2)
    train(run_dir, "log.wandb={project: memft-test, tags: [ci]}")
    first, second = runs
    assert first.finished and second.finished
    assert first.init["id"] == second.init["id"] == (run_dir / trackers.WANDB_ID_FILE).read_text()
    assert first.init["resume"] == "allow" and first.init["project"] == "memft-test" and first.init["tags"] == ["ci"]
    assert first.init["name"] == "run" and first.init["config"]["train"]["max_steps"] == 4
    logged = {}
    for step, numbers in first.logged + second.logged:
        for key, value in numbers.items():
            logged.setdefault(key, {})[step] = value
    assert logged == jsonl_numbers(run_dir)
    assert sorted(logged["loss"]) == [1, 2, 3, 4]


def test_wandb_offline_writes_the_run_into_the_run_directory(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    train(run_dir, "log.wandb={mode: offline}", "train.max_steps=2", "train.eval_every=null")
    run_id = (run_dir / trackers.WANDB_ID_FILE).read_text()
    offline = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))


def test_a_tracker_whose_package_is_missing_is_named_at_validate(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(RecipeError, match=r"`log.tensorboard` needs the `tensorboard` package.*pip install tensorb"):
        load(REPO / "recipes" / "quickstart.yaml", ["log.tensorboard=true"])
    load(REPO / "recipes" / "quickstart.yaml", ["log.wandb={mode: disabled}"])  # disabled needs nothing
    assert load(REPO / "recipes" / "quickstart.yaml", ["log.wandb=true"]).log.wandb.project == "memft"
