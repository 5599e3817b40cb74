"""Checkpoints and resume never lie: finite checkpoints only, one run per directory, damaged files skipped,
recipe changes that would train something else refused, a full disk reported (memft issue 15)."""

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

from memft.cli import app
from memft.errors import RunFailed, UserError
from memft.recipe import load
from memft.train import checkpoint, lock
from memft.train.loop import Trainer

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.source=data/stories260k_samples.jsonl", "data.format=text", "data.max_samples=16", "data.max_length=32",
        "train.batch_size=2", "data.eval_split=null", "log.progress=false", "output.plot=false",
        "train.warmup_steps=0", "output.save_every=1", "output.keep_last=5"]


def trainer(run_dir: Path, *overrides, recipe="lora.yaml") -> Trainer:
    return Trainer(load(REPO / "recipes" / recipe, [*TINY, *overrides]), run_dir=run_dir).setup()


def step_dirs(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def all_finite(path: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(path).values())


def cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


# --- 1. a checkpoint is written only from finite state -------------------------------------------


def test_blown_up_weights_are_not_checkpointed(tmp_path):
    # the issue's command: step 2 computes non-finite gradients from step 1's (finite, huge) weights
    run = tmp_path / "run"
    with pytest.raises(RunFailed) as failed:
        trainer(run, "train.lr=1.0e6", "train.max_steps=6", "data.max_length=128").train()
    message = str(failed.value)
    assert "checkpoint step-000002 was not written" in message and "train.lr" in message
    assert step_dirs(run) == ["step-000001"] and "step-000001" in message
    # resuming from the state the failed step began with would loop: the message says so and how to get out
    assert "start over" in message and "`output.dir`" in message
    for name in step_dirs(run):  # every checkpoint on disk is finite
        assert all_finite(run / "checkpoints" / name / "trainable.safetensors")
        assert all_finite(run / "checkpoints" / name / "optimizer.safetensors")
    assert not (run / ".memft.lock").exists()


def test_after_a_blow_up_a_lower_lr_resumes_from_the_finite_checkpoint(tmp_path):
    run, common = tmp_path / "run", ["data.max_length=128", "output.save_every=2"]
    trainer(run, "train.max_steps=2", *common).train()
    with pytest.raises(RunFailed, match=r"last good checkpoint is .*step-000002: rerun with a lower `train\.lr`") \
            as failed:
        trainer(run, "train.lr=1.0e6", "train.max_steps=6", *common).train()
    assert "start over" not in str(failed.value)
    assert step_dirs(run) == ["step-000002"]
    assert all_finite(run / "checkpoints" / "step-000002" / "trainable.safetensors")

    again = trainer(run, "train.lr=1e-4", "train.max_steps=6", *common)
    assert again.step == 2
    again.train()
    assert step_dirs(run) == ["step-000002", "step-000004", "step-000006"]
    assert all_finite(run / "checkpoints" / "step-000006" / "trainable.safetensors")


def _mlp_parts():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    return model, opt


def _save(run_dir, step, model=None, opt=None, **kwargs):
    if model is None:
        model, opt = _mlp_parts()
    return checkpoint.save(run_dir, step, model=model, optimizer=opt, scheduler=None, state={"step": step},
                           keep_last=kwargs.pop("keep_last", 5), **kwargs)


@pytest.mark.parametrize("where", ["weights", "optimizer", "strategy tensors"])
def test_save_refuses_non_finite_state_and_writes_nothing(tmp_path, where):
    first = _save(tmp_path, 1)
    model, opt = _mlp_parts()
    tensors = {}
    if where == "weights":
        with torch.no_grad():
            model[0].weight[0, 0] = float("nan")
    elif where == "optimizer":
        opt.state[model[2].bias]["exp_avg_sq"][0] = float("inf")
    else:
        tensors = {"meft.keys": torch.tensor([1.0, float("nan")])}
    with pytest.raises(checkpoint.NonFiniteState) as exc:
        _save(tmp_path, 2, model, opt, tensors=tensors)
    assert {"weights": "0.weight", "optimizer": "exp_avg_sq", "strategy tensors": "meft.keys"}[where] in str(exc.value)
    assert step_dirs(tmp_path) == ["step-000001"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert checkpoint.latest(tmp_path) == first


def _poison(ckpt: Path) -> None:
    """What an older memft could write: a checkpoint whose weights are NaN."""
    weights = load_file(ckpt / "trainable.safetensors")
    save_file({k: torch.full_like(v, float("nan")) for k, v in weights.items()}, ckpt / "trainable.safetensors")


def test_non_finite_old_checkpoints_are_skipped_when_naming_and_resuming(tmp_path):
    run = tmp_path / "run"
    first = trainer(run, "train.max_steps=2")
    first.train()
    _poison(run / "checkpoints" / "step-000002")
    assert "step-000001" in first._nonfinite_message(float("nan"))
    assert "step-000002" not in first._nonfinite_message(float("nan"))

    again = trainer(run, "train.max_steps=3")
    assert again.step == 1
    assert any("step-000002" in n and "non-finite" in n for n in again.notes), again.notes


# --- 2. one run per output directory ---------------------------------------------------------------


def test_lock_file_is_atomic_json_and_released(tmp_path):
    held = lock.acquire(tmp_path, notes=[])
    content = json.loads((tmp_path / ".memft.lock").read_text())
    assert content["pid"] == os.getpid() and content["host"] == socket.gethostname() and content["started"]
    with pytest.raises(UserError) as refused:
        lock.acquire(tmp_path, notes=[])
    message = str(refused.value)
    assert f"pid {os.getpid()}" in message and socket.gethostname() in message and ".memft.lock" in message
    held.release()
    assert not (tmp_path / ".memft.lock").exists()
    held.release()  # twice is harmless


def test_stale_lock_is_taken_over_and_a_foreign_host_is_refused(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = tmp_path / ".memft.lock"
    path.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "yesterday"}))
    notes = []
    lock.acquire(tmp_path, notes).release()
    assert any("stale" in n and str(dead.pid) in n for n in notes), notes

    path.write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "started": "yesterday"}))
    with pytest.raises(UserError, match=r"elsewhere\.example.*delete .*\.memft\.lock"):
        lock.acquire(tmp_path, notes=[])
    assert path.exists()


