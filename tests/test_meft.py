"""MEFT's sparse adapter against its dense reference (plain autograd, same routing and top-K masks)."""

import pytest
import torch

from memft.strategies.meft.adapter import Gathered, dense_reference, probe, sparse_forward


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


def test_zero_values_leave_the_output_unchanged():
    keys, router = torch.randn(64, 16), torch.randn(8, 16)
    x = torch.randn(10, 16)
    out = dense_reference(x, keys, torch.zeros(16, 64), router, 2, 4, 8)
    assert torch.equal(out, torch.zeros_like(out))


def _host(width=64, d=8, experts=8, dtype=torch.float64):
    from memft.strategies.meft.offload import HostAdapter

    g = torch.Generator().manual_seed(0)
    return HostAdapter(torch.randn(width, d, generator=g, dtype=dtype), torch.randn(width, d, generator=g, dtype=dtype),
                       torch.randn(experts, d, generator=g, dtype=dtype))


def _fake_backward(host, experts, seed):
    """Ship `experts`' rows, give them a random gradient, send it back."""
    rows_obj, rows = host.gather(torch.tensor(experts), torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    for leaf in (rows_obj.keys, rows_obj.values, rows_obj.router):
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
    assert updated == 2 * rows.numel() + host.params["router"].size(0)
    # a touched row's update is AdamW's on that row alone
    p = before["values"][rows].clone().requires_grad_()
    p.grad = grads["values"][rows]
    torch.optim.AdamW([p], lr=1e-2, weight_decay=0.1, foreach=False).step()
    torch.testing.assert_close(host.params["values"][rows], p.detach(), rtol=1e-12, atol=1e-14)
