"""LoRA on fused MoE experts without a delta weight: `x W^T + s (x A^T) B^T`, never `W + s B A`.

transformers 5 keeps a MoE layer's routed experts as fused 3-D parameters (`MixtralExperts`,
`Qwen2MoeExperts`, `Qwen3MoeExperts`, `OlmoeExperts`): `gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I),
used as `F.linear(x, W[e])`. peft's `target_parameters` LoRA forms `W_e + s B_e A_e` for every expert and
autograd saves it for backward, an (out, in) matrix per expert. Here, for the tokens routed to expert e:

    [g, u] = x Wgu_e^T + s (x Agu_e^T) Bgu_e^T      (gate/up pre-activations, (n, 2I))
    h      = act(g) * u                             ((n, I))
    y      = h Wd_e^T + s (h Ad_e^T) Bd_e^T         ((n, H))
    out[t] += w_te * y                              (w: the routing weight of that (token, expert) slot)

which is exactly what the experts module computes, plus the LoRA terms.

Grouping. The (token, choice) slots are sorted by expert (a stable argsort of the flattened top-k index),
so each expert's tokens are one contiguous slice. Each projection, forward and backward, is then either one
`torch._grouped_mm` over all experts (offsets: the cumulative expert counts; the (E, out, in) weights and
factors enter as they are or as transposed views, never copies; weight gradients use its 2-D x 2-D form)
or one matmul per expert in a Python loop. One body serves both: it runs once per slot group, all slots
(`_AllExperts`) or one expert's (`_OneExpert`), so both compute the same products in the same order; the
loop adds the LoRA product into the base's inside one `addmm_` (one rounding where the grouped path rounds
twice: bitwise equal in float32 on CPU in practice, within bf16's rounding in bf16). The B factors enter
pre-scaled (`s B`, cast once per layer: they are r columns wide), so the scaling costs no pass over the slots,
and SiLU's backward is torch's fused `silu_backward`. The grouped call is used where it runs (`GROUPED`, `_grouped_reason`): plain base
tensors already in the compute dtype (never a cast of a whole layer, never 4-bit storage), float32,
bfloat16 or float16 on a device where a probe of the op gives exact numbers (once per device and dtype),
hidden, intermediate and rank rows of a multiple of 16 bytes; by default on CUDA only (`GROUPED_DEVICES`).
Everything else, float64 included, takes the loop. Both paths save the same tensors; the grouped one's
transient buffers span all slots rather than one expert's (on CPU the loop's per-expert elementwise steps
stay in cache, which is why the CPU keeps the loop).

What backward keeps (`_ExpertLora`, a hand-written backward; plain autograd would keep the gathered
inputs per slot, `act(g)`, `y` and the base matmuls' inputs):

- `x` itself, (T, H), once per token, not its k gathered copies: backward gathers the rows again;
- the slot order (S = T*k int64) and the routing weights (T, k);
- the gate/up pre-activations `[g, u]` (S, 2I) in the compute dtype: `act` needs `g`, and `h = act(g) * u`
  is recomputed from them in backward (elementwise, no matmul);
- the rank-r products `x Agu^T` and `h Ad^T`, (S, r) each;
- with adapter dropout, `dropout(x)` (T, H) and a 1-byte mask for `h` (S, I).

Per slot that is `2I + 2r` values plus `H / k`; frozen experts under eager transformers keep `[g, u]`,
`act(g)` and `y`, i.e. `3I + H`. The routing weights' gradient needs `y . dout`, computed without `y` as
`(dout Wd_e) . h + s (dout Bd_e) . (h Ad_e^T)`, both of which backward forms anyway.

Base weights are read one expert at a time through `expert_weight` (a plain 3-D tensor, or any object
with `expert(e, dtype) -> Tensor (out, in)`, e.g. 4-bit storage that dequantizes one expert, or a bounded
chunk of experts per call through its `reader(dtype)`, `_readers`), so a whole
layer is never materialised in another precision. Their gradient is computed only when they are plain
tensors that require grad (they are frozen under LoRA).

Precision. Everything runs in the compute dtype: autocast's dtype when autocast is on for the input's
device, else the input's dtype. LoRA factors (float32 parameters) are cast per expert; their gradients
are accumulated in their own dtype.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from typing import Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import SiLUActivation

from memft.errors import UserError

EXPERT_PARAMS = ("gate_up_proj", "down_proj")
"""The fused 3-D parameters of a transformers 5 experts module, (E, out, in) each."""


@runtime_checkable
class ExpertWeights(Protocol):
    """Storage of one fused projection of E experts that hands out one expert's weight at a time."""

    def expert(self, e: int, dtype: torch.dtype) -> torch.Tensor:
        """Expert e's weight, (out, in) as in `F.linear`, in `dtype`, on the device the experts run on."""
        ...


