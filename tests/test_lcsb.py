"""LCSB: exact against a naive stop-gradient reference, plain training when G=1, fewer saved activations,
the optimizer's momentum updates, schedules and partitions, resume, and each recipe end to end."""

import json
from pathlib import Path

import pytest
import torch

from memft.errors import RecipeError, UserError
from memft.models.blocks import layer_stack
from memft.recipe import load
from memft.strategies.lcsb import Lcsb, LcsbParams, partition_layers
from memft.train.loop import Trainer, default_loss
from memft.train.meters import SavedTensorMeter

REPO = Path(__file__).resolve().parents[1]
SMALL = ["data.max_samples=16", "data.max_length=256", "train.batch_size=4", "data.eval_split=null",
         "log.progress=false", "output.plot=false"]
MINILM = ["model.name=all-MiniLM-L6-v2", "model.task=sequence_classification", "data.format=classification",
          "data.source=recipes/data/tiny_sst2.tsv", "data.text_field=sentence", "data.label_field=label",
          "data.max_length=32"]
CLASSIFY = MINILM[1:]  # the same SST-2 sample on stories260K


def build(strategies: str, *overrides: str, run_dir="unused", for_training=False) -> Trainer:
    r = load(REPO / "recipes" / "lcsb_lora.yaml", [f"strategies={strategies}", *SMALL, *overrides])
    return Trainer(r, run_dir=run_dir).setup(for_training=for_training)


