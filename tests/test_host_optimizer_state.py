"""`train.optimizer_state: host` (`memft/train/optim.py:HostAdamW`): float32 master weights and AdamW moments in
host memory, the same updates as AdamW on the device; bf16 weights trained with float32 updates."""

import json
import threading
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


STRATEGY_RECIPES = [
    ("lcsb_full.yaml", []),
    ("tokentune.yaml", []),
    ("revffn_moe.yaml", ["strategies.1.params.recovery.steps=1", "train.optimizer=adamw"]),
    ("meft.yaml", []),
]
"""A recipe of each strategy that full weights train under, with what makes it take plain AdamW (and a short
recovery); the optimizer settings' composition tests run on each."""


@pytest.mark.parametrize("name,extra", STRATEGY_RECIPES)
def test_it_composes_with_the_strategies(tmp_path, name, extra):
    common = [*extra, "model.dtype=float64", "train.max_steps=2", "output.checkpoints=false"]
    train(tmp_path, "device", *common, recipe=name)
    host = train(tmp_path, "host", *common, *HOST, recipe=name)
    assert isinstance(host.optimizer, HostAdamW)
    assert losses(tmp_path / "device") == losses(tmp_path / "host")  # the same updates, strategy by strategy


# --- the host step overlapped with backward (`StepInBackward` with `HostAdamW` inner optimizers, on the CPU) ---

STEPS = 4


def tiny(dtype: torch.dtype) -> torch.nn.Module:
    """An embedding, a 16 -> 48 -> 40 MLP with biases: weights of several sizes, seeded (not trivial values)."""
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Embedding(40, 16), torch.nn.Linear(16, 48), torch.nn.Tanh(),
                               torch.nn.Linear(48, 40)).to(dtype)


def batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(0, 40, (2, 12), generator=gen) for _ in range(STEPS)]


def backward(model: torch.nn.Module, ids: torch.Tensor) -> None:
    logits = model(ids[:, :-1]).float()
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1)).backward()


def build(model: torch.nn.Module, state: str, in_backward: bool, overlap: bool = True):
    from memft.recipe import TrainConfig
    from memft.train.optim import build_optimizer, build_scheduler

    # lr 1e-2 with warmup then linear decay: every step has another lr, which the host step reads when it runs
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1, warmup_steps=2, schedule="linear", max_grad_norm=None,
                      optimizer_state=state, optimizer_in_backward=in_backward)
    optimizer = build_optimizer([{"params": list(model.parameters())}], cfg, torch.device("cpu"))
    if in_backward:
        optimizer.overlap_host_step = overlap
    return optimizer, build_scheduler(optimizer, cfg, STEPS)


def train_steps(model, optimizer, scheduler, steps=None) -> None:
    for ids in batches()[:steps]:
        backward(model, ids)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


def moments(optimizer, model) -> list[dict]:
    """Each weight's AdamW state, whichever optimizer holds it (a host optimizer keys it by the master)."""
    keys = optimizer.masters if isinstance(optimizer, HostAdamW) else list(model.parameters())
    return [optimizer.state[k] for k in keys]


