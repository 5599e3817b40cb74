"""The CLI through its real entry point (a subprocess running `python -m memft.cli`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def memft(*args, cwd=REPO, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "memft.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_help_lists_commands_with_examples():
    out = memft("--help")
    assert out.returncode == 0
    for cmd in ("train", "validate", "recipes", "schema", "bench", "export"):
        assert cmd in out.stdout
    sub = memft("train", "--help")
    assert sub.returncode == 0 and "memft train recipes/lora.yaml train.lr=1e-4" in sub.stdout


def test_validate_ok_and_user_errors_exit_2_without_traceback(tmp_path):
    ok = memft("validate", "recipes/lora.yaml", "strategies.0.params.r=4")
    assert ok.returncode == 0 and "is valid" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  nme: x\nstrategies:\n  - name: lorra\n")
    out = memft("validate", bad)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "did you mean `name`" in out.stderr and "did you mean `lora`" in out.stderr
    missing = memft("train", tmp_path / "absent.yaml")
    assert missing.returncode == 2 and "no such recipe file" in missing.stderr and "Traceback" not in missing.stderr
    usage = memft("train")  # Typer's own usage error
    assert usage.returncode == 2


def test_recipes_and_schema():
    out = memft("recipes")
    assert out.returncode == 0
    assert "quickstart.yaml" in out.stdout and "stories260K" in out.stdout and "tiny-mixtral" in out.stdout
    out = memft("schema")
    assert out.returncode == 0
    for field in ("train.gradient_checkpointing", "data.max_length", "target_experts", "quant_type"):
        assert field in out.stdout
    # piped: one line per field, tab-separated, nothing wrapped
    rows = {line.split("\t")[0]: line.split("\t") for line in out.stdout.splitlines() if "\t" in line}
    assert rows["data.max_length"][1:3] == ["int", "256"] and len(rows["train.precision"]) == 4
    assert len(out.stdout.splitlines()) < 250


def test_dry_run_prints_plan_without_training(tmp_path):
    out = memft("train", "recipes/lora.yaml", "-o", tmp_path / "run", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "trainable" in out.stdout and "lora: adapters on" in out.stdout
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_moe_lora_plan_says_whether_experts_are_covered(tmp_path):
    out = memft("train", "recipes/bench_moe.yaml", "strategies=[{name: lora, params: {target_experts: false}}]",
                "-o", tmp_path / "r", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "routed expert weights are NOT adapted" in out.stdout
    out = memft("train", "recipes/bench_moe.yaml", "strategies=[{name: lora, params: {target_experts: true}}]",
                "-o", tmp_path / "r", "--dry-run")
    assert "routed expert weights ARE adapted" in out.stdout


def test_train_writes_metrics_summary_plot_and_checkpoint(tmp_path):
    run = tmp_path / "run"
    out = memft("train", "recipes/quickstart.yaml", "train.max_steps=4", "train.eval_every=2",
                "data.max_samples=64", "-o", run)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2, 3, 4]
    assert [x["step"] for x in lines if "eval_loss" in x] == [0, 2, 4]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["strategies"] == ["full"]
    assert (run / "loss_memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "checkpoints" / "step-000004" / "trainable.safetensors").exists()
    assert "Done" in out.stdout


def test_resume_never_refuses_an_existing_run(tmp_path):
    run = tmp_path / "run"
    args = ("train", "recipes/quickstart.yaml", "train.max_steps=1", "data.max_samples=32", "-o", run)
    assert memft(*args).returncode == 0
    again = memft(*args, "output.resume=never")
    assert again.returncode == 2 and "output.resume=auto" in again.stderr
    finished = memft(*args)  # resume: auto on a finished run does nothing and reports the summary
    assert finished.returncode == 0 and "the run already finished" in finished.stdout


def test_bench_prints_ratio_table_and_json(tmp_path):
    out_json = tmp_path / "bench.json"
    out = memft("bench", "recipes/bench_moe.yaml", "--variants", "full;lora;full,gradient_checkpointing",
                "--steps", "2", "--json", out_json, "data.max_length=128", "data.max_samples=64")
    assert out.returncode == 0, out.stderr
    assert "1.00x" in out.stdout and "activation bytes" in out.stdout
    rows = json.loads(out_json.read_text())
    assert [r["variant"] for r in rows] == ["full", "lora", "full,gradient_checkpointing"]
    full, lora, ckpt = rows
    assert lora["trainable_params"] < full["trainable_params"]
    assert ckpt["activation_bytes"] < full["activation_bytes"]


def test_bench_rejects_unknown_variant_item():
    out = memft("bench", "recipes/bench_moe.yaml", "--variants", "full;lroa")
    assert out.returncode == 2 and "`lroa` is neither a strategy" in out.stderr


@pytest.mark.parametrize("cmd", ["train", "validate", "bench", "export", "recipes", "schema"])
def test_every_command_has_help(cmd):
    out = memft(cmd, "--help")
    assert out.returncode == 0 and "Example" in out.stdout


# --- the run directory: checked before the model is loaded ---------------------------------------------------


def _train_in_process(monkeypatch, *args):
    """`memft train` through CliRunner, with model loading made to fail loudly: the checks must come first."""
    from typer.testing import CliRunner

    import memft.train.loop as loop
    from memft.cli import app

    def no_model(*_, **__):
        raise AssertionError("the model was loaded before the run directory was checked")

    monkeypatch.setattr(loop, "load_model", no_model)
    return CliRunner().invoke(app, ["train", "recipes/quickstart.yaml", "data.max_samples=16", *map(str, args)])


def _text(result) -> str:
    """The output with rich's line wrapping undone."""
    return " ".join(result.output.split())


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]], ids=["train", "dry-run"])
def test_output_dir_that_is_a_file_or_under_a_file_exits_2_before_loading(tmp_path, monkeypatch, dry_run):
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    out = _train_in_process(monkeypatch, "-o", afile, *dry_run)
    assert out.exit_code == 2, out.output
    assert f"error: `output.dir` {afile} is a file, not a directory" in _text(out) and "Traceback" not in out.output
    under = _train_in_process(monkeypatch, "-o", afile / "run", *dry_run)
    assert under.exit_code == 2, under.output
    assert f"`output.dir` {afile / 'run'} cannot be created: {afile} is a file" in _text(under)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_output_dir_in_a_read_only_folder_exits_2_before_loading(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        out = _train_in_process(monkeypatch, "-o", locked / "run")
    finally:
        locked.chmod(0o700)
    assert out.exit_code == 2, out.output
    assert f"`output.dir` {locked / 'run'} is not writable (permission denied on {locked})" in _text(out)


def test_an_os_error_is_one_sentence_and_exit_2(tmp_path, monkeypatch):
    import memft.train.loop as loop

    def denied(self, progress=None):
        raise PermissionError(13, "Permission denied", str(tmp_path / "run" / "metrics.jsonl"))

    monkeypatch.setattr(loop.Trainer, "train", denied)
    from typer.testing import CliRunner

    from memft.cli import app

    out = CliRunner().invoke(app, ["train", "recipes/quickstart.yaml", "data.max_samples=16", "train.max_steps=1",
                                   "log.progress=false", "-o", str(tmp_path / "run")])
    assert out.exit_code == 2
    assert f"error: {tmp_path / 'run' / 'metrics.jsonl'}: Permission denied" in _text(out)
    assert "Traceback" not in out.output
