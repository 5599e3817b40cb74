"""MEFT's sparse adapter against its dense reference (plain autograd, same routing and top-K masks)."""

import pytest
import torch

from memft.strategies.meft.adapter import (
    Gathered,
    dense_reference,
    probe,
    sparse_forward,
)


def gather(keys, values, router, x, n_probe, block):
    """The union of probed experts' rows, as fresh leaves (what the offloaded path ships to the device)."""
    _, probed = probe(router, x, n_probe)
    experts = torch.unique(probed)
    rows = torch.cat([torch.arange(e * block, (e + 1) * block) for e in experts.tolist()])
    leaf = lambda t: t.detach().clone().requires_grad_()  # noqa: E731
    return Gathered(experts, leaf(keys[rows]), leaf(values.T[rows]), leaf(router)), rows


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("width,experts,n_probe,topk", [(256, 16, 2, 8), (1024, 32, 4, 16), (64, 8, 1, 32)])
def test_sparse_equals_dense_reference(dtype, tol, width, experts, n_probe, topk):
    g = torch.Generator().manual_seed(width + experts)
    d, n = 32, 40
    keys = torch.randn(width, d, generator=g, dtype=dtype).requires_grad_()
    values = torch.randn(d, width, generator=g, dtype=dtype).requires_grad_()
    router = torch.randn(experts, d, generator=g, dtype=dtype).requires_grad_()
    x = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_()
    block = width // experts
    upstream = torch.randn(n, d, generator=g, dtype=dtype)

    ref = dense_reference(x, keys, values, router, n_probe, topk, block)
    (ref * upstream).sum().backward()
    rows, index = gather(keys, values, router, x.detach(), n_probe, block)
    xs = x.detach().clone().requires_grad_()
    out = sparse_forward(xs, rows, n_probe, topk, block)
    (out * upstream).sum().backward()

    def close(got, want):  # relative to the tensor's scale: sums of a few large terms cancel in places
        assert (got - want).abs().max() <= tol * want.abs().max(), (got - want).abs().max() / want.abs().max()

    close(out, ref)
    close(xs.grad, x.grad)
    close(rows.router.grad, router.grad)
    close(rows.keys.grad, keys.grad[index])
    close(rows.values.grad, values.grad.T[index])
    untouched = torch.ones(width, dtype=torch.bool)
    untouched[index] = False
    if untouched.any():  # the keys of experts no token probed get no gradient at all
        assert keys.grad[untouched].abs().max() == 0 and values.grad.T[untouched].abs().max() == 0


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_a_capped_expert_set_equals_the_dense_reference_with_the_same_cap(dtype, tol):
    """Under a device-row cap the batch may probe only some experts; tokens pick their best among them."""
    g = torch.Generator().manual_seed(3)
    width, experts, n_probe, topk, d, n = 256, 16, 2, 8, 16, 30
    block = width // experts
    keys = torch.randn(width, d, generator=g, dtype=dtype).requires_grad_()
    values = torch.randn(d, width, generator=g, dtype=dtype).requires_grad_()
    router = torch.randn(experts, d, generator=g, dtype=dtype).requires_grad_()
    x = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_()
    allowed_ids = torch.tensor([1, 4, 5, 11])
    allowed = torch.zeros(experts, dtype=torch.bool)
    allowed[allowed_ids] = True
    assert not torch.isin(probe(router, x, n_probe)[1], allowed_ids).all()  # the cap does reroute probes

    ref = dense_reference(x, keys, values, router, n_probe, topk, block, allowed)
    ref.square().sum().backward()
    index = torch.cat([torch.arange(e * block, (e + 1) * block) for e in allowed_ids.tolist()])
    leaf = lambda t: t.detach().clone().requires_grad_()  # noqa: E731
    rows = Gathered(allowed_ids, leaf(keys[index]), leaf(values.T[index]), leaf(router))
    xs = leaf(x)
    out = sparse_forward(xs, rows, n_probe, topk, block)
    out.square().sum().backward()
    for got, want in ((out, ref), (xs.grad, x.grad), (rows.router.grad, router.grad),
                      (rows.keys.grad, keys.grad[index]), (rows.values.grad, values.grad.T[index])):
        assert (got - want).abs().max() <= tol * want.abs().max()
    assert keys.grad[~torch.isin(torch.arange(width), index)].abs().max() == 0


def test_zero_values_leave_the_output_unchanged():
    keys, router = torch.randn(64, 16), torch.randn(8, 16)
    x = torch.randn(10, 16)
    out = dense_reference(x, keys, torch.zeros(16, 64), router, 2, 4, 8)
    assert torch.equal(out, torch.zeros_like(out))