def assert_same(a, b) -> None:
    """Nested dicts / lists / tensors: equal keys, bitwise-equal tensors."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def gate(optimizer, monkeypatch, ran_on: list[int], fail_at: int | None = None) -> threading.Event:
    """Hold every inner host step until the returned event is set; record which thread ran each."""
    opened = threading.Event()
    for i, inner in enumerate(optimizer.inner):
        def held(*args, _step=inner.host.step, _i=i, **kwargs):
            ran_on.append(threading.get_ident())
            assert opened.wait(timeout=60), "the host step was never released"
            if _i == fail_at:
                raise RuntimeError("host step failed on purpose")
            return _step(*args, **kwargs)

        monkeypatch.setattr(inner.host, "step", held)
    return opened


def autograd_threads(model) -> list[int]:
    """The threads the post-accumulate-grad hooks run on (registered after the optimizer's, so they run after it)."""
    seen = []
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda _p: seen.append(threading.get_ident()))
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_overlapped_host_step_in_backward_is_bitwise_the_ordinary_one(dtype):
    runs = {}
    variants = {"overlapped": ("host", True, True), "in the hook": ("host", True, False),
                "ordinary host": ("host", False, True), "device": ("device", False, True)}
    for name, (state, in_backward, overlap) in variants.items():
        if name == "device" and dtype == torch.bfloat16:
            continue  # device AdamW keeps bf16 moments: another update, compared in float32 only
        model = tiny(dtype)
        optimizer, scheduler = build(model, state, in_backward, overlap)
        train_steps(model, optimizer, scheduler)
        runs[name] = (model, optimizer)
    model, optimizer = runs["overlapped"]
    assert optimizer.overlap_host_step and all(isinstance(o, HostAdamW) for o in optimizer.inner)
    assert not torch.equal(model[1].weight, tiny(dtype)[1].weight)  # it did train
    for name, (other, other_optimizer) in runs.items():
        assert_same(list(model.parameters()), list(other.parameters()))
        assert_same(moments(optimizer, model), moments(other_optimizer, other))
    masters = [m for o in optimizer.inner for m in o.masters]
    assert_same(masters, runs["ordinary host"][1].masters)
    assert all(p.grad is None for p in model.parameters())


def test_a_state_dict_taken_right_after_backward_waits_for_the_host_steps(monkeypatch):
    model, reference = tiny(torch.float32), tiny(torch.float32)
    optimizer, scheduler = build(model, "host", True)
    ref_optimizer, ref_scheduler = build(reference, "host", True, overlap=False)
    train_steps(model, optimizer, scheduler, steps=2)
    train_steps(reference, ref_optimizer, ref_scheduler, steps=2)
    opened = gate(optimizer, monkeypatch, [])
    backward(model, batches()[2])
    backward(reference, batches()[2])
    ref_optimizer.step()
    threading.Timer(0.2, opened.set).start()  # no host step of this backward has finished when state_dict asks
    state = optimizer.state_dict()
    assert_same(state, ref_optimizer.state_dict())
    assert_same(list(model.parameters()), list(reference.parameters()))


def test_the_hook_hands_the_host_step_to_the_worker_and_returns(monkeypatch):
    model = tiny(torch.float32)
    optimizer, scheduler = build(model, "host", True)
    train_steps(model, optimizer, scheduler, steps=1)  # past warmup's lr 0
    before = [p.detach().clone() for p in model.parameters()]
    ran_on = []
    opened = gate(optimizer, monkeypatch, ran_on)
    hooks_ran_on = autograd_threads(model)
    backward(model, batches()[1])  # would wait 60 s and fail if a hook waited for its step
    # every gradient has been handed over and freed, and no step has finished: the weights are as they were
    assert len(hooks_ran_on) == len(before)
    assert all(p.grad is None for p in model.parameters())
    assert_same(list(model.parameters()), before)
    opened.set()
    optimizer.step()
    assert len(ran_on) == len(before) and not set(ran_on) & set(hooks_ran_on)  # the worker ran them, not autograd
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))

    # the private switch steps inside the hook instead: on the autograd thread
    optimizer.overlap_host_step, ran_on[:] = False, []
    hooks_ran_on.clear()
    backward(model, batches()[2])
    assert set(ran_on) == set(hooks_ran_on)


def test_a_failed_host_step_is_raised_by_step(monkeypatch):
    model = tiny(torch.float32)
    optimizer, scheduler = build(model, "host", True)
    opened = gate(optimizer, monkeypatch, [], fail_at=1)
    opened.set()
    backward(model, batches()[0])  # backward itself goes through
    with pytest.raises(RuntimeError, match="host step failed on purpose"):
        optimizer.step()
    optimizer.step()  # raised once: the next wait has nothing to report


def test_the_host_step_overlaps_backward_by_default_on_a_gpu_only():
    from memft.recipe import TrainConfig
    from memft.train.optim import build_optimizer

    cfg = TrainConfig(max_grad_norm=None, optimizer_state="host", optimizer_in_backward=True)
    on = {device: build_optimizer([{"params": list(tiny(torch.float32).parameters())}], cfg,
                                  torch.device(device)).overlap_host_step for device in ("cpu", "cuda")}
    assert on == {"cpu": False, "cuda": True}
