"""`train.optimizer_state: host` (`memft/train/optim.py:HostAdamW`): float32 master weights and AdamW moments in
host memory, the same updates as AdamW on the device; bf16 weights trained with float32 updates."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from memft.errors import RecipeError
from memft.recipe import load
from memft.train.loop import Trainer
from memft.train.optim import HostAdamW

REPO = Path(__file__).resolve().parents[1]
HOST = ["train.optimizer_state=host"]
QUICK = ["data.max_samples=48", "data.max_length=128", "train.batch_size=8", "log.progress=false",
         "output.plot=false", "data.eval_split=null", "train.warmup_steps=1", "output.save_every=1"]


def losses(run: Path) -> list[float]:
    return [m["loss"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in m]


def final(run: Path, step: int) -> dict:
    return load_file(run / "checkpoints" / f"step-{step:06d}" / "trainable.safetensors")


def train(tmp_path: Path, name: str, *extra: str, recipe: str = "quickstart.yaml") -> Trainer:
    trainer = Trainer(load(REPO / "recipes" / recipe, [*QUICK, *extra]), run_dir=tmp_path / name).setup()
    trainer.train()
    return trainer


@pytest.mark.parametrize("recipe,extra", [
    ("quickstart.yaml", ["model.name=tiny-llama", "model.dtype=float64"]),
    ("lora.yaml", ["model.name=tiny-mixtral", "model.dtype=float64"]),
])
def test_the_same_updates_as_adamw_on_the_device(tmp_path, recipe, extra):
    common = [*extra, "train.max_steps=3"]
    train(tmp_path, "device", *common, recipe=recipe)
    host = train(tmp_path, "host", *common, *HOST, recipe=recipe)
    assert isinstance(host.optimizer, HostAdamW)
    assert losses(tmp_path / "device") == losses(tmp_path / "host")
    a, b = final(tmp_path / "device", 3), final(tmp_path / "host", 3)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "host")[-1] != losses(tmp_path / "host")[0]


def test_bf16_weights_follow_their_float32_masters(tmp_path):
    trainer = train(tmp_path, "host", "model.dtype=bfloat16", "train.max_steps=3", *HOST)
    weights = [p for p in trainer.model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.bfloat16 for p in weights)
    assert all(m.dtype == torch.float32 for m in trainer.optimizer.masters)
    assert all(torch.equal(p, m.to(torch.bfloat16)) for p, m in zip(weights, trainer.optimizer.masters))
    # the moments are the host optimizer's, float32, one pair per weight
    assert all(s["exp_avg"].dtype == torch.float32 for s in trainer.optimizer.state.values())
    assert len(trainer.optimizer.state) == len(weights)


def test_bf16_training_follows_float32_on_stories260K(tmp_path):
    extra = ["data.max_samples=160", "data.max_length=256", "train.max_steps=30", "train.lr=3e-3",
             "train.warmup_steps=0", "output.checkpoints=false"]
    train(tmp_path, "float32", *extra)
    train(tmp_path, "host", *extra, "model.dtype=bfloat16", *HOST)
    ref, got = losses(tmp_path / "float32"), losses(tmp_path / "host")
    assert got[-1] < got[0] - 0.5
    for a, b in zip(got[-10:], ref[-10:]):
        assert a == pytest.approx(b, rel=0.02)


@pytest.mark.parametrize("in_backward", [[], ["train.optimizer_in_backward=true", "train.max_grad_norm=null"]])
def test_stop_and_resume_is_bitwise_equal(tmp_path, in_backward):
    extra = ["model.dtype=bfloat16", *HOST, *in_backward]
    train(tmp_path, "straight", *extra, "train.max_steps=4")
    train(tmp_path, "split", *extra, "train.max_steps=2")
    train(tmp_path, "split", *extra, "train.max_steps=4")
    assert losses(tmp_path / "straight") == losses(tmp_path / "split")
    a, b = final(tmp_path / "straight", 4), final(tmp_path / "split", 4)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_with_the_step_in_backward_the_same_updates_and_one_layers_gradients(tmp_path):
    common = ["model.name=tiny-llama", "model.dtype=float64", "train.max_steps=3", "train.max_grad_norm=null", *HOST]
    train(tmp_path, "host", *common)
    inside = train(tmp_path, "in", *common, "train.optimizer_in_backward=true")
    assert all(isinstance(o, HostAdamW) for o in inside.optimizer.inner)
    assert losses(tmp_path / "host") == losses(tmp_path / "in")
    a, b = final(tmp_path / "host", 3), final(tmp_path / "in", 3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(p.grad is None for p in inside.model.parameters())


@pytest.mark.parametrize("extra,says", [
    (["train.optimizer=adamw_8bit"], "`train.optimizer: adamw_8bit`"),
    (["model.dtype=bfloat16", "train.precision=bf16_stochastic_rounding"], "`train.precision"),
])
def test_what_replaces_the_host_step_is_refused(extra, says):
    with pytest.raises(RecipeError, match="optimizer_state: host") as info:
        load(REPO / "recipes" / "quickstart.yaml", [*HOST, *extra])
    assert says in str(info.value)


def test_profile_moves_the_state_to_the_host_exactly(tmp_path):
    from memft.models.load import resolve_config
    from memft.profile import predict

    trainer = train(tmp_path, "host", "model.dtype=bfloat16", "train.max_steps=1", *HOST)
    r = trainer.recipe
    skeleton, built, quantized = predict.skeleton(r, resolve_config(r.model).config)
    states = predict.state_bytes(skeleton, quantized, r, double_quant=False)
    opt = trainer.optimizer
    measured = (sum(m.numel() * m.element_size() for m in opt.masters)
                + sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()))
    assert states["optimizer_state"] == 0
    assert states["host"] == {"optimizer state (host)": measured}


@pytest.mark.parametrize("name,extra", [
    ("lcsb_full.yaml", []),
    ("tokentune.yaml", []),
    ("revffn_moe.yaml", ["strategies.1.params.recovery.steps=1", "train.optimizer=adamw"]),
    ("meft.yaml", []),
])
def test_it_composes_with_the_strategies(tmp_path, name, extra):
    common = [*extra, "model.dtype=float64", "train.max_steps=2", "output.checkpoints=false"]
    train(tmp_path, "device", *common, recipe=name)
    host = train(tmp_path, "host", *common, *HOST, recipe=name)
    assert isinstance(host.optimizer, HostAdamW)
    assert losses(tmp_path / "device") == losses(tmp_path / "host")  # the same updates, strategy by strategy