def randomize_lora_b(model) -> None:
    """LoRA's B starts at zero, which would make adapter gradients trivial; fill it deterministically."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.05)


def lcsb_of(trainer) -> Lcsb:
    return next(s for s in trainer.strategies if s.name == "lcsb")


def forward_backward(trainer, batch, step: int, meter: bool = False):
    """One micro-batch as the loop runs it: hooks, forward (metered), backward. Returns (loss, bytes)."""
    for s in trainer.strategies:
        batch = s.on_step_start(step, batch)
    with SavedTensorMeter(trainer.model) if meter else torch.enable_grad() as m:
        out = default_loss(trainer.model, batch, trainer.recipe.model.task)
    loss = out.loss_sum / out.count
    loss.backward()
    return loss.detach(), (m.bytes if meter else None)


def naive_reference(trainer, batch, selected: set[int], rounding_free: bool = False):
    """Loss of plain autograd in which every unselected layer returns `h + (out - h).detach()` (forward hooks).

    `rounding_free` writes the same function as `out.detach() + (h - h.detach())`: equal in exact arithmetic, but its
    forward is `out` bit for bit, where `h + (out - h)` rounds by up to an ulp of `h` per skipped layer.
    """
    def stop_gradient(module, args, out):
        h = args[0]
        return out.detach() + (h - h.detach()) if rounding_free else h + (out - h).detach()

    hooks = [layer.register_forward_hook(stop_gradient)
             for i, layer in enumerate(layer_stack(trainer.model)) if i not in selected]
    try:
        return forward_backward(trainer, batch, 0, meter=True)
    finally:
        for h in hooks:
            h.remove()


def assert_same_start(a, b) -> None:
    pa, pb = dict(a.model.named_parameters()), dict(b.model.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


def trainable_grads(trainer) -> dict:
    return {n: p.grad for n, p in trainer.model.named_parameters() if p.requires_grad}


def layer_of(name: str) -> int | None:
    for part in (".layers.", ".layer."):
        if part in name:
            return int(name.split(part)[1].split(".")[0])
    return None


# ---------------------------------------------------------------------- exactness

CASES = [  # (id, base strategy, lcsb params, model/dtype overrides, tolerance)
    ("llama-lora-f32", "{name: lora, params: {r: 4, alpha: 8}}", "{groups: 4}", ["model.name=tiny-llama"], 1e-5),
    ("llama-lora-f32-strided", "{name: lora, params: {r: 4, alpha: 8}}", "{groups: 3, partition: strided}",
     ["model.name=tiny-llama"], 1e-5),
    ("llama-full-f32", "{name: full}", "{groups: 4}", ["model.name=tiny-llama"], 1e-5),
    ("llama-qlora-f32", "{name: qlora, params: {r: 4, alpha: 8}}", "{groups: 4}", ["model.name=tiny-llama"], 1e-5),
    # float64: transformers' RMSNorm computes in float32 even in a float64 model, so ~1e-7 is the floor
    ("llama-full-f64", "{name: full}", "{groups: 4}", ["model.name=tiny-llama", "model.dtype=float64"], 1e-7),
    ("stories-lora-f64", "{name: lora, params: {r: 4, alpha: 8}}", "{groups: 2}", ["model.dtype=float64"], 1e-7),
    ("mixtral-lora-f64", "{name: lora, params: {r: 4, alpha: 8, target_experts: true}}", "{groups: 2}",
     ["model.name=tiny-mixtral", "model.dtype=float64"], 1e-7),
    ("qwen2moe-full-f64", "{name: full}", "{groups: 2, partition: strided}",
     ["model.name=tiny-qwen2-moe", "model.dtype=float64"], 1e-7),
    ("olmoe-lora-f64", "{name: lora, params: {r: 4, alpha: 8, target_experts: true}}", "{groups: 4}",
     ["model.name=tiny-olmoe", "model.dtype=float64"], 1e-7),
    ("minilm-full-f64", "{name: full}", "{groups: 3}", [*MINILM, "model.dtype=float64"], 1e-9),
    ("minilm-lora-f64", "{name: lora, params: {r: 4, alpha: 8}}", "{groups: 3, partition: strided}",
     [*MINILM, "model.dtype=float64"], 1e-9),
    # BERT is post-LayerNorm: in float32 the ulp-rounding of `h + (out - h)` alone moves a few gradient entries
    # by ~2e-5 (relative to the tensor's largest), so the float32 case uses the rounding-free form of the reference
    ("minilm-lora-f32-rounding-free", "{name: lora, params: {r: 4, alpha: 8}}", "{groups: 3}", MINILM, 1e-5),
    # sequence classification on a decoder: the `score` head reads each row's last real token (padding). On CPUs
    # with AVX-512, bitsandbytes computes a 4-bit matmul without autograd (LCSB's unselected layers) with its own
    # fused kernel and with autograd (the reference) by dequantizing: float32 rounding that moved one gradient
    # entry of 256 by 6.7e-5 relative; 1e-4 still catches a wrong gradient (a missing term is O(1))
    ("stories-cls-qlora-f32", "{name: qlora, params: {r: 4, alpha: 8}}", "{groups: 2}", CLASSIFY, 1e-4),
]


@pytest.mark.parametrize("case_id,base,lcsb,overrides,tol", CASES, ids=[c[0] for c in CASES])
def test_gradients_equal_the_naive_stop_gradient_reference(case_id, base, lcsb, overrides, tol):
    step = 1  # group 1: layers both above and below stay unselected
    efficient = build(f"[{base}, {{name: lcsb, params: {lcsb}}}]", *overrides)
    reference = build(f"[{base}]", *overrides)
    for t in (efficient, reference):
        randomize_lora_b(t.model)
        t.model.eval()  # dropout off (MiniLM): the gradients are still computed
    assert_same_start(efficient, reference)
    batch = efficient.batcher.batch(0, 0)
    assert (batch["attention_mask"] == 0).any(), "the batch should hold padding"

    strategy = lcsb_of(efficient)
    selected = set(strategy.layer_groups[strategy.group_for_step(step)])
    loss, saved = forward_backward(efficient, batch, step, meter=True)
    ref_loss, ref_saved = naive_reference(reference, batch, selected, rounding_free="rounding-free" in case_id)

    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=0)
    got, ref = trainable_grads(efficient), trainable_grads(reference)
    assert got.keys() == ref.keys()
    # a few gradients are zero in exact arithmetic (BERT's key bias: softmax ignores a per-query shift),
    # so each tensor's tolerance has a floor relative to the largest gradient of the model
    floor = 1e-3 * max(g.abs().max().item() for g in ref.values() if g is not None)
    with_grad = set()
    for name, g in got.items():
        assert (g is None) == (ref[name] is None), name  # the same parameters are reached
        if g is not None:
            torch.testing.assert_close(g, ref[name], rtol=tol, atol=tol * max(ref[name].abs().max().item(), floor))
            with_grad.add(layer_of(name))
    assert with_grad - {None} == selected  # only the selected group's layers get gradients
    assert saved < ref_saved  # the reference keeps the unselected layers' activations; LCSB does not

    strategy.after_backward(step)  # momentum_updates: every other trainable layer parameter gets a zero gradient
    for name, p in efficient.model.named_parameters():
        if p.requires_grad and layer_of(name) not in selected and layer_of(name) is not None:
            assert p.grad is not None and not p.grad.any(), name


@pytest.mark.parametrize("base", ["{name: full}", "{name: lora, params: {r: 4, alpha: 8}}"])
def test_one_group_is_plain_training(tmp_path, base):
    """G=1: the same loss, gradients and updated weights as training without `lcsb`, bit for bit."""
    runs = []
    for i, strategies in enumerate([f"[{base}, {{name: lcsb, params: {{groups: 1}}}}]", f"[{base}]"]):
        t = build(strategies, "train.lr=1e-2", run_dir=tmp_path / str(i), for_training=True)
        randomize_lora_b(t.model)
        t.model.train()
        loss, _ = forward_backward(t, t.batcher.batch(0, 0), 0)
        for s in t.strategies:
            s.after_backward(0)
        grads = {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}
        t.optimizer.step()
        runs.append((loss, grads, {n: p.detach().clone() for n, p in t.model.named_parameters()}))
    (loss_a, grads_a, weights_a), (loss_b, grads_b, weights_b) = runs
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
    assert all(torch.equal(weights_a[n], weights_b[n]) for n in weights_a)


def test_forward_is_bit_identical_and_saves_far_fewer_activation_bytes():
    """1 of 4 groups on an 8-layer model: the same loss bit for bit, under 0.4x the plain activation bytes."""
    lora = "{name: lora, params: {r: 4, alpha: 8}}"
    a = build(f"[{lora}, {{name: lcsb}}]", "model.name=tiny-llama")
    b = build(f"[{lora}]", "model.name=tiny-llama")
    batch = a.batcher.batch(0, 0)
    loss_a, saved_a = forward_backward(a, batch, 2, meter=True)
    loss_b, saved_b = forward_backward(b, batch, 2, meter=True)
    assert torch.equal(loss_a, loss_b)
    assert saved_a < 0.4 * saved_b, (saved_a, saved_b)


def test_composes_with_gradient_checkpointing():
    lora = "{name: lora, params: {r: 4, alpha: 8}}"
    plain = build(f"[{lora}, {{name: lcsb}}]", "model.name=tiny-llama")
    ckpt = build(f"[{lora}, {{name: lcsb}}]", "model.name=tiny-llama", "train.gradient_checkpointing=true")
    batch = plain.batcher.batch(0, 0)
    for t in (plain, ckpt):
        randomize_lora_b(t.model)
        t.model.train()
    loss_a, saved_a = forward_backward(plain, batch, 3, meter=True)
    loss_b, saved_b = forward_backward(ckpt, batch, 3, meter=True)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=0)
    ga, gb = trainable_grads(plain), trainable_grads(ckpt)
    reached = {n for n, g in ga.items() if g is not None}
    assert reached == {n for n, g in gb.items() if g is not None} and reached
    assert all(layer_of(n) in (6, 7) for n in reached)  # group 3 of 4 on 8 layers
    for n in reached:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-5, atol=1e-5 * ga[n].abs().max().item())
    assert saved_b < saved_a


# ---------------------------------------------------------------------- optimizer


@pytest.mark.parametrize("momentum", [True, False])
def test_unselected_adapters_move_iff_momentum_updates(tmp_path, momentum):
    t = build(f"[{{name: lora, params: {{r: 4, alpha: 8}}}}, {{name: lcsb, params: {{groups: 2, "
              f"momentum_updates: {str(momentum).lower()}}}}}]", "model.name=tiny-llama", "train.lr=1e-2",
              "train.warmup_steps=0", "train.weight_decay=0.0", run_dir=tmp_path, for_training=True)
    randomize_lora_b(t.model)  # with B = 0, A's first gradient would be zero
    strategy = lcsb_of(t)
    group0 = {n: p for n, p in t.model.named_parameters()
              if p.requires_grad and layer_of(n) in strategy.layer_groups[0]}
    assert group0

    def step(i):
        t.model.train()
        forward_backward(t, t.batcher.batch(0, i), i)
        for s in t.strategies:
            s.after_backward(i)
        t.optimizer.step()
        t.optimizer.zero_grad(set_to_none=True)

    before = {n: p.detach().clone() for n, p in group0.items()}
    step(0)  # group 0 selected: its adapters get a gradient and a non-zero moment
    assert all(not torch.equal(before[n], p) for n, p in group0.items())
    after_selected = {n: p.detach().clone() for n, p in group0.items()}
    step(1)  # group 1 selected: group 0 moves only through its momentum
    moved = [not torch.equal(after_selected[n], p) for n, p in group0.items()]
    assert all(moved) if momentum else not any(moved)


# ---------------------------------------------------------------------- schedules, partitions, errors


def test_partitions():
    assert partition_layers(8, 4, "contiguous") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert partition_layers(8, 4, "strided") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert partition_layers(5, 2, "contiguous") == [[0, 1, 2], [3, 4]]
    assert partition_layers(5, 3, "strided") == [[0, 3], [1, 4], [2]]
    for n, g in [(5, 4), (7, 3), (16, 4), (6, 6), (4, 1)]:
        for how in ("contiguous", "strided"):
            groups = partition_layers(n, g, how)
            assert sorted(i for grp in groups for i in grp) == list(range(n)) and all(groups)
            assert max(map(len, groups)) - min(map(len, groups)) <= 1


def _strategy(seed=0, **params) -> Lcsb:
    s = Lcsb(LcsbParams(**params))
    s.seed = seed
    return s


def test_cyclic_schedule_and_micro_batches_of_one_step_share_a_group():
    s = _strategy(groups=4)
    assert [s.group_for_step(t) for t in range(9)] == [0, 1, 2, 3, 0, 1, 2, 3, 0]
    s.on_step_start(6, {})
    s.on_step_start(6, {})  # the loop calls it once per micro-batch
    assert s.selected == 2


def test_random_schedule_is_seeded_and_stateless():
    a, b, c = _strategy(7, groups=4, schedule="random"), _strategy(7, groups=4, schedule="random"), \
        _strategy(8, groups=4, schedule="random")
    draws = [a.group_for_step(t) for t in range(200)]
    assert draws == [b.group_for_step(t) for t in reversed(range(200))][::-1]  # any order: no hidden state
    assert draws != [c.group_for_step(t) for t in range(200)]
    assert set(draws) == {0, 1, 2, 3} and draws != [t % 4 for t in range(200)]


def test_too_many_groups_and_bad_patterns_are_user_errors():
    with pytest.raises(UserError, match="`lcsb.groups` is 6 but the model has 5 layers"):
        build("[{name: lora}, {name: lcsb, params: {groups: 6}}]")
    with pytest.raises(RecipeError, match="always_train.*not a regular expression"):
        build("[{name: lora}, {name: lcsb, params: {always_train: ['(']}}]")
    with pytest.raises(RecipeError, match="groups"):
        build("[{name: lora}, {name: lcsb, params: {groups: 0}}]")


def test_always_train_freezes_unmatched_parameters_outside_the_layers():
    t = build("[{name: full}, {name: lcsb, params: {always_train: [lm_head]}}]", "model.name=tiny-llama")
    trainable = {n for n, p in t.model.named_parameters() if p.requires_grad}
    assert "lm_head.weight" in trainable
    assert "model.embed_tokens.weight" not in trainable and "model.norm.weight" not in trainable
    assert any(n.startswith("model.layers.0.") for n in trainable)  # layer parameters follow their group
    assert any("match no `always_train` pattern" in note for note in t.notes)


# ---------------------------------------------------------------------- the loop


def _losses(run_dir: Path) -> list:
    return [m.get("loss") for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


def test_resumed_run_equals_an_uninterrupted_one(tmp_path):
    common = ["strategies=[{name: lora, params: {r: 4, alpha: 8}}, {name: lcsb, params: {schedule: random}}]",
              *SMALL, "train.schedule=constant", "train.warmup_steps=0", "output.save_every=3", "train.seed=3"]
    recipe = REPO / "recipes" / "lcsb_lora.yaml"
    Trainer(load(recipe, [*common, "train.max_steps=6"]), run_dir=tmp_path / "straight").setup().train()
    Trainer(load(recipe, [*common, "train.max_steps=3"]), run_dir=tmp_path / "split").setup().train()
    resumed = Trainer(load(recipe, [*common, "train.max_steps=6"]), run_dir=tmp_path / "split").setup()
    assert resumed.step == 3
    resumed.train()
    assert _losses(tmp_path / "straight") == _losses(tmp_path / "split")
    from safetensors.torch import load_file

    wa = load_file(tmp_path / "straight" / "checkpoints" / "step-000006" / "trainable.safetensors")
    wb = load_file(tmp_path / "split" / "checkpoints" / "step-000006" / "trainable.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("recipe,extra", [
    ("lcsb_lora.yaml", []),
    ("lcsb_qlora.yaml", []),
    ("lcsb_full.yaml", []),
    ("lcsb_minilm_sst2.yaml", ["data.eval_split=0.2", "data.max_samples=null", "train.batch_size=8",
                               "train.eval_batches=2"]),
])
def test_each_recipe_trains_end_to_end(tmp_path, recipe, extra):
    r = load(REPO / "recipes" / recipe, ["data.max_samples=32", "data.max_length=96", "train.batch_size=4",
                                         "data.eval_split=null", "train.max_steps=4", "log.progress=false",
                                         "output.plot=false", "output.checkpoints=false", *extra])
    assert [s.name for s in r.strategies][-1] == "lcsb"
    summary = Trainer(r, run_dir=tmp_path).setup().train()
    assert summary["steps"] == 4 and "lcsb" in summary["strategies"]
    losses = [x for x in _losses(tmp_path) if x is not None]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert summary["activation_bytes"] > 0
