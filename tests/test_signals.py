"""SIGINT and SIGTERM stop a run at the next step boundary, save its last step, and say so in one sentence."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memft.recipe import load
from memft.train.loop import RunInterrupted, Trainer

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.source=data/stories260k_samples.jsonl", "data.format=text", "data.max_samples=48", "data.max_length=32",
        "train.batch_size=4", "train.eval_batches=1", "train.eval_every=null", "output.save_every=null",
        "log.progress=false", "output.plot=false", "train.max_steps=5"]


def trainer(run_dir: Path, *overrides) -> Trainer:
    return Trainer(load(REPO / "recipes" / "quickstart.yaml", [*TINY, *overrides]), run_dir=run_dir).setup()


def losses(run_dir: Path) -> list:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(m["step"], m.get("loss"), m.get("eval_loss")) for m in lines]


def signal_at_step(monkeypatch, t: Trainer, step: int, *signums) -> None:
    """Send `signums` to this process while step `step + 1` fetches its batch."""
    fetch = t._next_batch

    def next_batch():
        if t.step == step:
            for s in signums:
                os.kill(os.getpid(), s)
        return fetch()

    monkeypatch.setattr(t, "_next_batch", next_batch)


def test_sigterm_saves_the_last_step_and_the_resumed_run_matches_an_uninterrupted_one(tmp_path, monkeypatch):
    straight = trainer(tmp_path / "straight")
    straight.train()

    before = signal.getsignal(signal.SIGTERM)
    t = trainer(tmp_path / "stopped")
    signal_at_step(monkeypatch, t, 2, signal.SIGTERM)
    with pytest.raises(RunInterrupted) as info:
        t.train()
    stop = info.value
    assert stop.exit_code == 143 and stop.step == 3  # the step in flight finishes first
    saved = tmp_path / "stopped" / "checkpoints" / "step-000003"
    assert stop.checkpoint == saved and (saved / "state.json").exists()
    assert str(stop).startswith(f"interrupted (SIGTERM) at step 3 of 5; saved checkpoint {saved}; ")
    assert "again resumes it" in str(stop)
    assert signal.getsignal(signal.SIGTERM) is before  # the handlers are put back
    assert not (tmp_path / "stopped" / "summary.json").exists()

    resumed = trainer(tmp_path / "stopped")
    assert resumed.step == 3
    resumed.train()
    assert losses(tmp_path / "stopped") == losses(tmp_path / "straight")  # bitwise: JSON floats round-trip


def test_sigint_with_checkpoints_off_says_nothing_was_saved(tmp_path, monkeypatch):
    t = trainer(tmp_path / "run", "output.checkpoints=false")
    signal_at_step(monkeypatch, t, 1, signal.SIGINT)
    with pytest.raises(RunInterrupted) as info:
        t.train()
    assert info.value.exit_code == 130
    assert str(info.value) == "interrupted (SIGINT) at step 2 of 5; nothing was saved (checkpoints are off)"
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 3  # step 0's eval, steps 1 and 2


def test_signal_before_the_first_step_finished_saves_nothing(tmp_path, monkeypatch):
    t = trainer(tmp_path / "run")
    evaluate = t.evaluate

    def evaluate_then_signal():  # the evaluation at step 0, before any step
        os.kill(os.getpid(), signal.SIGTERM)
        return evaluate()

    monkeypatch.setattr(t, "evaluate", evaluate_then_signal)
    with pytest.raises(RunInterrupted, match=r"^interrupted \(SIGTERM\) at step 0 of 5; nothing was saved "
                                             r"\(no step had finished\)$"):
        t.train()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_second_ctrl_c_aborts_the_step_at_once_and_names_the_kept_checkpoint(tmp_path, monkeypatch):
    t = trainer(tmp_path / "run", "output.save_every=1")
    signal_at_step(monkeypatch, t, 2, signal.SIGINT, signal.SIGINT)
    with pytest.raises(RunInterrupted) as info:
        t.train()
    kept = tmp_path / "run" / "checkpoints" / "step-000002"
    assert info.value.exit_code == 130 and info.value.checkpoint == kept
    assert str(info.value).startswith(f"interrupted again (SIGINT) during step 3 of 5, stopped at once; "
                                      f"the newest complete checkpoint {kept} is kept; ")
    assert sorted(p.name for p in kept.parent.iterdir()) == ["step-000001", "step-000002"]

    first = trainer(tmp_path / "first")
    signal_at_step(monkeypatch, first, 0, signal.SIGINT, signal.SIGINT)
    with pytest.raises(RunInterrupted, match="stopped at once; no checkpoint had been written, nothing to resume"):
        first.train()


def test_training_outside_the_main_thread_leaves_signals_alone(tmp_path):
    t = trainer(tmp_path / "run", "train.max_steps=1")
    summaries = []
    thread = threading.Thread(target=lambda: summaries.append(t.train()))
    thread.start()
    thread.join()
    assert len(summaries) == 1  # signal.signal() would raise ValueError outside the main thread
    assert t.step == 1


def test_ctrl_c_while_loading_the_model_exits_130_with_a_sentence(tmp_path, monkeypatch):
    import memft.train.loop as loop
    from memft.cli import app

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "load_model", interrupted)
    result = CliRunner().invoke(app, ["train", "recipes/quickstart.yaml", *TINY, "-o", str(tmp_path / "run")])
    assert result.exit_code == 130
    assert "interrupted (SIGINT) while setting up the run, before training started; nothing was saved" in result.output
    assert "Traceback" not in result.output


def test_sigterm_to_memft_train_saves_and_exits_143(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "memft.cli", "train", "recipes/quickstart.yaml", *TINY, "train.max_steps=100000",
           "-o", str(run)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "300"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    metrics = run / "metrics.jsonl"
    while proc.poll() is None and time.time() < deadline and not (metrics.exists() and metrics.read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    sentence = " ".join(err.split())
    assert "interrupted (SIGTERM) at step" in sentence and "of 100000; saved checkpoint" in sentence
    assert "`memft train recipes/quickstart.yaml" in sentence and "again resumes it" in sentence
    step = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert (run / "checkpoints" / f"step-{step:06d}" / "state.json").exists()