def test_a_second_run_in_the_same_directory_is_refused_and_touches_nothing(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    first = trainer(run, "train.max_steps=1")  # holds the lock until train() returns
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')  # the first run's log so far
    with pytest.raises(UserError, match=rf"pid {os.getpid()}.*\.memft\.lock"):
        trainer(run, "train.max_steps=1")
    assert (run / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'
    first.train()
    assert not (run / ".memft.lock").exists()
    trainer(run, "train.max_steps=2").train()  # free again


def test_the_cli_refuses_a_live_run_with_exit_2_and_dry_run_takes_no_lock(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    held = lock.acquire(run, notes=[])
    try:
        out = cli("train", "recipes/lora.yaml", *TINY, "train.max_steps=1", "-o", run)
        assert out.exit_code == 2 and f"pid {os.getpid()}" in out.output and ".memft.lock" in out.output
        dry = cli("train", "recipes/lora.yaml", *TINY, "train.max_steps=1", "-o", run, "--dry-run")
        assert dry.exit_code == 0, dry.output
        assert "is training in it now" in " ".join(dry.output.split())
    finally:
        held.release()
    assert sorted(p.name for p in run.iterdir()) == []


# --- 3. a torn metrics line and damaged checkpoints --------------------------------------------------


def test_a_torn_last_metrics_line_is_dropped_with_a_note(tmp_path):
    run = tmp_path / "run"
    trainer(run, "train.max_steps=2").train()
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 1.2')
    again = trainer(run, "train.max_steps=3")
    assert any("metrics.jsonl" in n and "unreadable" in n for n in again.notes), again.notes
    again.train()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def _truncate(path: Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _drop_key(key):
    def damage(ckpt: Path):
        meta = json.loads((ckpt / "state.json").read_text())
        del meta[key]
        (ckpt / "state.json").write_text(json.dumps(meta))
    return damage


DAMAGE = {
    "truncated trainable": lambda c: _truncate(c / "trainable.safetensors"),
    "garbage optimizer tensors": lambda c: (c / "optimizer.safetensors").write_bytes(b"garbage" * 40),
    "garbage optimizer.json": lambda c: (c / "optimizer.json").write_text("{not json"),
    "state.json without state": _drop_key("state"),
    "state.json without step": _drop_key("step"),
    "state.json without python_random": _drop_key("python_random"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_newest_checkpoint_is_skipped_and_kept(tmp_path, damage):
    run = tmp_path / "run"
    trainer(run, "train.max_steps=2", "output.keep_last=2").train()
    DAMAGE[damage](run / "checkpoints" / "step-000002")
    again = trainer(run, "train.max_steps=3", "output.keep_last=2")
    assert again.step == 1
    skipped = [n for n in again.notes if "step-000002" in n]
    assert len(skipped) == 1 and "skipped" in skipped[0], again.notes
    assert step_dirs(run) == ["step-000001", "step-000002"]  # not deleted at resume
    again.train()
    assert step_dirs(run) == ["step-000002", "step-000003"]
    assert checkpoint.latest(run).name == "step-000003"


def test_pruning_drops_a_damaged_checkpoint_before_a_good_one(tmp_path):
    for step in (2, 4):
        _save(tmp_path, step, keep_last=2)
    _truncate(tmp_path / "checkpoints" / "step-000004" / "trainable.safetensors")
    assert checkpoint.latest(tmp_path).name == "step-000002"  # the fallback
    _save(tmp_path, 3, keep_last=2)  # the resumed run saves its next step
    assert step_dirs(tmp_path) == ["step-000002", "step-000003"]


def test_no_usable_checkpoint_is_refused_for_train_eval_and_export(tmp_path):
    from memft.export import export_run

    run = tmp_path / "run"
    trainer(run, "train.max_steps=2").train()
    for name in ("step-000001", "step-000002"):
        DAMAGE["garbage optimizer.json"](run / "checkpoints" / name)
    pattern = r"step-000002.*step-000001.*delete them or choose another `output.dir`"
    with pytest.raises(UserError, match=pattern):
        trainer(run, "train.max_steps=3")
    assert step_dirs(run) == ["step-000001", "step-000002"]
    with pytest.raises(UserError, match=pattern):
        export_run(run, tmp_path / "exported")
    out = cli("eval", "glue", "--task", "sst2", "--model", run, "--limit", "2")
    assert out.exit_code == 2 and "delete them" in " ".join(out.output.split())


def test_latest_falls_back_with_a_note_for_eval_and_export(tmp_path):
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    _drop_key("state")(tmp_path / "checkpoints" / "step-000002")
    notes = []
    assert checkpoint.latest(tmp_path, notes).name == "step-000001"
    assert len(notes) == 1 and "step-000002" in notes[0] and "`state`" in notes[0]


# --- 4. a resume that would train something else is refused ----------------------------------------


def test_another_strategy_is_refused_with_the_ways_out(tmp_path):
    run = tmp_path / "run"
    trainer(run, "train.max_steps=1").train()
    with pytest.raises(UserError) as refused:
        trainer(run, "train.max_steps=2", recipe="qlora.yaml")
    message = str(refused.value)
    assert "`strategies.0.name` 'lora' -> 'qlora'" in message
    assert "`output.dir`" in message and "`output.resume: never`" in message and "delete" in message
    assert step_dirs(run) == ["step-000001"]


@pytest.mark.parametrize("change,field", [
    (["data.source=data/gsm8k_sample.jsonl", "data.format=instruction", "data.template=alpaca"], "`data.source`"),
    (["strategies.0.params.r=4"], "`strategies.0.params.r` 16 -> 4"),
    (["model.name=tiny-llama"], "`model.name` 'stories260K' -> 'tiny-llama'"),
    (["model.seed=3"], "`model.seed` 0 -> 3"),
])
def test_changed_data_model_or_strategy_params_are_refused(tmp_path, change, field):
    run = tmp_path / "run"
    trainer(run, "train.max_steps=1").train()
    with pytest.raises(UserError, match="cannot resume") as refused:
        trainer(run, "train.max_steps=2", *change, "data.max_length=256")
    assert field in str(refused.value)
    assert "`data.max_length` 32 -> 256" in str(refused.value)


def test_a_new_batch_size_continues_at_the_same_example_or_is_refused(tmp_path):
    run = tmp_path / "run"
    trainer(run, "train.max_steps=2", "output.save_every=1", "output.keep_last=2").train()  # 4 examples read
    bigger = trainer(run, "train.max_steps=3", "train.batch_size=4")
    assert bigger.step == 2 and bigger.micro == 1  # one batch of 4 rows: the same 4 examples
    assert any("`train.batch_size` 2 -> 4" in n for n in bigger.notes)
    bigger.release_run_dir()
    # after 2 examples, batches of 4 cannot continue at example 3
    (run / "checkpoints" / "step-000002").rename(tmp_path / "away")
    with pytest.raises(UserError, match="stopped after 2 examples of epoch 0, read 2 at a time"):
        trainer(run, "train.max_steps=3", "train.batch_size=4")


def test_allowed_changes_keep_the_recipe_changed_note(tmp_path, monkeypatch):
    run = tmp_path / "run"
    trainer(run, "train.max_steps=1").train()
    # an older run saved its data path relative to where it ran; the same file by an absolute path is no change
    monkeypatch.chdir(REPO)
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    saved["data"]["source"] = "recipes/data/stories260k_samples.jsonl"
    (run / "recipe.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    again = trainer(run, "train.max_steps=2", "train.lr=1e-3", "train.eval_every=5", "output.keep_last=3",
                    "model.device=cpu", f"data.source={REPO / 'recipes/data/stories260k_samples.jsonl'}")
    assert again.step == 1
    changed = " ".join(n for n in again.notes if "recipe changed" in n)
    assert "`train.lr`" in changed and "`train.max_steps`" in changed and "data.source" not in changed


# --- 4a. --dry-run says what a real start would do, and changes nothing ---------------------------------


def _listing(run: Path) -> dict:
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in sorted(run.rglob("*"))}


def test_dry_run_says_fresh_resume_or_refused_and_changes_nothing(tmp_path):
    run = tmp_path / "run"
    fresh = cli("train", "recipes/lora.yaml", *TINY, "train.max_steps=2", "-o", run, "--dry-run")
    assert fresh.exit_code == 0 and "would start fresh" in " ".join(fresh.output.split())
    assert not run.exists()

    trainer(run, "train.max_steps=2").train()
    before = _listing(run)
    again = cli("train", "recipes/lora.yaml", *TINY, "train.max_steps=4", "-o", run, "--dry-run")
    text = " ".join(again.output.split())
    assert again.exit_code == 0 and "would resume from" in text and "step-000002" in text and "at step 2" in text

    new_data = cli("train", "recipes/lora.yaml", *TINY, "data.source=data/gsm8k_sample.jsonl",
                   "data.format=instruction", "data.template=alpaca", "data.max_length=256", "-o", run, "--dry-run")
    text = " ".join(new_data.output.split())
    assert new_data.exit_code == 2 and "would be refused" in text and "`data.source`" in text
    assert _listing(run) == before


# --- 5. a full disk while writing a checkpoint ----------------------------------------------------------


def test_disk_full_during_save_removes_the_temporary_dir_and_names_the_intact_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    t = trainer(run, "train.max_steps=3", "output.save_every=2")
    real = checkpoint.save_file

    def full_disk(tensors, path, *args, **kwargs):
        if "step-000003" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(RunFailed) as failed:
        t.train()
    message = str(failed.value)
    assert "step-000003" in message and "No space left on device" in message
    assert "step-000002" in message and "intact" in message
    assert step_dirs(run) == ["step-000002"]
    assert not (run / ".memft.lock").exists()
    monkeypatch.undo()
    assert trainer(run, "train.max_steps=3").step == 2


def test_a_failed_first_write_says_no_earlier_checkpoint_exists(tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(checkpoint.CheckpointWriteFailed, match="step-000001.*No space left on device.*no earlier"):
        _save(tmp_path, 1)
    assert list((tmp_path / "checkpoints").iterdir()) == []
