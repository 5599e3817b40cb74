"""`train.optimizer_in_backward` (`memft/train/optim.py:StepInBackward`): the same updates as the ordinary step,
without the model's gradients ever existing together; refused where it cannot be the same."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from memft.errors import RecipeError
from memft.recipe import load
from memft.train import optim
from memft.train.loop import Trainer

REPO = Path(__file__).resolve().parents[1]
COMMON = ["data.max_samples=16", "train.batch_size=4", "data.max_length=64", "data.eval_split=null",
          "log.progress=false", "output.plot=false", "train.max_grad_norm=null", "train.warmup_steps=1",
          "train.max_steps=3", "output.save_every=1"]


def recipe(*extra: str, name: str = "quickstart.yaml"):
    return load(REPO / "recipes" / name, [*COMMON, *extra])


def metrics(run: Path) -> list[dict]:
    return [m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in m]


def weights(run: Path, step: int) -> dict:
    return load_file(run / "checkpoints" / f"step-{step:06d}" / "trainable.safetensors")


CASES = {  # (recipe, overrides, tolerance)
    "full, float64": ("quickstart.yaml", ["model.name=tiny-llama", "model.dtype=float64"], 1e-12),
    "lora on MoE experts, float64": ("lora.yaml", ["model.name=tiny-mixtral", "model.dtype=float64",
                                                   "strategies=[{name: lora, params: {r: 4, alpha: 8}}]"], 1e-12),
    "qlora, 8-bit AdamW": ("qlora.yaml", ["model.name=tiny-qwen2-moe", "train.optimizer=adamw_8bit",
                                           "strategies=[{name: qlora, params: {r: 4, alpha: 8}}]"], 1e-6),
    "full + tokentune": ("tokentune.yaml", ["model.name=tiny-llama", "model.dtype=float64"], 1e-12),
    "full + revffn on MoE, recovery then task, with the router loss": (
        "revffn_moe.yaml", ["model.dtype=float64", "train.optimizer=adamw", "strategies.1.params.recovery.steps=2"],
        1e-12),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_same_updates_as_the_ordinary_step(tmp_path, case):
    name, extra, tol = CASES[case]
    Trainer(recipe(*extra, name=name), run_dir=tmp_path / "plain").setup().train()
    t = Trainer(recipe(*extra, "train.optimizer_in_backward=true", name=name), run_dir=tmp_path / "in").setup()
    assert isinstance(t.optimizer, optim.StepInBackward)
    t.train()
    plain, inside = metrics(tmp_path / "plain"), metrics(tmp_path / "in")
    for a, b in zip(plain, inside):
        assert b["loss"] == pytest.approx(a["loss"], rel=tol)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=max(tol, 1e-9))  # the norm is still measured
    assert inside[-1]["loss"] != inside[0]["loss"]  # the weights did train
    wa, wb = weights(tmp_path / "plain", 3), weights(tmp_path / "in", 3)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=tol, atol=tol)


def test_gradients_never_exist_together(tmp_path, monkeypatch):
    t = Trainer(recipe("model.name=tiny-llama", "train.optimizer_in_backward=true"), run_dir=tmp_path).setup()
    trainable = [p for p in t.model.parameters() if p.requires_grad]
    alive = []
    for inner in t.optimizer.inner:
        step = inner.step

        def counted(*args, _step=step, **kwargs):
            alive.append(sum(p.grad.numel() for p in trainable if p.grad is not None))
            return _step(*args, **kwargs)

        monkeypatch.setattr(inner, "step", counted)
    t.train()
    total = sum(p.numel() for p in trainable)
    assert len(alive) == 3 * len(trainable)  # every parameter stepped once per step
    assert max(alive) <= max(p.numel() for p in trainable)  # each gradient freed before the next one completes
    assert max(alive) < total / 4
    assert all(p.grad is None for p in trainable)


def test_stop_and_resume_is_bitwise_equal(tmp_path):
    extra = ["model.name=tiny-llama", "train.optimizer_in_backward=true", "train.seed=2", "data.shuffle=true"]
    Trainer(recipe(*extra, "train.max_steps=4"), run_dir=tmp_path / "straight").setup().train()
    Trainer(recipe(*extra, "train.max_steps=2"), run_dir=tmp_path / "split").setup().train()
    resumed = Trainer(recipe(*extra, "train.max_steps=4"), run_dir=tmp_path / "split").setup()
    assert resumed.step == 2
    # `state` reads as one optimizer's after loading: every trainable parameter's moments, after 2 steps
    trainable = [p for p in resumed.model.parameters() if p.requires_grad]
    assert len(resumed.optimizer.state) == len(trainable)
    assert all(float(resumed.optimizer.state[p]["step"]) == 2 and resumed.optimizer.state[p]["exp_avg"].any()
               for p in trainable)
    resumed.train()
    assert [m["loss"] for m in metrics(tmp_path / "straight")] == [m["loss"] for m in metrics(tmp_path / "split")]
    wa, wb = weights(tmp_path / "straight", 4), weights(tmp_path / "split", 4)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("extra,says", [
    (["train.grad_accum=2"], ["`train.grad_accum: 1`", "accumulate"]),
    (["train.max_grad_norm=1.0"], ["`train.max_grad_norm: null`", "global gradient norm"]),
    (["strategies=[{name: full}, {name: lcsb}]"], ["lcsb", "after backward"]),
    (["strategies=[{name: meft}]"], ["meft", "host AdamW"]),
])
def test_what_needs_every_gradient_first_is_refused_at_validate(extra, says):
    overrides = [o for o in COMMON if not (o.startswith("train.max_grad_norm") and "max_grad_norm" in str(extra))]
    with pytest.raises(RecipeError) as refused:
        load(REPO / "recipes" / "quickstart.yaml", [*overrides, "train.optimizer_in_backward=true", *extra])
    message = str(refused.value)
    assert "optimizer_in_backward" in message
    for word in says:
        assert word in message, message


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_adamw_is_torch_fused_kernel_on_the_cpu_and_equals_foreach(dtype):
    cfg = recipe("model.name=tiny-llama", "train.weight_decay=0.1").train
    params = [torch.nn.Parameter(torch.randn(37, 5, dtype=dtype)), torch.nn.Parameter(torch.randn(11, dtype=dtype))]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fused = optim.build_optimizer([{"params": params}], cfg, torch.device("cpu"))
    assert fused.defaults["fused"] is True
    plain = torch.optim.AdamW(twins, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, foreach=True)
    for _ in range(4):
        grads = [torch.randn_like(p) for p in params]
        for p, q, g in zip(params, twins, grads):
            p.grad, q.grad = g.clone(), g.clone()
        fused.step()
        plain.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=0 if dtype == torch.float64 else 1e-6, atol=0 if dtype == torch.float64
                                   else 1e-7)
    assert not torch.equal(params[0], torch.zeros_like(params[0]))
