"""The training loop end to end: learning, meters, exact resume after SIGKILL, NaN stop, export."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from memft import registry
from memft.errors import RunFailed
from memft.recipe import load
from memft.registry import LossOutput
from memft.train.loop import Trainer

REPO = Path(__file__).resolve().parents[1]
QUICK = ["data.max_samples=160", "data.max_length=256", "train.batch_size=8", "log.progress=false",
         "output.plot=false", "train.eval_batches=4"]


def run(tmp_path, recipe, *overrides) -> tuple[Trainer, dict]:
    trainer = Trainer(load(REPO / "recipes" / recipe, [*QUICK, *overrides]), run_dir=tmp_path / "run").setup()
    return trainer, trainer.train()


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("recipe,lr", [("quickstart.yaml", 3e-3), ("lora.yaml", 1e-2), ("qlora.yaml", 1e-2)])
def test_each_baseline_lowers_held_out_loss_of_stories260K(tmp_path, recipe, lr):
    trainer, summary = run(tmp_path, recipe, "train.max_steps=25", f"train.lr={lr}", "train.eval_every=null",
                           "data.eval_split=0.1", "train.warmup_steps=0")
    before = metrics(trainer.run_dir)[0]
    assert before["step"] == 0
    assert summary["eval_loss"] < before["eval_loss"] - 0.1, (before, summary["eval_loss"])
    if recipe != "quickstart.yaml":  # adapters: a small trainable share
        assert summary["trainable_params"] < 0.5 * summary["total_params"]
    if recipe == "qlora.yaml":
        import bitsandbytes as bnb

        assert any(isinstance(m, bnb.nn.Linear4bit) for m in trainer.model.modules())


def test_meters_keys_are_present_and_plausible(tmp_path):
    trainer, summary = run(tmp_path, "quickstart.yaml", "train.max_steps=3", "train.eval_every=null")
    steps = [m for m in metrics(trainer.run_dir) if "loss" in m]
    for m in steps:
        for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "peak_mem_bytes",
                    "step_time_s"):
            assert key in m, key
        assert m["tokens_per_s"] > 0 and m["samples_per_s"] > 0 and m["grad_norm"] > 0
        assert m["peak_mem_bytes"] > 50 * 2**20  # process peak RSS with torch loaded
    for key in ("strategies", "device", "steps", "final_loss", "eval_loss", "tokens_per_s", "peak_mem_bytes",
                "activation_bytes", "trainable_params", "total_params", "wall_time_s"):
        assert key in summary, key
    assert summary["trainable_params"] == summary["total_params"] == 260_032  # stories260K, full fine-tuning
    # a lower bound for the activations: the logits alone are B x T x V float32 values
    assert summary["activation_bytes"] > 8 * 100 * 512 * 4
    assert summary["steps"] == 3 and summary["device"].startswith("cpu")


def test_gradient_checkpointing_saves_fewer_activation_bytes_on_8_layer_model(tmp_path):
    common = ["model.name=tiny-llama", "train.max_steps=1", "output.checkpoints=false", "data.eval_split=null"]
    _, plain = run(tmp_path / "a", "full_gradient_checkpointing.yaml", *common, "train.gradient_checkpointing=false")
    _, ckpt = run(tmp_path / "b", "full_gradient_checkpointing.yaml", *common)
    assert ckpt["activation_bytes"] < 0.5 * plain["activation_bytes"]
    assert abs(ckpt["final_loss"] - plain["final_loss"]) < 1e-5  # same math, recomputed


def test_gradient_accumulation_normalises_by_tokens_of_the_whole_step(tmp_path):
    # one step of batch 8 == one step of 4 micro-batches of 2, up to float rounding
    _, big = run(tmp_path / "a", "quickstart.yaml", "train.max_steps=2", "data.shuffle=false",
                 "output.checkpoints=false")
    _, acc = run(tmp_path / "b", "quickstart.yaml", "train.max_steps=2", "data.shuffle=false",
                 "output.checkpoints=false", "train.batch_size=2", "train.grad_accum=4")
    assert acc["final_loss"] == pytest.approx(big["final_loss"], rel=1e-4)


def _train_cmd(run_dir: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "memft.cli", "train", "recipes/quickstart.yaml", *QUICK,
            f"train.max_steps={steps}", "output.save_every=3", "output.keep_last=2", "train.eval_every=10",
            "-o", str(run_dir)]


def test_sigkilled_run_resumes_to_bitwise_identical_losses(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    steps = 30  # the kill lands at step 6-7: the rest is margin for a fast machine
    straight = tmp_path / "straight"
    subprocess.run(_train_cmd(straight, steps), cwd=REPO, env=env, check=True, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(killed, steps), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step-000006").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists(), "the run finished before it could be killed"
    subprocess.run(_train_cmd(killed, steps), cwd=REPO, env=env, check=True, capture_output=True)

    a, b = metrics(straight), metrics(killed)
    assert [m["step"] for m in a] == [m["step"] for m in b]
    assert [m.get("loss") for m in a] == [m.get("loss") for m in b]  # bitwise: floats round-trip through JSON
    assert [m.get("eval_loss") for m in a] == [m.get("eval_loss") for m in b]
    wa = load_file(straight / "checkpoints" / f"step-{steps:06d}" / "trainable.safetensors")
    wb = load_file(killed / "checkpoints" / f"step-{steps:06d}" / "trainable.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


class _NanAtStep3(registry.Strategy):
    """Test-only strategy: returns a NaN loss from the fourth step on."""

    name = "nan_at_step_3"
    order = 90

    def loss(self, model, batch):
        if self._step >= 3:
            return LossOutput(torch.tensor(float("nan"), requires_grad=True), 1)
        return None

    def on_step_start(self, step, batch):
        self._step = step
        return batch


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    registry.register(_NanAtStep3)
    r = load(REPO / "recipes" / "quickstart.yaml",
             [*QUICK, "strategies=[{name: full}, {name: nan_at_step_3}]", "train.max_steps=10", "output.save_every=2"])
    trainer = Trainer(r, run_dir=tmp_path / "run").setup()
    with pytest.raises(RunFailed, match="loss became nan at step 4.*step-000002"):
        trainer.train()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000002"]


def test_export_merges_lora_into_a_standalone_hf_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from memft.export import export_run

    trainer, _ = run(tmp_path, "lora.yaml", "train.max_steps=3", "train.lr=1e-2")
    batch = trainer.batcher.batch(0, 0)
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    out = export_run(trainer.run_dir, tmp_path / "exported")
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        got = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_epochs_bf16_weights_and_8bit_adamw(tmp_path):
    # max_steps null: one epoch of 40 examples at batch 8 = 5 steps
    trainer, summary = run(tmp_path, "quickstart.yaml", "train.max_steps=null", "train.epochs=1",
                           "data.max_samples=40", "data.eval_split=null", "model.dtype=bfloat16",
                           "train.optimizer=adamw_8bit", "output.checkpoints=false")
    assert summary["steps"] == 5 and summary["dtype"] == "bfloat16"
    assert next(trainer.model.parameters()).dtype == torch.bfloat16
    assert type(trainer.optimizer).__name__ == "AdamW8bit"
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics(trainer.run_dir) if "loss" in m)


def test_classification_run_reports_eval_accuracy(tmp_path):
    trainer, summary = run(tmp_path, "classify_sst2.yaml", "train.max_steps=30", "data.max_samples=null",
                           "data.max_length=64", "train.batch_size=16", "train.eval_batches=null")
    lines = [m for m in metrics(trainer.run_dir) if "eval_accuracy" in m]
    assert lines[0]["step"] == 0 and len(lines) >= 2
    assert 0.0 <= summary["eval_accuracy"] <= 1.0
    # the accuracy is the share of correct arg-max predictions over the whole eval split
    n_eval = len(trainer.data.eval)
    assert round(summary["eval_accuracy"] * n_eval) == pytest.approx(summary["eval_accuracy"] * n_eval, abs=1e-6)
    assert summary["final_loss"] < 0.75  # two balanced classes start near ln 2 = 0.69


def test_resume_applies_the_recipes_new_learning_rate(tmp_path):
    base = [*QUICK, "train.max_steps=4", "output.save_every=2", "train.schedule=constant", "train.eval_every=null",
            "train.warmup_steps=0"]
    first = Trainer(load(REPO / "recipes" / "quickstart.yaml", [*base, "train.max_steps=2"]),
                    run_dir=tmp_path / "run").setup()
    first.train()
    again = Trainer(load(REPO / "recipes" / "quickstart.yaml", [*base, "train.lr=0.03", "train.weight_decay=0.1"]),
                    run_dir=tmp_path / "run").setup()
    assert any("`train.lr` 0.003 -> 0.03" in n for n in again.notes)
    again.train()
    lrs = [m["lr"] for m in metrics(tmp_path / "run") if "lr" in m]
    assert lrs == [0.003, 0.003, 0.03, 0.03]
    assert again.optimizer.param_groups[0]["weight_decay"] == 0.1


def test_num_labels_smaller_than_the_data_is_a_user_error(tmp_path):
    from memft.errors import UserError

    with pytest.raises(UserError, match="`model.num_labels` is 2 but the data has 3 classes"):
        r = load(REPO / "recipes" / "classify_sst2.yaml", ["model.num_labels=2", "data.source=data/gsm8k_sample.jsonl",
                                                           "data.text_field=question", "data.label_field=answer",
                                                           "data.max_samples=3"])
        Trainer(r, run_dir=tmp_path / "run").setup()
