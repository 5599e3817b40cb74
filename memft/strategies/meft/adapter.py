"""MEFT's sparse key-value adapter: the function, computed sparsely, and its dense reference.

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

A device-row cap (`allowed`) restricts the experts a batch may probe to a given set: each token then
probes its best `n_probe` experts among the allowed ones. Without a cap the allowed set is the union
itself, which changes nothing.
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
    ready: torch.cuda.Event | None = None
    """On CUDA: recorded on the copy stream once the rows have arrived."""

    def wait(self) -> None:
        """Make the current stream wait for the rows (CUDA; nothing to wait for on the CPU)."""
        if self.ready is not None:
            stream = torch.cuda.current_stream(self.keys.device)
            stream.wait_event(self.ready)
            for t in (self.keys, self.values):
                t.record_stream(stream)  # allocated on the copy stream, used on this one
            self.ready = None


def probe(router: torch.Tensor, x: torch.Tensor, n_probe: int,
          allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Router scores and the probed experts per token: ((N, E) scores, (N, n_probe) expert ids).

    `allowed` ((E,) bool): probe only among these experts (a device-row cap); the scores stay unmasked.
    """
    g = x @ router.T
    choose = g if allowed is None else g.detach().masked_fill(~allowed, float("-inf"))
    return g, torch.topk(choose, n_probe, dim=-1).indices


def sparse_forward(x: torch.Tensor, rows: Gathered, n_probe: int, topk: int, block: int) -> torch.Tensor:
    """The adapter's output for tokens `x` (N, d), using only the gathered rows.

    Work and memory grow with N * n_probe * block (the keys each token actually scores), not with the
    union of probed experts: the (token, probe) pairs are sorted by expert, one matmul per expert, and put
    back in place by a permutation (so forward and backward are deterministic: no colliding writes).
    """
    n_tokens, dim = x.shape
    allowed = torch.zeros(rows.router.size(0), dtype=torch.bool, device=x.device)
    allowed[rows.experts] = True                                     # all probed experts, or a capped set
    g, probed = probe(rows.router, x, n_probe, allowed)              # (N, E), (N, P)
    local = torch.searchsorted(rows.experts, probed).flatten()       # (N*P,): index into the union
    order = torch.argsort(local, stable=True)
    inverse = torch.argsort(order)
    counts = torch.bincount(local, minlength=rows.experts.numel()).tolist()
    tokens = order // n_probe
    keys = rows.keys.view(-1, block, dim)                            # (U, n, d)
    values = rows.values.view(-1, block, dim)
    x_sorted = torch.split(x[tokens], counts)
    scores = torch.cat([xs @ keys[u].T for u, xs in enumerate(x_sorted)])        # (N*P, n), expert order
    scores = scores * g[tokens, probed.flatten()[order]][:, None]     # gate * key score
    scores = scores[inverse].view(n_tokens, n_probe * block)          # back to (token, probe slot) order
    top, idx = torch.topk(scores, min(topk, n_probe * block), dim=-1)
    act = torch.zeros_like(scores).scatter(1, idx, torch.relu(top)).view(-1, block)[order]
    out = torch.cat([a @ values[u] for u, a in enumerate(torch.split(act, counts))])  # (N*P, d)
    return out[inverse].view(n_tokens, n_probe, dim).sum(1)


def dense_reference(x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, router: torch.Tensor,
                    n_probe: int, topk: int, block: int, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """The same function with plain dense tensors: every key scored, masks applied, V (d, M) multiplied."""
    g, probed = probe(router, x, n_probe, allowed)
    experts = router.size(0)
    chose = torch.zeros(x.size(0), experts, dtype=torch.bool, device=x.device).scatter_(1, probed, True)
    gate = g.repeat_interleave(block, dim=1)                         # (N, M)
    gated = ((x @ keys.T) * gate).masked_fill(~chose.repeat_interleave(block, dim=1), float("-inf"))
    top, idx = torch.topk(gated, min(topk, gated.size(1)), dim=-1)
    act = torch.zeros_like(gate).scatter(1, idx, torch.relu(top.masked_fill(torch.isinf(top), 0.0)))
    return act @ values.T                                            # values: (d, M)