def _host(width=64, d=8, experts=8, dtype=torch.float64):
    from memft.strategies.meft.offload import HostAdapter

    g = torch.Generator().manual_seed(0)
    return HostAdapter(torch.randn(width, d, generator=g, dtype=dtype), torch.randn(width, d, generator=g, dtype=dtype),
                       experts)


def _fake_backward(host, experts, seed):
    """Ship `experts`' rows, give them a random gradient, send it back."""
    rows_obj, rows = host.gather(torch.tensor(experts), torch.zeros(8, 8), torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    for leaf in (rows_obj.keys, rows_obj.values):
        leaf.grad = torch.randn(leaf.shape, generator=g, dtype=leaf.dtype)
    host.accumulate(rows_obj, rows)
    return rows


def test_cpu_adamw_over_all_rows_is_torch_adamw():
    host = _host()
    reference = {k: v.clone().requires_grad_() for k, v in host.params.items()}
    opt = torch.optim.AdamW(list(reference.values()), lr=1e-2, weight_decay=0.1, foreach=False)
    for step, experts in enumerate([[0, 3], [3, 5], [1]]):
        _fake_backward(host, experts, step)
        for name, p in reference.items():
            p.grad = host.grads[name].clone()
        host.step(lr=1e-2, weight_decay=0.1, rows="all")
        opt.step()
    for name, p in reference.items():
        torch.testing.assert_close(host.params[name], p.detach(), rtol=1e-12, atol=1e-14)


def test_row_sparse_adamw_touches_only_the_shipped_rows():
    host = _host()
    before = {k: v.clone() for k, v in host.params.items()}
    rows = _fake_backward(host, [2, 6], seed=1)
    grads = {k: v.clone() for k, v in host.grads.items()}
    updated = host.step(lr=1e-2, weight_decay=0.1, rows="touched")
    changed = (host.params["keys"] != before["keys"]).any(1)
    assert changed[rows].all() and not changed[~torch.isin(torch.arange(64), rows)].any()
    assert updated == 2 * rows.numel()
    # a touched row's update is AdamW's on that row alone
    p = before["values"][rows].clone().requires_grad_()
    p.grad = grads["values"][rows]
    torch.optim.AdamW([p], lr=1e-2, weight_decay=0.1, foreach=False).step()
    torch.testing.assert_close(host.params["values"][rows], p.detach(), rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------- in a model
import json  # noqa: E402
from pathlib import Path  # noqa: E402

from memft.data.batching import count_targets  # noqa: E402
from memft.recipe import load  # noqa: E402
from memft.strategies.meft.adapter import dense_reference as _dense  # noqa: E402
from memft.strategies.tokentune import POSITIONS_KEY  # noqa: E402
from memft.train.loop import Trainer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MEFT = "{name: meft, params: {width: 256, experts: 16, n_probe: 2, topk: 8}}"
CAPPED = MEFT.replace("topk: 8", "topk: 8, device_rows: 64")


def build(model: str, strategies: str, *extra: str) -> Trainer:
    r = load(REPO / "recipes" / "lora.yaml", [f"model.name={model}", f"strategies={strategies}", "data.max_samples=8",
                                              "data.max_length=256", *extra])
    return Trainer(r, run_dir="unused").setup(for_training=False)


def batch_of(vocab=512, n=2, t=24):
    ids = torch.randint(5, vocab, (n, t), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 16:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-mixtral"])
def test_zero_values_leave_the_model_unchanged(model):
    plain = build(model, "[{name: full}]")
    meft = build(model, f"[{MEFT}]")
    batch = batch_of()
    with torch.no_grad():
        a = plain.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = meft.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def randomise_values(s, seed=7):
    g = torch.Generator().manual_seed(seed)
    for h in s.hosts:  # non-zero values, or the key and router gradients would be trivially zero
        h.params["values"].copy_(torch.randn(h.params["values"].shape, generator=g) * 0.05)


def shipped_grads(s) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the (M, d) key and value gradients of the rows the grad-enabled forwards shipped."""
    out = []
    for i, rows, index in s.pending:
        kg = torch.zeros_like(s.hosts[i].params["keys"]).index_add_(0, index, rows.keys.grad)
        vg = torch.zeros_like(s.hosts[i].params["values"]).index_add_(0, index, rows.values.grad)
        out.append((kg, vg))
    s.pending.clear()
    return out


def use_dense_reference(s, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Swap the sparse adapter for the dense reference over all M keys, in `dtype`: plain autograd on fresh leaves of
    the host K and V (returned per layer). The allowed experts are the ones the strategy shipped for the call (its cap
    decision; without a cap the union of the probed experts, which restricts nothing)."""
    p = s.params
    leaves = [(h.params["keys"].to(dtype, copy=True).requires_grad_(),
               h.params["values"].to(dtype, copy=True).requires_grad_()) for h in s.hosts]

    def adapter_out(i, x, rows):
        allowed = torch.zeros(p.experts, dtype=torch.bool).index_fill_(0, rows.experts, True)
        y = _dense(x.reshape(-1, x.size(-1)).to(dtype), leaves[i][0], leaves[i][1].T, s.routers[i].to(dtype),
                   p.n_probe, p.topk, p.width // p.experts, allowed)
        return y.to(x.dtype).view(x.shape)

    s.adapter_out = adapter_out
    return leaves


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest deviation from the reference, relative to the reference tensor's scale."""
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-300)).item()


@pytest.mark.parametrize("model,cap,dtype", [("tiny-llama", None, "float32"), ("tiny-mixtral", None, "float32"),
                                             ("tiny-llama", 64, "float32"), ("tiny-llama", None, "float64"),
                                             ("tiny-mixtral", 64, "float64")])
def test_model_gradients_equal_the_dense_reference_adapter(model, cap, dtype):
    """float64 models keep the adapter in float64 (router, K, V, the computation): 1e-10 against a float64 reference."""
    meft = MEFT if cap is None else MEFT.replace("topk: 8", f"topk: 8, device_rows: {cap}")
    t = build(model, f"[{meft}]", f"model.dtype={dtype}")
    t.model.train()
    s = t.strategies[-1]
    randomise_values(s)
    batch = batch_of()
    out = t._loss(batch)
    (out.loss_sum / out.count).backward()
    sparse_router = [r.grad.clone() for r in s.routers]
    shipped = [rows.experts for _, rows, _ in s.pending]
    host_grads = shipped_grads(s)
    sparse_loss = out.loss_sum.item() / out.count

    # the reference: the same model with each adapter computed densely over all M keys, plain autograd
    t.model.zero_grad(set_to_none=True)
    leaves = use_dense_reference(s, getattr(torch, dtype))
    ref = t._loss(batch)
    (ref.loss_sum / ref.count).backward()
    tol = 1e-10 if dtype == "float64" else 1e-5
    loss_err = abs(ref.loss_sum.item() / ref.count - sparse_loss) / abs(sparse_loss)
    grad_err = max(rel_err(got, want) for i, (kg, vg) in enumerate(host_grads)
                   for got, want in ((kg, leaves[i][0].grad), (vg, leaves[i][1].grad),
                                     (sparse_router[i], s.routers[i].grad)))
    print(f"{model} {dtype} cap {cap}: loss {loss_err:.1e}, key / value / router gradients {grad_err:.1e}")
    assert loss_err <= tol / 10 and grad_err <= tol
    assert any(kg.abs().sum() > 0 for kg, _ in host_grads)
    if cap is not None:  # the cap held, and it did bind (the uncapped batch probes more experts)
        p = s.params
        assert all(e.numel() * (p.width // p.experts) <= cap for e in shipped)
        assert s.meters["meft_rerouted_probes"] > 0


@pytest.mark.parametrize("dtype,adapter", [("float64", torch.float64), ("float32", torch.float32),
                                           ("bfloat16", torch.float32)])
def test_the_adapter_follows_the_models_dtype_and_checkpoints(dtype, adapter):
    """float64 stays float64 (router, host K / V, their AdamW state); half precision keeps the adapter in float32."""
    t = build("tiny-llama", f"[{MEFT}]", f"model.dtype={dtype}")
    t.model.train()
    s = t.strategies[-1]
    randomise_values(s)
    out = t._loss(batch_of())
    (out.loss_sum / out.count).backward()
    s.after_backward(0)
    s.after_optimizer_step(0)
    with torch.no_grad():  # the chunked loss returns no logits: the model's own forward shows their dtype
        assert t.model(**{k: v for k, v in batch_of().items() if k != "labels"}).logits.dtype == getattr(torch, dtype)
    state = s.tensor_state()
    floats = {v.dtype for k, v in state.items() if not k.endswith("row_steps")}  # weights and AdamW moments
    assert {r.dtype for r in s.routers} == floats == {adapter}
    assert any(v.abs().sum() > 0 for k, v in state.items() if k.endswith("exp_avg"))
    fresh = build("tiny-llama", f"[{MEFT}]", f"model.dtype={dtype}").strategies[-1]
    fresh.load_tensor_state(state)
    assert all(torch.equal(v, fresh.tensor_state()[k]) for k, v in state.items())


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_grad_norm_and_clipping_include_the_host_rows(tmp_path, grad_accum):
    """The logged `grad_norm` is the norm of all of the step's gradients, the host K and V rows' included (summed over
    the micro-batches), and `max_grad_norm` scales those too: each update is AdamW's on the clipped gradient of the
    dense reference."""
    clip, lr = 1e-6, 1e-2  # clipped gradients fall below AdamW's eps: the update is no longer about lr * sign(g)
    overrides = ["log.progress=false", "output.plot=false", "output.checkpoints=false", "train.batch_size=2",
                 "data.max_samples=24", "data.max_length=96", "train.warmup_steps=0", "train.eval_every=null",
                 "train.max_steps=1", f"train.grad_accum={grad_accum}", f"train.max_grad_norm={clip}",
                 f"strategies=[{MEFT}]", f"train.lr={lr}"]
    trained = Trainer(load(REPO / "recipes" / "quickstart.yaml", overrides), run_dir=tmp_path / "run").setup()
    s = trained.strategies[-1]
    randomise_values(s)
    before = [{k: v.clone() for k, v in h.params.items()} for h in s.hosts]
    routers_before = [r.detach().clone() for r in s.routers]
    trained.train()
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [m["grad_norm"] for m in lines if "grad_norm" in m]

    # the reference: the same step by plain autograd, K and V as dense leaves over all M rows
    ref = Trainer(load(REPO / "recipes" / "quickstart.yaml", overrides), run_dir=tmp_path / "ref").setup()
    r = ref.strategies[-1]
    randomise_values(r)
    ref.model.train()
    leaves = use_dense_reference(r, torch.float32)
    window = [ref._next_batch() for _ in range(grad_accum)]
    targets = sum(count_targets(b) for b in window)
    for b in window:
        (ref._loss(b).loss_sum / targets).backward()
    r.pending.clear()
    assert sum(p.requires_grad for p in ref.model.parameters()) == len(r.routers)  # the base is frozen
    grads = [x.grad for x in r.routers] + [leaf.grad for pair in leaves for leaf in pair]
    norm = torch.sqrt(sum(g.double().square().sum() for g in grads)).item()
    router_norm = torch.sqrt(sum(x.grad.double().square().sum() for x in r.routers)).item()
    print(f"grad_norm logged {logged[0]:.6g}, reference {norm:.6g} (routers alone {router_norm:.6g})")
    assert len(logged) == 1 and abs(logged[0] - norm) <= 1e-5 * norm and norm > 2 * router_norm

    coef = min(1.0, clip / (norm + 1e-6))
    betas = ref.recipe.train.betas

    def adamw_update(p0, grad, weight_decay):
        p = p0.clone().requires_grad_()
        p.grad = grad.clone()
        torch.optim.AdamW([p], lr=lr, betas=betas, weight_decay=weight_decay, foreach=False).step()
        return p.detach() - p0

    host_errs, unclipped_errs = [], []
    for h, b, pair in zip(s.hosts, before, leaves):
        for name, leaf in zip(("keys", "values"), pair):
            want = adamw_update(b[name], coef * leaf.grad, s.params.weight_decay)
            host_errs.append(rel_err(h.params[name] - b[name], want))
            unclipped_errs.append(rel_err(adamw_update(b[name], leaf.grad, s.params.weight_decay), want))
    router_err = max(rel_err(got.detach() - b, adamw_update(b, coef * x.grad, ref.recipe.train.weight_decay))
                     for got, b, x in zip(s.routers, routers_before, r.routers))
    print(f"host updates vs AdamW on the clipped gradient {max(host_errs):.1e} (the unclipped update is "
          f"{min(unclipped_errs):.1e} off), routers {router_err:.1e}")
    assert max(host_errs) <= 1e-4 and router_err <= 1e-4 and min(unclipped_errs) > 0.5  # clipping did change it


def test_tokentune_keeps_meft_capped_forward_and_gets_the_naive_gradients():
    """TokenTune runs each layer twice (every row without grad, then the selected rows): both passes share the layer's
    cap decision, so the logits are MEFT's alone, and the gradients are the naive reference's: the dense model with
    MEFT's dense adapter under the cap decided from all real tokens, unselected rows detached where they enter a
    layer."""
    from test_tokentune import reference_loss

    tt_meft = build("tiny-llama", f"[{CAPPED}, {{name: tokentune, params: {{fraction: 0.3, loss_on: all}}}}]",
                    "model.dtype=float64")
    alone = build("tiny-llama", f"[{CAPPED}]", "model.dtype=float64")
    for t in (tt_meft, alone):
        t.model.train()
        randomise_values(t.strategies[0])
    s, tt = tt_meft.strategies
    batch = tt.on_step_start(0, batch_of())
    out = tt.loss(tt_meft.model, batch)
    with torch.no_grad():
        plain = alone._loss(batch_of())  # the forward is MEFT's alone: the same loss over every target
        logits_err = rel_err(out.loss_sum / out.count, plain.loss_sum / plain.count)
    assert s.meters["meft_rerouted_probes"] > 0  # the cap binds

    (out.loss_sum / out.count).backward()
    host_grads = shipped_grads(s)
    a = alone.strategies[0]
    leaves = use_dense_reference(a, torch.float64)
    selected = torch.zeros_like(batch["attention_mask"], dtype=torch.bool).scatter(1, batch[POSITIONS_KEY], True)
    assert not selected.all()
    expected = reference_loss(alone, batch_of(), selected, "all")
    expected.backward()
    loss_err = rel_err(out.loss_sum / out.count, expected)
    grad_err = max(rel_err(got, want) for i, (kg, vg) in enumerate(host_grads)
                   for got, want in ((kg, leaves[i][0].grad), (vg, leaves[i][1].grad),
                                     (s.routers[i].grad, a.routers[i].grad)))
    print(f"tokentune + meft, cap 64: forward (loss) vs meft alone {logits_err:.1e}, loss {loss_err:.1e}, "
          f"key / value / router gradients vs the naive reference {grad_err:.1e}")
    assert logits_err <= 1e-10 and loss_err <= 1e-10 and grad_err <= 1e-10
    assert all(kg.abs().sum() > 0 for kg, _ in host_grads)


def test_padding_does_not_change_the_real_tokens_under_a_cap():
    """The cap counts the probes of real tokens only: more padding leaves every real token's output as it was."""
    t = build("tiny-llama", f"[{CAPPED}]", "model.dtype=float64")
    t.model.train()
    s = t.strategies[-1]
    randomise_values(s)
    short = batch_of()
    lengths = short["attention_mask"].sum(1)
    pad_with = {"input_ids": 2, "attention_mask": 0, "labels": -100}
    long = {k: torch.nn.functional.pad(v, (0, 24), value=pad_with[k]) for k, v in short.items()}
    with torch.no_grad():
        a = t.model(input_ids=short["input_ids"], attention_mask=short["attention_mask"]).logits
        rerouted = s.meters["meft_rerouted_probes"]
        b = t.model(input_ids=long["input_ids"], attention_mask=long["attention_mask"]).logits
    err = max(rel_err(b[row, :n], a[row, :n]) for row, n in enumerate(lengths.tolist()))
    print(f"real tokens' logits with 24 more padding positions: {err:.1e}")
    assert rerouted > 0 and err <= 1e-10  # the cap binds, and padding does not move it


def test_a_device_row_cap_makes_device_bytes_flat_in_width_and_spares_evaluation():
    def device_bytes(width, cap, train=True):
        t = build("tiny-llama", f"[{{name: meft, params: {{width: {width}, experts: {width // 16}, n_probe: 2, "
                                f"topk: 8, device_rows: {cap}}}}}]")
        t.model.train(train)
        s = t.strategies[-1]
        out = t._loss(batch_of())
        if not train:
            return sum(rows.keys.numel() for _, rows, _ in s.pending)
        (out.loss_sum / out.count).backward()
        s.after_backward(0)
        s.after_optimizer_step(0)
        return s.metrics()["meft_device_bytes"] - 4 * sum(r.numel() * r.element_size() for r in s.routers)

    layers, hidden = 8, 64  # tiny-llama
    flat = layers * 2 * 2 * 128 * hidden * 4  # (K, V) x (rows, their gradients) x float32
    assert device_bytes(1024, cap=128) == device_bytes(8192, cap=128) == flat
    assert device_bytes(1024, cap=8192) > device_bytes(1024, cap=128)
    assert device_bytes(1024, cap=128, train=False) > layers * 128 * hidden  # evaluation probes freely


def test_training_lowers_the_loss_and_resumes_exactly(tmp_path):
    base = ["log.progress=false", "output.plot=false", "train.batch_size=4", "data.max_samples=40",
            "data.max_length=128", "train.warmup_steps=0", "train.eval_every=null", "train.max_steps=6",
            "output.save_every=3", "output.keep_last=3", f"strategies=[{MEFT}]", "train.lr=1e-2"]
    straight = Trainer(load(REPO / "recipes" / "quickstart.yaml", base), run_dir=tmp_path / "a").setup()
    summary = straight.train()
    losses = [m["loss"] for m in map(__import__("json").loads, (tmp_path / "a" / "metrics.jsonl").read_text().splitlines())
              if "loss" in m]
    assert losses[-1] < losses[0]
    assert summary["meft_rows_touched"] > 0 and summary["meft_device_bytes_peak"] >= summary["meft_device_bytes"] > 0
    assert summary["trainable_params"] == sum(r.numel() for r in straight.strategies[-1].routers)
    first = Trainer(load(REPO / "recipes" / "quickstart.yaml", base), run_dir=tmp_path / "b").setup()
    first.total_steps = 3
    first.train()
    (tmp_path / "b" / "summary.json").unlink()
    again = Trainer(load(REPO / "recipes" / "quickstart.yaml", base), run_dir=tmp_path / "b").setup()
    again.train()
    for ha, hb in zip(straight.strategies[-1].hosts, again.strategies[-1].hosts):
        for name in ha.params:
            assert torch.equal(ha.params[name], hb.params[name]) and torch.equal(ha.exp_avg[name], hb.exp_avg[name])


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-mixtral"])
def test_keys_can_start_from_the_ffn(model):
    t = build(model, "[{name: meft, params: {width: 300, experts: 10, key_init: ffn}}]")
    layer0 = t.model.model.layers[0].mlp
    source = (layer0.up_proj.weight if hasattr(layer0, "up_proj")
              else layer0.experts.gate_up_proj[:, layer0.experts.gate_up_proj.size(1) // 2:].reshape(-1, 64))
    keys = t.strategies[-1].hosts[0].params["keys"]
    # every key is one of the FFN's rows
    assert all((source.detach().float() == k).all(1).any() for k in keys)


@pytest.mark.parametrize("meft,extra", [(MEFT, ["train.gradient_checkpointing=true"]),
                                        (CAPPED, ["train.gradient_checkpointing=true"]),
                                        (MEFT, ["strategies=[{name: lora, params: {r: 4}}, " + MEFT + "]"])])
def test_combinations_get_the_same_adapter_gradients(meft, extra):
    """Checkpointing recomputes each layer (the adapter gathers again in backward, under the cap the forward decided);
    LoRA trains beside it."""
    def host_grads(*overrides):
        t = build("tiny-llama", f"[{meft}]", *overrides)
        t.model.train()
        g = torch.Generator().manual_seed(7)
        for h in t.strategies[-1].hosts:
            h.params["values"].copy_(torch.randn(h.params["values"].shape, generator=g) * 0.05)
        out = t._loss(batch_of())
        (out.loss_sum / out.count).backward()
        s = [x for x in t.strategies if x.name == "meft"][0]
        s.after_backward(0)
        return [h.grads["keys"].clone() for h in s.hosts]

    plain, other = host_grads(), host_grads(*extra)
    for a, b in zip(plain, other):
        assert (a - b).abs().max() <= 1e-6 * a.abs().max() and a.abs().max() > 0


def test_revffn_is_refused():
    from memft.errors import RecipeError

    with pytest.raises(RecipeError, match="`meft` and `revffn` cannot be combined"):
        load(REPO / "recipes" / "lora.yaml", [f"strategies=[{{name: full}}, {MEFT}, {{name: revffn}}]"])


def test_the_adapter_lr_follows_the_runs_schedule_when_sized_by_epochs(tmp_path):
    r = load(REPO / "recipes" / "quickstart.yaml", [
        f"strategies=[{MEFT}]", "train.max_steps=null", "train.epochs=1", "data.max_samples=40", "train.batch_size=4",
        "train.schedule=cosine", "train.warmup_steps=2"])
    t = Trainer(r, run_dir=tmp_path).setup()
    s = t.strategies[-1]
    loop_factor = t.scheduler.lr_lambdas[0]
    assert t.total_steps > 1 and s.lr_factor(t.total_steps) == loop_factor(t.total_steps) == 0
    assert all(s.lr_factor(k) == loop_factor(k) for k in range(t.total_steps))
