"""`train.precision: bf16_stochastic_rounding` (`memft/train/optim.py`): bf16 weights whose small updates survive.

The reference is torch's AdamW (the same formula in float32 / float64), and float32 training of stories260K."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_host_optimizer_state import STRATEGY_RECIPES

from memft.errors import RecipeError
from memft.recipe import load
from memft.train import optim
from memft.train.loop import Trainer
from memft.train.optim import StochasticRoundingAdamW, stochastic_round_to_bf16

REPO = Path(__file__).resolve().parents[1]
SR = ["model.dtype=bfloat16", "train.precision=bf16_stochastic_rounding"]
QUICK = ["data.max_samples=160", "data.max_length=256", "train.batch_size=8", "log.progress=false",
         "output.plot=false", "data.eval_split=0.1", "train.eval_batches=4", "train.eval_every=null"]


def losses(run: Path) -> list[float]:
    return [m["loss"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in m]


def test_rounding_is_unbiased_and_lands_on_the_two_neighbours():
    gen = torch.Generator().manual_seed(0)
    below = torch.tensor([1.0, -3.0, 1e-20, 448.0], dtype=torch.bfloat16)
    above = torch.nextafter(below, below.sign() * torch.tensor(float("inf"), dtype=torch.bfloat16))
    frac = torch.tensor([0.3, 0.9, 0.5, 0.01])
    x = below.float() + frac * (above.float() - below.float())  # float32 values between bf16 neighbours
    n = 40_000
    draws = stochastic_round_to_bf16(x.expand(n, -1).contiguous(), gen)
    assert ((draws == below) | (draws == above)).all()
    p_up = (draws == above).double().mean(0)
    sigma = (frac * (1 - frac) / n).sqrt().double()
    assert ((p_up - frac.double()).abs() < 5 * sigma + 1e-12).all(), (p_up, frac)  # P(up) = distance fraction
    exact = torch.randn(1000).bfloat16()
    assert torch.equal(stochastic_round_to_bf16(exact.float(), gen), exact)  # a bf16 value stays itself
    # round-to-nearest would give `below` for every fraction under 0.5: a biased result
    assert torch.equal(x[:1].bfloat16(), below[:1])


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 0.0), (torch.float32, 1e-6)])
def test_non_bf16_weights_get_torchs_adamw_exactly(dtype, tol):
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(9, 7, dtype=dtype)), torch.nn.Parameter(torch.randn(5, dtype=dtype))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    a = StochasticRoundingAdamW(ours, lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    b = torch.optim.AdamW(theirs, lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1, foreach=False)
    for _ in range(5):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol)
        assert not torch.equal(p, torch.zeros_like(p))


def test_updates_below_half_a_bf16_step_survive_on_average(monkeypatch):
    monkeypatch.setattr(optim, "UPDATE_CHUNK", 1000)  # several chunks per weight
    steps, lr = 40, 1e-4  # each AdamW update is ~lr; bf16's step at 1.0 is 2**-7 = 0.0078
    weights = {name: torch.nn.Parameter(torch.ones(5000, dtype=dtype))
               for name, dtype in (("plain bf16", torch.bfloat16), ("stochastic", torch.bfloat16),
                                   ("float32", torch.float32))}
    opts = {"plain bf16": torch.optim.AdamW([weights["plain bf16"]], lr=lr, weight_decay=0),
            "stochastic": StochasticRoundingAdamW([weights["stochastic"]], lr=lr, weight_decay=0, seed=3),
            "float32": torch.optim.AdamW([weights["float32"]], lr=lr, weight_decay=0, foreach=False)}
    for _ in range(steps):
        for name, w in weights.items():
            w.grad = -torch.ones_like(w)
            opts[name].step()
    target = weights["float32"].mean().item()  # 1 + steps * lr
    assert target == pytest.approx(1 + steps * lr, rel=1e-5)
    assert torch.equal(weights["plain bf16"], torch.ones_like(weights["plain bf16"]))  # every update rounded away
    got = weights["stochastic"].double()
    assert got.mean().item() == pytest.approx(target, abs=4 * 2**-7 / 5000**0.5)
    assert opts["stochastic"].state[weights["stochastic"]]["exp_avg"].dtype == torch.bfloat16  # 4 bytes of state


def test_refused_without_bf16_weights_or_with_8bit_adamw():
    with pytest.raises(RecipeError, match="model.dtype: bfloat16"):
        load(REPO / "recipes" / "quickstart.yaml", ["train.precision=bf16_stochastic_rounding"])
    with pytest.raises(RecipeError, match="optimizer: adamw"):
        load(REPO / "recipes" / "quickstart.yaml", [*SR, "train.optimizer=adamw_8bit"])


def test_bf16_training_follows_float32_on_stories260K(tmp_path):
    extra = ["train.max_steps=30", "train.lr=3e-3", "train.warmup_steps=0", "output.checkpoints=false"]
    runs = {"float32": [], "sr": SR}
    for name, more in runs.items():
        trainer = Trainer(load(REPO / "recipes" / "quickstart.yaml", [*QUICK, *extra, *more]), run_dir=tmp_path / name)
        trainer.setup().train()
        if name == "sr":
            assert isinstance(trainer.optimizer, StochasticRoundingAdamW)
            assert next(trainer.model.parameters()).dtype == torch.bfloat16
    curves = {name: losses(tmp_path / name) for name in runs}
    assert curves["sr"][-1] < curves["sr"][0] - 0.5  # it learns
    for a, b in zip(curves["sr"][-10:], curves["float32"][-10:]):
        assert a == pytest.approx(b, rel=0.02)  # within 2% of float32 training, step by step


def test_stop_and_resume_and_step_in_backward_are_bitwise_equal(tmp_path):
    extra = [*QUICK, *SR, "train.warmup_steps=1", "train.max_grad_norm=null", "output.save_every=1"]
    recipe = lambda *more: load(REPO / "recipes" / "quickstart.yaml", [*extra, *more])  # noqa: E731
    Trainer(recipe("train.max_steps=4"), run_dir=tmp_path / "straight").setup().train()
    Trainer(recipe("train.max_steps=2"), run_dir=tmp_path / "split").setup().train()
    Trainer(recipe("train.max_steps=4"), run_dir=tmp_path / "split").setup().train()
    Trainer(recipe("train.max_steps=4", "train.optimizer_in_backward=true"), run_dir=tmp_path / "in").setup().train()
    final = {name: load_file(tmp_path / name / "checkpoints" / "step-000004" / "trainable.safetensors")
             for name in ("straight", "split", "in")}
    assert losses(tmp_path / "straight") == losses(tmp_path / "split") == losses(tmp_path / "in")
    for name in ("split", "in"):
        assert all(torch.equal(final["straight"][k], final[name][k]) for k in final["straight"])
    assert all(v.dtype == torch.bfloat16 for v in final["straight"].values())


@pytest.mark.parametrize("name,extra", STRATEGY_RECIPES)
def test_it_composes_with_the_strategies(tmp_path, name, extra):
    overrides = [*QUICK, *SR, *extra, "data.max_samples=48", "train.max_steps=3", "output.checkpoints=false"]
    trainer = Trainer(load(REPO / "recipes" / name, overrides), run_dir=tmp_path / "run").setup()
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert isinstance(trainer.optimizer, StochasticRoundingAdamW)
    curve = losses(tmp_path / "run")
    assert len(curve) == 3 and all(math.isfinite(x) for x in curve)
    after = dict(trainer.model.named_parameters())
    moved = [n for n, p in before.items() if not torch.equal(p, after[n].detach())]
    assert moved and all(after[n].dtype == torch.bfloat16 for n in moved if "meft" not in n)


def test_float32_adapters_on_a_bf16_model_train_as_with_torchs_adamw(tmp_path):
    # LoRA's factors are float32 (peft's autocast_adapter_dtype): the stochastic-rounding optimizer is torch's AdamW,
    # up to the last bits of torch's fused kernel (which the plain run uses), which the bf16 forward then carries
    overrides = [*QUICK, "model.dtype=bfloat16", "data.max_samples=48", "train.max_steps=3", "output.save_every=3"]
    for name, more in (("plain", []), ("sr", ["train.precision=bf16_stochastic_rounding"])):
        Trainer(load(REPO / "recipes" / "lora.yaml", [*overrides, *more]), run_dir=tmp_path / name).setup().train()
    a, b = (load_file(tmp_path / n / "checkpoints" / "step-000003" / "trainable.safetensors") for n in ("plain", "sr"))
    assert a.keys() == b.keys() and all(v.dtype == torch.float32 for v in a.values())
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=2e-5)
    assert losses(tmp_path / "plain") == pytest.approx(losses(tmp_path / "sr"), rel=1e-4)