BaseWeights = torch.Tensor | ExpertWeights


def expert_weight(base: BaseWeights, e: int, dtype: torch.dtype) -> torch.Tensor:
    """Expert e's (out, in) weight in `dtype`, from a plain (E, out, in) tensor or an `ExpertWeights`."""
    if isinstance(base, torch.Tensor):
        return base[e].to(dtype)
    return base.expert(e, dtype)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the expert matmuls run in: autocast's for x's device when it is on, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _route(top_k_index: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, list[int]]:
    """The slots sorted by expert and how many slots each expert gets.

    Slots are the flattened (token, choice) pairs; slot `i` belongs to token `i // k`. An index
    `>= num_experts` (transformers' expert-parallel sentinel) sorts to the tail and is computed by no expert.
    """
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)[:num_experts]
    return order, counts.tolist()  # a host-device sync point: the loop needs the slice sizes


def _slices(counts: list[int]):
    """`(expert, slice of the sorted slots)` for every expert that got at least one slot."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, slice(start, start + n)
        start += n


GROUPED: Literal["auto", "never", "always"] = "auto"
"""How the experts' matmuls run: "auto" one `torch._grouped_mm` per projection where `_grouped_reason` allows
it and the device is in `GROUPED_DEVICES`, else one matmul per expert; "never" always the per-expert loop;
"always" grouped on any device, raising where it cannot run (a switch for tests and benchmarks)."""

GROUPED_DEVICES = ("cuda",)
"""Device types where "auto" groups. Not CPU: there `torch._grouped_mm` is a loop of the same matmuls, and the
whole-layer elementwise steps around it made forward+backward about 6% slower than the per-expert loop (float32,
one thread, T 2048, H 256, I 512, E 8, k 2, r 16)."""

_GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def _grouped_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch._grouped_mm` runs on `device` in `dtype` and gives the per-group products exactly.

    Small integers, so every product is exact in any of the dtypes; repeated offsets (an empty group), a row
    past the last offset, a transposed 3-D operand and the 2-D x 2-D form, as the experts use them.
    """
    ints = lambda n, m, *shape: (torch.arange(math.prod(shape)) % n - m).view(shape).to(device, dtype)  # noqa: E731
    a, b, c = ints(5, 2, 10, 8), ints(7, 3, 3, 8, 8), ints(3, 1, 10, 8)
    offs = torch.tensor([3, 3, 9], dtype=torch.int32, device=device)
    groups = [slice(0, 3), slice(3, 3), slice(3, 9)]
    try:
        with torch.autocast(device.type, enabled=False):
            out = torch._grouped_mm(a, b.mT, offs=offs)[:9]
            wgrad = torch._grouped_mm(a.T, c, offs=offs)
            return (torch.equal(out, torch.cat([a[g] @ b[e].T for e, g in enumerate(groups)]))
                    and all(torch.equal(wgrad[e], a[g].T @ c[g]) for e, g in enumerate(groups) if g.stop > g.start))
    except Exception:  # noqa: BLE001 - any failure of the op means: not here
        return False


