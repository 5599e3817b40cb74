"""MEFT's sparse key-value adapter (work in progress: the exact sparse forward; offloading comes next).

Hao et al., "MEFT: Memory-Efficient Fine-Tuning through Sparse Adapter" (ACL 2024). Parallel to a
layer's FFN, on the FFN's (normed) input `x`:

    g = G x                                    router scores over E key-experts (learned, no softmax)
    P = top n_probe experts of g               per token
    o_j = g_e(j) * (k_j . x)   for keys j of the experts in P (expert e owns a contiguous block of M/E keys)
    S = top-K of o over those keys             per token (raw scores; ties by index)
    out = sum_{j in S} relu(o_j) v_j

`V` starts at zero, so the model starts unchanged. Only the keys of the experts some token of the
batch probes are ever touched: `gather` fetches their blocks (K rows, V columns) and the router,
and the forward scores every token against that union, masking the experts it did not probe.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Gathered:
    """The rows of one adapter a batch needs, on the compute device, as leaves that collect gradients."""

    experts: torch.Tensor
    """(U,) long: the expert ids in the union, ascending."""
    keys: torch.Tensor
    """(U * n, d): their key blocks."""
    values: torch.Tensor
    """(U * n, d): their value vectors (rows of V^T)."""
    router: torch.Tensor
    """(E, d): the whole router (small)."""


def probe(router: torch.Tensor, x: torch.Tensor, n_probe: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Router scores and the probed experts per token: ((N, E) scores, (N, n_probe) expert ids)."""
    g = x @ router.T
    return g, torch.topk(g, n_probe, dim=-1).indices


def sparse_forward(x: torch.Tensor, rows: Gathered, n_probe: int, topk: int, block: int) -> torch.Tensor:
    """The adapter's output for tokens `x` (N, d), using only the gathered rows."""
    g, probed = probe(rows.router, x, n_probe)                       # (N, E), (N, n_probe)
    # position of each union expert in `rows.experts`, and whether each token probed it
    local = torch.searchsorted(rows.experts, probed)                 # (N, n_probe) indices into the union
    chose = torch.zeros(x.size(0), rows.experts.numel(), dtype=torch.bool, device=x.device)
    chose.scatter_(1, local, True)
    gate = g[:, rows.experts]                                        # (N, U): each union expert's router score
    scores = (x @ rows.keys.T).view(x.size(0), -1, block)            # (N, U, n)
    gated = (scores * gate[:, :, None]).masked_fill(~chose[:, :, None], float("-inf")).flatten(1)
    top, idx = torch.topk(gated, min(topk, gated.size(1)), dim=-1)   # (N, K)
    weights = torch.relu(top.masked_fill(torch.isinf(top), 0.0))     # fewer candidates than K: zeros
    # scatter into (N, U*n) and multiply: no (N, K, d) gather, and a backward without racing index-adds
    act = x.new_zeros(gated.shape).scatter(1, idx, weights)
    return act @ rows.values


def dense_reference(x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, router: torch.Tensor,
                    n_probe: int, topk: int, block: int) -> torch.Tensor:
    """The same function with plain dense tensors: every key scored, masks applied, V (d, M) multiplied."""
    g, probed = probe(router, x, n_probe)
    experts = router.size(0)
    chose = torch.zeros(x.size(0), experts, dtype=torch.bool, device=x.device).scatter_(1, probed, True)
    gate = g.repeat_interleave(block, dim=1)                         # (N, M)
    gated = ((x @ keys.T) * gate).masked_fill(~chose.repeat_interleave(block, dim=1), float("-inf"))
    top, idx = torch.topk(gated, min(topk, gated.size(1)), dim=-1)
    act = torch.zeros_like(gate).scatter(1, idx, torch.relu(top.masked_fill(torch.isinf(top), 0.0)))
    return act @ values.T                                            # values: (d, M)