def _row_aligned(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """A 3-D operand as `torch._grouped_mm` takes it: one of its last two dims contiguous, the other's stride a
    multiple of 16 bytes, the data 16-byte aligned (checked on the tensor as the call sees it, after a cast)."""
    if t.dtype != dtype:
        return True  # cast to a fresh contiguous tensor; the sizes are checked separately
    align = 16 // t.element_size()
    rows, cols = t.stride(-2), t.stride(-1)
    return t.data_ptr() % 16 == 0 and ((cols == 1 and rows % align == 0) or (rows == 1 and cols % align == 0))


def _grouped_reason(x: torch.Tensor, dtype: torch.dtype, bases: tuple[BaseWeights, BaseWeights],
                    factors: tuple[torch.Tensor, ...]) -> str | None:
    """None when one grouped matmul per projection can run and gives the loop's numbers, else why not."""
    if not hasattr(torch, "_grouped_mm"):
        return "this torch has no torch._grouped_mm"
    if not all(isinstance(b, torch.Tensor) for b in bases):
        return "the base weights are stored otherwise than as plain tensors (read one expert at a time)"
    if any(b.dtype != dtype for b in bases):
        return f"the base weights are not in the compute dtype {dtype} (a grouped call would cast whole layers)"
    if dtype not in _GROUPED_DTYPES:
        return f"torch._grouped_mm does not take {dtype}"
    gate_up_A, _, down_A, _ = factors
    sizes = {"hidden": gate_up_A.shape[2], "intermediate": down_A.shape[2], "rank": gate_up_A.shape[1]}
    odd = [f"{name} {n}" for name, n in sizes.items() if n * dtype.itemsize % 16]
    if odd:
        return f"rows of {', '.join(odd)} {dtype} values are not a multiple of 16 bytes"
    if not all(_row_aligned(t, dtype) for t in (*bases, *factors)):
        return "a weight or factor is laid out otherwise than torch._grouped_mm takes it"
    if not _grouped_mm_works(x.device, dtype):
        return f"torch._grouped_mm does not run (exactly) on {x.device} in {dtype}"
    return None


def _use_grouped(x: torch.Tensor, dtype: torch.dtype, bases: tuple[BaseWeights, BaseWeights],
                 factors: tuple[torch.Tensor, ...]) -> bool:
    """Whether this call takes the grouped path, following `GROUPED`."""
    if GROUPED == "never" or (GROUPED == "auto" and x.device.type not in GROUPED_DEVICES):
        return False
    reason = _grouped_reason(x, dtype, bases, factors)
    if reason is not None and GROUPED == "always":
        raise RuntimeError(f"expert LoRA: GROUPED is 'always' but {reason}")
    return reason is None


class _AllExperts:
    """The products of all of a layer's slots at once, one `torch._grouped_mm` each (offsets: the cumulative
    expert counts, repeated for an expert with no slot); weights are plain (E, out, in) tensors."""

    def __init__(self, counts: list[int], device: torch.device):
        self.counts, self.slots = counts, slice(0, sum(counts))  # the slots after these hold the sentinel
        offs = torch.tensor(list(itertools.accumulate(counts)), dtype=torch.int32, device=device)
        self.gmm = functools.partial(torch._grouped_mm, offs=offs)

    def linear(self, inp, weight, out=None, accumulate=False):
        """`inp @ W_e^T` for each expert's rows; written into (or, with `accumulate`, added to) `out` if given."""
        return _written(self.gmm(inp, weight.mT), out, accumulate)

    def matmul(self, inp, weight, out=None, accumulate=False):
        """`inp @ W_e` for each expert's rows, as `linear`."""
        return _written(self.gmm(inp, weight), out, accumulate)

    def outer(self, a, b, into):
        """`into[e] = a_e^T b_e` for every expert (a weight gradient; zero where an expert got no slot)."""
        into.copy_(self.gmm(a.T, b))
        idle = [e for e, n in enumerate(self.counts) if not n]
        if idle:  # an empty sum the op may leave unset
            into[idle] = 0


class _OneExpert:
    """The same products for one expert's slots, its weights read one expert at a time (`expert_weight`)."""

    def __init__(self, e: int, slots: slice, dtype: torch.dtype):
        self.e, self.slots, self.dtype = e, slots, dtype

    def linear(self, inp, weight, out=None, accumulate=False):
        return _mm(inp, expert_weight(weight, self.e, self.dtype).T, out, accumulate)

    def matmul(self, inp, weight, out=None, accumulate=False):
        return _mm(inp, expert_weight(weight, self.e, self.dtype), out, accumulate)

    def outer(self, a, b, into):
        # `into` starts at zero: an expert with no slot keeps it
        if into.dtype == a.dtype:
            torch.mm(a.T, b, out=into[self.e])
        else:
            into[self.e] = a.T @ b


def _written(product: torch.Tensor, out: torch.Tensor | None, accumulate: bool) -> torch.Tensor:
    if out is None:
        return product
    return out.add_(product) if accumulate else out.copy_(product)


def _mm(inp: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None, accumulate: bool) -> torch.Tensor:
    """`inp @ w`, written into `out` (a contiguous row slice) or added to it in one `addmm_`, without a temporary."""
    if out is None:
        return inp @ w
    return out.addmm_(inp, w) if accumulate else torch.mm(inp, w, out=out)


def _groups(counts: list[int], dtype: torch.dtype, device: torch.device, grouped: bool):
    """The slot groups a layer's experts run in: all at once (grouped), or expert by expert."""
    if grouped:
        return [_AllExperts(counts, device)]
    return [_OneExpert(e, sl, dtype) for e, sl in _slices(counts)]


def _readers(bases: tuple[BaseWeights, BaseWeights], dtype: torch.dtype) -> tuple[BaseWeights, BaseWeights]:
    """The base weights for one pass over the experts: storage with a `reader(dtype)` (4-bit: a bounded chunk of
    experts dequantized per call, `NF4Experts.reader`) gives one for this pass; plain tensors are read as they are."""
    return tuple(b if isinstance(b, torch.Tensor) or not hasattr(b, "reader") else b.reader(dtype) for b in bases)


def _factors(dtype: torch.dtype, scaling: float, gate_up_A, gate_up_B, down_A, down_B):
    """The LoRA factors in the compute dtype, B with the scaling folded in (small: r rows or columns each)."""
    return gate_up_A.to(dtype), (scaling * gate_up_B).to(dtype), down_A.to(dtype), (scaling * down_B).to(dtype)


class _ExpertLora(torch.autograd.Function):
    """The routed experts with LoRA on gate_up and down; saves only what the module docstring lists.

    One body for both paths: it runs once per slot group (`_groups`), all slots under `torch._grouped_mm`, else
    one expert's. The B factors enter scaled (`s B`), so `s` costs no pass over the slots; B's gradients are
    scaled once at the end.
    """

    @staticmethod
    def forward(ctx, x, x_lora, top_k_weights, top_k_index, gate_up, down,
                gate_up_A, gate_up_B, down_A, down_B, scaling, act_fn, h_dropout, dtype):
        T, k = top_k_index.shape
        S, H, inter, rank = T * k, x.shape[1], down_A.shape[2], gate_up_A.shape[1]
        order, counts = _route(top_k_index, gate_up_A.shape[0])
        token_of = order // k
        weights = top_k_weights.reshape(-1)[order, None].to(dtype)
        xc, xlc = x.to(dtype), (x if x_lora is None else x_lora).to(dtype)
        gate_up_out = x.new_empty(S, 2 * inter, dtype=dtype)
        x_a = x.new_zeros(S, rank, dtype=dtype)
        h_a = x.new_zeros(S, rank, dtype=dtype)
        h_mask = None
        if h_dropout > 0:  # one mask row per slot: the adapter of each expert sees its own dropout
            h_mask = torch.empty(S, inter, dtype=torch.bool, device=x.device).bernoulli_(1 - h_dropout)
        y_sorted = x.new_zeros(S, H, dtype=dtype)
        with torch.autocast(x.device.type, enabled=False):
            grouped = _use_grouped(x, dtype, (gate_up, down), (gate_up_A, gate_up_B, down_A, down_B))
            A_gu, sB_gu, A_d, sB_d = _factors(dtype, scaling, gate_up_A, gate_up_B, down_A, down_B)
            gate_up_w, down_w = _readers((gate_up, down), dtype)
            for g in _groups(counts, dtype, x.device, grouped):
                sl = g.slots
                rows = token_of[sl]
                x_rows = xc[rows]
                g.linear(x_rows if x_lora is None else xlc[rows], A_gu, out=x_a[sl])
                g.linear(x_rows, gate_up_w, out=gate_up_out[sl])
                g.linear(x_a[sl], sB_gu, out=gate_up_out[sl], accumulate=True)
                gate, up = gate_up_out[sl].chunk(2, dim=-1)
                h = act_fn(gate) * up
                g.linear(_dropped(h, h_mask, sl, h_dropout), A_d, out=h_a[sl])
                g.linear(h, down_w, out=y_sorted[sl])
                g.linear(h_a[sl], sB_d, out=y_sorted[sl], accumulate=True).mul_(weights[sl])
                del x_rows, gate, up, h
            del gate_up_w, down_w
        ctx.save_for_backward(x, x_lora, top_k_weights, order, gate_up_out, x_a, h_a, h_mask,
                              gate_up_A, gate_up_B, down_A, down_B)
        ctx.bases = (gate_up, down)  # parameters or storage objects: held by the model, not activations
        ctx.counts, ctx.scaling, ctx.act_fn, ctx.h_dropout, ctx.dtype = counts, scaling, act_fn, h_dropout, dtype
        ctx.grouped = grouped
        # back to (token, choice) order, then sum a token's k choices (deterministic, unlike index_add_)
        out = x.new_zeros(S, H, dtype=dtype)
        out[order] = y_sorted
        return out.view(T, k, H).sum(dim=1).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (x, x_lora, top_k_weights, order, gate_up_out, x_a, h_a, h_mask,
         gate_up_A, gate_up_B, down_A, down_B) = ctx.saved_tensors
        gate_up, down = ctx.bases
        s, dtype, p = ctx.scaling, ctx.dtype, ctx.h_dropout
        needs = ctx.needs_input_grad
        k = top_k_weights.shape[1]
        token_of = order // k
        weights = top_k_weights.reshape(-1)[order, None].to(dtype)
        xc, xlc = x.to(dtype), (x if x_lora is None else x_lora).to(dtype)
        dout = grad_out.to(dtype)

        # gradients in the leaves' own dtypes; base weights get one only when they are plain tensors that
        # require one (never under LoRA)
        grads = {name: (torch.zeros_like(t) if needs[i] else None) for i, name, t in (
            (4, "gate_up", gate_up), (5, "down", down), (6, "gate_up_A", gate_up_A), (7, "gate_up_B", gate_up_B),
            (8, "down_A", down_A), (9, "down_B", down_B))}
        dx = torch.zeros_like(xc) if needs[0] else None
        # when the adapters read x itself, their part of dx joins the base's in one index_add_ per group
        dx_lora = torch.zeros_like(xc) if x_lora is not None and needs[1] else None
        d_weights = torch.zeros(order.shape[0], dtype=dtype, device=x.device) if needs[2] else None

        with torch.autocast(x.device.type, enabled=False):
            A_gu, sB_gu, A_d, sB_d = _factors(dtype, s, gate_up_A, gate_up_B, down_A, down_B)
            gate_up_w, down_w = _readers((gate_up, down), dtype)
            for g in _groups(ctx.counts, dtype, x.device, ctx.grouped):
                sl = g.slots
                rows = token_of[sl]
                w = weights[sl]
                gate, up = gate_up_out[sl].chunk(2, dim=-1)
                act = ctx.act_fn(gate)
                h = act * up
                h_in = _dropped(h, h_mask, sl, p)

                # down: y = h Wd^T + (h Ad^T) (s Bd)^T; the slot's output is w * y
                g_y = dout[rows]  # the gradient of y before the routing weight
                g_y_B = g.matmul(g_y, sB_d)  # s g_y Bd, (n, r)
                g_h = g.matmul(g_y, down_w)  # (n, I), the base's part
                if d_weights is not None:  # dL/dw = g_y . y, without keeping y
                    d_weights[sl] = (g_h * h).sum(-1) + (g_y_B * h_a[sl]).sum(-1)
                g_y.mul_(w)
                g_y_B.mul_(w)
                if grads["down_B"] is not None:
                    g.outer(g_y, h_a[sl], grads["down_B"])
                if grads["down_A"] is not None:
                    g.outer(g_y_B, h_in, grads["down_A"])
                if grads["down"] is not None:
                    g.outer(g_y, h, grads["down"])
                g_h.mul_(w)
                if h_mask is None:
                    g.matmul(g_y_B, A_d, out=g_h, accumulate=True)
                else:
                    g_h.add_(_dropped(g.matmul(g_y_B, A_d), h_mask, sl, p))
                del g_y, g_y_B, h, h_in

                # gate/up: h = act(g) * u
                g_gu = torch.empty_like(gate_up_out[sl])
                torch.mul(g_h, act, out=g_gu[:, up.shape[1]:])
                g_gu[:, :up.shape[1]] = _activation_backward(ctx.act_fn, g_h.mul_(up), gate)
                del g_h, act

                # gate_up: [g, u] = x Wgu^T + (x Agu^T) (s Bgu)^T
                g_gu_B = g.matmul(g_gu, sB_gu)  # s g_gu Bgu, (n, r)
                x_rows = xc[rows]
                if grads["gate_up_B"] is not None:
                    g.outer(g_gu, x_a[sl], grads["gate_up_B"])
                if grads["gate_up_A"] is not None:
                    g.outer(g_gu_B, x_rows if x_lora is None else xlc[rows], grads["gate_up_A"])
                if grads["gate_up"] is not None:
                    g.outer(g_gu, x_rows, grads["gate_up"])
                if dx is not None:
                    d_rows = g.matmul(g_gu, gate_up_w)
                    if x_lora is None:
                        g.matmul(g_gu_B, A_gu, out=d_rows, accumulate=True)
                    dx.index_add_(0, rows, d_rows)
                if dx_lora is not None:
                    dx_lora.index_add_(0, rows, g.matmul(g_gu_B, A_gu))
                del g_gu, g_gu_B, x_rows
            del gate_up_w, down_w

        for name in ("gate_up_B", "down_B"):  # the B factors entered as s B
            if grads[name] is not None:
                grads[name].mul_(s)
        d_top_k = None
        if d_weights is not None:
            d_top_k = torch.zeros_like(d_weights)
            d_top_k[order] = d_weights
            d_top_k = d_top_k.view_as(top_k_weights).to(top_k_weights.dtype)
        dx = None if dx is None else dx.to(x.dtype)
        d_x_lora = None if dx_lora is None else dx_lora.to(x_lora.dtype)
        return (dx, d_x_lora, d_top_k, None, grads["gate_up"], grads["down"],
                grads["gate_up_A"], grads["gate_up_B"], grads["down_A"], grads["down_B"], None, None, None, None)


def _activation_backward(act_fn: Callable[[torch.Tensor], torch.Tensor], grad: torch.Tensor,
                         gate: torch.Tensor) -> torch.Tensor:
    """The gradient of `gate` from that of `act(gate)`: SiLU's fused kernel (`aten.silu_backward`, what autograd
    runs for it), else act's own autograd."""
    if isinstance(act_fn, (nn.SiLU, SiLUActivation)):
        return torch.ops.aten.silu_backward(grad, gate)
    with torch.enable_grad():
        leaf = gate.detach().requires_grad_()
        act = act_fn(leaf)
    return torch.autograd.grad(act, leaf, grad)[0]


def _dropped(t: torch.Tensor, mask: torch.Tensor | None, sl: slice, p: float) -> torch.Tensor:
    """`t` with the slots' dropout mask applied (inverted dropout), or `t` when there is no dropout."""
    if mask is None:
        return t
    return t * mask[sl] / (1 - p)


def expert_lora(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                gate_up: BaseWeights, down: BaseWeights,
                gate_up_A: torch.Tensor, gate_up_B: torch.Tensor, down_A: torch.Tensor, down_B: torch.Tensor,
                scaling: float, act_fn: Callable[[torch.Tensor], torch.Tensor],
                dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """The routed experts' output (T, H) with LoRA on both projections (see the module docstring).

    Args:
        hidden_states: (T, H) tokens. top_k_index, top_k_weights: (T, k) chosen experts and their weights.
        gate_up, down: the base weights, (E, 2I, H) and (E, H, I) tensors or `ExpertWeights`.
        gate_up_A (E, r, H), gate_up_B (E, 2I, r), down_A (E, r, I), down_B (E, H, r): the LoRA factors.
        scaling: `alpha / r` (rsLoRA: `alpha / sqrt(r)`). act_fn: the experts' activation.
        dropout: dropout on the adapters' inputs (x for gate_up, h for down), only while `training`.
    """
    p = dropout if training else 0.0
    x_lora = F.dropout(hidden_states, p, training=True) if p > 0 else None
    return _ExpertLora.apply(hidden_states, x_lora, top_k_weights, top_k_index, gate_up, down,
                             gate_up_A, gate_up_B, down_A, down_B, scaling, act_fn, p,
                             compute_dtype(hidden_states))


def _check_layout(experts: nn.Module) -> None:
    """Refuse experts whose fused weights are laid out otherwise than `F.linear(x, W[e])` with [gate; up]."""
    layout = {"is_transposed": False, "has_bias": False, "has_gate": True, "is_concatenated": True,
              "has_post_expert_norm": False}
    odd = [f"{name}={getattr(experts, name)}" for name, usual in layout.items()
           if getattr(experts, name, usual) != usual]
    if odd:
        raise UserError(f"memft's expert LoRA does not support the experts layout of {type(experts).__name__} "
                        f"({', '.join(odd)}); it supports Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE experts")


class LoraExperts(nn.Module):
    """A transformers experts module with LoRA on every expert's gate_up and down projections.

    The wrapped module's fused weights are kept (frozen) under their own names, so the state dict of the
    base weights is unchanged; the adapters are `gate_up_lora_A` (E, r, H), `gate_up_lora_B` (E, 2I, r),
    `down_lora_A` (E, r, I), `down_lora_B` (E, H, r), float32 (float64 for float64 experts). peft's init:
    A kaiming-uniform, B zero, so a fresh wrapper computes exactly what the wrapped module does.

    `gate_up` / `down` replace the base weights with other storage (an `ExpertWeights`, e.g. 4-bit).
    """

    def __init__(self, experts: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 gate_up: ExpertWeights | None = None, down: ExpertWeights | None = None):
        super().__init__()
        _check_layout(experts)
        self.num_experts = experts.num_experts
        self.hidden_dim = experts.hidden_dim
        self.intermediate_dim = experts.intermediate_dim
        self.act_fn = experts.act_fn
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self._storage = {"gate_up_proj": gate_up, "down_proj": down}  # None: the fused parameter itself
        for name, storage in self._storage.items():  # storage modules follow .to() and the state dict
            if isinstance(storage, nn.Module):
                self.add_module(f"{name}_storage", storage)
        for name in EXPERT_PARAMS:  # keep the fused parameters under their names, frozen
            param = getattr(experts, name, None)
            if self._storage[name] is None and isinstance(param, nn.Parameter):
                param.requires_grad_(False)
                self.register_parameter(name, param)
        base = next(iter([*experts.parameters(), *experts.buffers()]), torch.empty(0))
        # trainable factors are float32 for half-precision experts and float64 for float64 ones
        factory = dict(device=base.device, dtype=torch.promote_types(base.dtype, torch.float32))
        E, H, I = self.num_experts, self.hidden_dim, self.intermediate_dim
        self.gate_up_lora_A = nn.Parameter(_kaiming_uniform((E, r, H), factory))
        self.gate_up_lora_B = nn.Parameter(torch.zeros(E, 2 * I, r, **factory))
        self.down_lora_A = nn.Parameter(_kaiming_uniform((E, r, I), factory))
        self.down_lora_B = nn.Parameter(torch.zeros(E, H, r, **factory))

    @property
    def gate_up_base(self) -> BaseWeights:
        return self._storage["gate_up_proj"] if self._storage["gate_up_proj"] is not None else self.gate_up_proj

    @property
    def down_base(self) -> BaseWeights:
        return self._storage["down_proj"] if self._storage["down_proj"] is not None else self.down_proj

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        return expert_lora(hidden_states, top_k_index, top_k_weights, self.gate_up_base, self.down_base,
                           self.gate_up_lora_A, self.gate_up_lora_B, self.down_lora_A, self.down_lora_B,
                           self.scaling, self.act_fn, dropout=self.dropout, training=self.training)

    @torch.no_grad()
    def merge(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """`{"gate_up_proj": W + s B A, "down_proj": ...}`, (E, out, in) each, in `dtype` (default: the base
        weights' dtype, float32 for other storage); a plain experts module with these computes this one."""
        merged = {}
        for name, base, A, B in (("gate_up_proj", self.gate_up_base, self.gate_up_lora_A, self.gate_up_lora_B),
                                 ("down_proj", self.down_base, self.down_lora_A, self.down_lora_B)):
            out_dtype = dtype or (base.dtype if isinstance(base, torch.Tensor) else torch.float32)
            work = A.dtype  # float32 at least: a bf16 merge rounds once, at the end
            merged[name] = torch.stack([(expert_weight(base, e, work) + self.scaling * B[e] @ A[e]).to(out_dtype)
                                        for e in range(self.num_experts)])
        return merged

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}"


def _kaiming_uniform(shape: tuple[int, int, int], factory: dict) -> torch.Tensor:
    """(E, r, in) with each expert's A as peft inits it (`kaiming_uniform_(a=sqrt(5))`: U(+-1/sqrt(in)))."""
    bound = 1 / math.sqrt(shape[-1])
    return torch.empty(shape, **factory).uniform_(-bound, bound)


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers 5 experts module: 3-D `gate_up_proj` and `down_proj` parameters."""
    return all(isinstance(getattr(module, name, None), torch.Tensor) and getattr(module, name).dim() == 3
               for name in EXPERT_PARAMS) and not isinstance(module, LoraExperts)


def stored_experts(module: nn.Module) -> dict[str, ExpertWeights] | None:
    """`{"gate_up": ..., "down": ...}` for an experts module whose fused weights were replaced by other storage
    (e.g. `NF4Experts` holders, by `memft.models.nf4_experts.quantize_experts`), else None."""
    storage = {name: getattr(module, f"{name}_proj", None) for name in ("gate_up", "down")}
    if hasattr(module, "num_experts") and all(isinstance(s, nn.Module) and isinstance(s, ExpertWeights)
                                              for s in storage.values()):
        return storage
    return None


def wrap_experts(model: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False) -> list[str]:
    """Replace every experts module of `model` (fused 3-D weights, or their 4-bit storage) by a `LoraExperts`
    around it; returns their names."""
    targets = [(name, module) for name, module in model.named_modules()
               if not isinstance(module, LoraExperts) and (is_fused_experts(module) or stored_experts(module))]
    for name, module in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, LoraExperts(module, r, alpha, dropout=dropout, rslora=rslora,
                                          **(stored_experts(module) or {})))
    return [name for name, _ in targets]
