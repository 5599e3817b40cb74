"""`meft`: a very wide sparse key-value adapter on every FFN, its keys and values in host memory.

Hao et al., "MEFT: Memory-Efficient Fine-Tuning through Sparse Adapter" (ACL 2024). Parallel to
each decoder layer's FFN (dense MLP or MoE block), on the FFN's normed input `x`, the adapter adds
`sum_{j in S(x)} relu(g_e(j)(x) * k_j . x) v_j` (`adapter.py`): a learned router picks `n_probe` of the
E key-experts per token and only their keys are scored; the top-K survive. `V` starts at zero.

Placement (`offload.py`): K and V (M x d each per layer) and their AdamW state live in host memory;
per forward only the rows of the experts some token probes are copied to the device, as leaves whose
gradients go back after backward; the adapter's AdamW runs on the CPU after the loop's optimizer step,
on the rows that were touched (`rows: touched`, lazy AdamW) or on all rows (`rows: all`, exact AdamW).
The routers (E x d per layer) are small and train on the device with the loop's optimizer. Without
`full`/`lora`/`qlora` in the recipe the base model is frozen.

On CUDA the rows travel from pinned memory on a side stream while the FFN computes. `device_rows` caps
the rows of a layer on the device in a training step, making device memory flat in the width: the layer's
first call in a forward decides its allowed experts from the real (non-padding) tokens, and every later call
of that layer in the same forward (TokenTune's second pass, checkpointing's recomputation) reuses them.

The host rows' gradients count in the loop's `grad_norm` and `train.max_grad_norm` (`outside_grads`). The
adapter follows the model's dtype: float64 models keep it in float64, half-precision ones in float32. See
docs/strategies/meft.md.
"""

from __future__ import annotations

import functools
import math
import time
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from memft.errors import UserError
from memft.registry import BuildContext, MemoryEstimate, Strategy, StrategyParams, register

if TYPE_CHECKING:
    import torch
    from torch import nn

    from memft.strategies.meft.adapter import Gathered
    from memft.strategies.meft.offload import HostAdapter

ROUTER_INIT_SCALE = 50.0
"""The router starts as this many times each expert's mean key (a scaled centroid), as in the reference code."""


class MeftParams(StrategyParams):
    width: int = Field(default=4096, ge=2)
    """M: key-value pairs per layer."""
    experts: int | None = Field(default=None, ge=1)
    """E: key-experts per layer, each a contiguous block of M/E keys (must divide `width`). Default: about sqrt(M)."""
    n_probe: int = Field(default=2, ge=1)
    """Experts each token probes (only their keys are scored)."""
    topk: int = Field(default=32, ge=1)
    """Keys kept per token after scoring."""
    key_init: Literal["random", "ffn"] = "random"
    """`random`: normal(0, `init_std`). `ffn`: rows of the layer's own FFN input projection (`up_proj`, or the
    experts' up halves), a seeded sample (repeated when M exceeds them), as the paper initialises from the
    FFN. Values start at zero either way, so the model starts unchanged."""
    init_std: float = Field(default=0.02, gt=0)
    """Std of the keys' normal init with `key_init: random`."""
    mode: Literal["sparse", "dense"] = "sparse"
    """`sparse`: MEFT. `dense`: the plain parallel adapter of the same width, `V relu(K x)` over every key (no
    router, no top-K; all rows shipped every step), for comparison."""
    device_rows: int | None = Field(default=None, ge=1)
    """Most key-value rows of one layer on the device in a training step (default: no cap, the exact function).
    When a batch probes more experts than fit, the step keeps the experts most tokens probe (ties: lower id)
    and each token probes its best `n_probe` among them: device memory is then flat in `width`, at the cost
    of rerouting some probes (`meft_rerouted_probes` says how many). Evaluation is never capped."""
    rows: Literal["touched", "all"] = "touched"
    """AdamW on the host rows a step touched (lazy: untouched rows and their moments stay as they are) or on
    all rows (exact AdamW; costs a pass over the whole adapter per step)."""
    lr: float | None = Field(default=None, gt=0)
    """Learning rate of the keys and values (default `train.lr`); it follows the run's warm-up and decay."""
    weight_decay: float = Field(default=0.0, ge=0)
    """Decoupled weight decay of the keys and values."""

    @model_validator(mode="after")
    def _fits(self) -> MeftParams:
        if self.experts is None:
            root = round(math.sqrt(self.width))
            self.experts = max(d for d in range(1, root + 1) if self.width % d == 0)
        if self.width % self.experts:
            raise ValueError(f"`experts` ({self.experts}) must divide `width` ({self.width})")
        if self.n_probe > self.experts:
            raise ValueError(f"`n_probe` ({self.n_probe}) cannot exceed `experts` ({self.experts})")
        block = self.width // self.experts
        if self.device_rows is not None and self.device_rows < self.n_probe * block:
            raise ValueError(f"`device_rows` ({self.device_rows}) must hold the `n_probe` experts a token probes "
                             f"({self.n_probe} x {block} keys = {self.n_probe * block})")
        return self


@register
class Meft(Strategy):
    name = "meft"
    Params = MeftParams
    order = 30
    summary = "Wide sparse key-value adapters on every FFN, kept in host memory; a router picks the rows."
    step_in_backward = ("its host key/value rows are accumulated and stepped by its own host AdamW after backward; "
                        "the combination is not built yet")
    adds_trainable = True
    conflicts = {
        "revffn": "RevFFN recomputes each FFN from a rebuilt input, and MEFT's key routing is not replayed there "
                  "yet; use one of them.",
    }
    params: MeftParams

    def __init__(self, params: MeftParams):
        super().__init__(params)
        self.hosts: list[HostAdapter] = []
        self.routers: list[nn.Parameter] = []
        self.pending: list[tuple[int, object, torch.Tensor]] = []
        self.meters = self._fresh_meters()  # this step's
        self.finished_steps: list[dict] = []  # since the last report
        self.reported: dict = {}
        self.device_peak = 0
        self.lr_factor = None
        self.copy_stream = None
        self.dtype: torch.dtype | None = None  # of the router, the host K / V and the adapter's computation (`apply`)
        self.shipped: dict[int, list[torch.Tensor]] = {}  # layer -> expert ids whose rows this step shipped
        self.forward_id = 0  # bumped by every forward of the decoder body
        self.attention_mask: torch.Tensor | None = None  # that forward's (B, T) mask, for the cap's votes
        self.allowed: dict[int, tuple[int, torch.Tensor]] = {}  # layer -> (forward_id, (E,) bool) under a cap

    def apply(self, model: nn.Module, ctx: BuildContext) -> nn.Module:
        import torch
        from torch import nn

        from memft.models.blocks import decoder_body
        from memft.strategies.meft.offload import HostAdapter

        p = self.params
        body = decoder_body(model)
        recipe = ctx.recipe
        if not any(s.name in ("full", "lora", "qlora") for s in recipe.strategies):
            model.requires_grad_(False)  # MEFT alone: the base is frozen, only adapters and routers learn
        d = model.config.hidden_size
        g = torch.Generator().manual_seed(recipe.model.seed)
        self.dtype = _adapter_dtype(body)
        pin = ctx.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(ctx.device) if pin else None
        block = p.width // p.experts
        for i, layer in enumerate(body.layers):
            if ctx.device.type == "meta":  # `memft profile`: the routers' shapes only; `estimate` counts the rest
                layer.mlp.register_parameter("meft_router", nn.Parameter(torch.empty(p.experts, d, device="meta")))
                continue
            # random keys are drawn in float32 whatever the dtype: a float64 model starts from the float32 run's adapter
            keys = (_ffn_rows(layer.mlp, p.width, g) if p.key_init == "ffn"
                    else torch.randn(p.width, d, generator=g) * p.init_std).to(self.dtype)
            router = ROUTER_INIT_SCALE * keys.view(p.experts, block, d).mean(1)
            self.hosts.append(HostAdapter(keys, torch.zeros(p.width, d, dtype=self.dtype), p.experts, pin=pin))
            param = nn.Parameter(router.to(ctx.device))
            layer.mlp.register_parameter("meft_router", param)
            self.routers.append(param)
            layer.mlp.forward = functools.partial(_with_adapter, self, i, layer.mlp, layer.mlp.forward)
        body.register_forward_pre_hook(self._new_forward, with_kwargs=True)
        self.lr_factor = _Schedule(recipe, ctx.total_steps)
        n = len(body.layers)
        ctx.notes.append(f"meft: {n} layers x {p.width:,} key-value pairs ({p.experts} experts of {block}, "
                         f"{p.n_probe} probed, top-{p.topk}) in host memory: "
                         f"{2 * n * p.width * d * self.dtype.itemsize / 2**20:,.1f} MiB of weights, "
                         "as much again x2 of AdamW state")
        return model

    def estimate(self, model: nn.Module, recipe, tokens: int, device: torch.device) -> MemoryEstimate:
        from memft.models.blocks import decoder_body

        p = self.params
        body = decoder_body(model)
        layers = len(body.layers)
        d = model.config.hidden_size
        block = p.width // p.experts
        size = _adapter_dtype(body).itemsize
        # host, for keys and values: weights, gradient buffers and two AdamW moments, per-row step counts (int64)
        # and touched flags (bool)
        host = layers * 2 * (4 * p.width * d * size + 8 * p.width + p.width)
        # device: the gradients of the rows a step ships (at most every probed expert's block, the cap, or the whole
        # adapter); the rows themselves are saved for backward, so the activations hold them
        rows = min(p.width, p.device_rows or p.width, tokens * p.n_probe * block) if p.mode == "sparse" else p.width
        return MemoryEstimate(device={"meft shipped-row gradients": layers * rows * d * size * 2},
                              host={"meft adapters and AdamW state": host},
                              notes=["meft: shipped rows are an upper bound (the union of the probed experts); "
                                     "its activations are fitted on twins with 16 keys per expert"])

    def vary_for_profile(self, rng) -> None:
        # twins keep the routing but not the width: 16 keys per expert (at most), in CPU memory
        p = self.params
        real_block = p.width // p.experts
        block = min(real_block, 16)
        cap = None if p.device_rows is None else max(p.n_probe * block, p.device_rows * block // real_block)
        self.params = p.model_copy(update={"width": p.experts * block, "topk": min(p.topk, p.n_probe * block),
                                           "device_rows": cap})

    def ship(self, i: int, x: torch.Tensor, training: bool) -> Gathered:
        """Route the tokens and send their experts' rows to the device (on CUDA on a side stream, so the FFN
        computes while they travel)."""
        import torch

        from memft.strategies.meft.adapter import probe

        p = self.params
        flat = x.reshape(-1, x.size(-1)).to(self.dtype)
        router = self.routers[i]
        with torch.no_grad():
            if p.mode == "dense":
                experts = torch.arange(p.experts, device=flat.device)
            else:  # the union of the probed experts (within the cap's allowed set: evaluation is never capped)
                allowed = self._allowed(i, router, flat, x.shape[:-1]) if training and p.device_rows else None
                experts = torch.unique(probe(router, flat, p.n_probe, allowed)[1])
        rows, index = self.hosts[i].gather(experts, router, flat.device, stream=self.copy_stream)
        if training:  # evaluation's traffic is not a training step's
            self.meters["meft_bytes_to_device"] += 2 * rows.keys.numel() * rows.keys.element_size()
        if torch.is_grad_enabled():
            self.pending.append((i, rows, index))
        return rows

    def adapter_out(self, i: int, x: torch.Tensor, rows: Gathered) -> torch.Tensor:
        import torch

        from memft.strategies.meft.adapter import sparse_forward

        p = self.params
        rows.wait()
        flat = x.reshape(-1, x.size(-1)).to(self.dtype)
        y = (torch.relu(flat @ rows.keys.T) @ rows.values if p.mode == "dense"
             else sparse_forward(flat, rows, p.n_probe, p.topk, p.width // p.experts))
        return y.to(x.dtype).view(x.shape)

    def _new_forward(self, body: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of the decoder body: a new forward, so every layer decides its cap afresh."""
        from memft.data.batching import token_mask

        self.forward_id += 1
        self.attention_mask = token_mask(kwargs, args)  # a packed batch's too (it passes no attention_mask)

    def _allowed(self, i: int, router: torch.Tensor, x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """(E,) bool: the experts layer `i` may use in this forward under the cap.

        The layer's first call in a forward keeps the experts the real tokens probe most (ties: lower id; padding
        has no vote, so the amount of padding routes nothing); later calls in the same forward (TokenTune's selected
        rows, a checkpointed layer's recomputation) reuse that set, so every row runs under the same one.
        """
        import torch

        from memft.strategies.meft.adapter import probe

        decided = self.allowed.get(i)
        if decided is not None and decided[0] == self.forward_id:
            return decided[1]
        p = self.params
        mask = self.attention_mask
        if mask is not None and mask.shape == shape and mask.any():
            x = x[mask.flatten().bool()]
        probed = probe(router, x, p.n_probe)[1].flatten()
        votes = torch.bincount(probed, minlength=p.experts)
        keep = torch.argsort(votes, descending=True, stable=True)[:p.device_rows // (p.width // p.experts)]
        keep = keep[votes[keep] > 0]
        self.meters["meft_rerouted_probes"] = max(self.meters["meft_rerouted_probes"],
                                                  1 - votes[keep].sum().item() / probed.numel())
        allowed = torch.zeros(p.experts, dtype=torch.bool, device=x.device).index_fill_(0, keep, True)
        self.allowed[i] = (self.forward_id, allowed)
        return allowed

    def after_backward(self, step: int) -> None:
        # every layer's gathered rows and their gradients are alive until now, with the routers' AdamW state
        shipped = sum(2 * rows.keys.numel() * rows.keys.element_size() for _, rows, _ in self.pending)
        routers = sum(r.numel() * r.element_size() for r in self.routers)
        self.meters["meft_device_bytes"] = 2 * shipped + 4 * routers
        for i, rows, index in self.pending:
            self.meters["meft_bytes_to_host"] += self.hosts[i].accumulate(rows, index)
            self.shipped.setdefault(i, []).append(rows.experts)
        self.pending.clear()

    def outside_grads(self) -> list[torch.Tensor]:
        """The host gradients of the rows this step shipped (summed over its micro-batches), as views that clipping
        scales in place: one per run of adjacent experts, so the norm never reads the untouched rest of the adapter."""
        import torch

        views = []
        for i, experts in self.shipped.items():
            h = self.hosts[i]
            for first, end in _runs(torch.unique(torch.cat(experts)).tolist()):
                views += [h.grads[name][first * h.block:end * h.block] for name in ("keys", "values")]
        return views

    def after_optimizer_step(self, step: int) -> None:
        p = self.params
        lr = (p.lr or self.lr_factor.base) * self.lr_factor(step)
        started = time.perf_counter()
        self.meters["meft_rows_touched"] = sum(
            h.step(lr, betas=self.lr_factor.betas, weight_decay=p.weight_decay, rows=p.rows) for h in self.hosts)
        self.meters["meft_cpu_optimizer_s"] = time.perf_counter() - started
        self.shipped.clear()
        self.finished_steps.append(self.meters)
        self.meters = self._fresh_meters()

    def _fresh_meters(self) -> dict:
        meters = {"meft_bytes_to_device": 0, "meft_bytes_to_host": 0, "meft_rows_touched": 0,
                  "meft_cpu_optimizer_s": 0.0, "meft_device_bytes": 0}
        if self.params.device_rows is not None:
            meters["meft_rerouted_probes"] = 0.0
        return meters

    def metrics(self) -> dict:
        """Per step, averaged over the steps since the last report (device bytes and rerouting: their maximum);
        with no new step (the summary), the last report again. `meft_device_bytes_peak` covers the whole run."""
        if self.finished_steps:
            steps, self.finished_steps = self.finished_steps, []
            worst = ("meft_device_bytes", "meft_rerouted_probes")
            self.reported = {k: max(m[k] for m in steps) if k in worst else sum(m[k] for m in steps) / len(steps)
                             for k in steps[0]}
            self.device_peak = max(self.device_peak, self.reported["meft_device_bytes"])
        return {**self.reported, "meft_device_bytes_peak": self.device_peak}

    def tensor_state(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, h in enumerate(self.hosts):
            for name in h.params:
                out[f"{i}.{name}"] = h.params[name]
                out[f"{i}.{name}.exp_avg"] = h.exp_avg[name]
                out[f"{i}.{name}.exp_avg_sq"] = h.exp_avg_sq[name]
                out[f"{i}.{name}.row_steps"] = h.row_steps[name]
        return out

    def load_tensor_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for i, h in enumerate(self.hosts):
            for name in h.params:
                h.params[name].copy_(tensors[f"{i}.{name}"])
                h.exp_avg[name].copy_(tensors[f"{i}.{name}.exp_avg"])
                h.exp_avg_sq[name].copy_(tensors[f"{i}.{name}.exp_avg_sq"])
                h.row_steps[name].copy_(tensors[f"{i}.{name}.row_steps"])


def _ffn_rows(mlp: nn.Module, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` rows of the FFN's input-side projection (dense `up_proj`, or every expert's up half), sampled."""
    import torch

    if hasattr(mlp, "up_proj"):
        rows = mlp.up_proj.weight
    elif hasattr(getattr(mlp, "experts", None), "gate_up_proj"):
        fused = mlp.experts.gate_up_proj  # (experts, 2 * intermediate, hidden): gate rows, then up rows
        rows = fused[:, fused.size(1) // 2:].reshape(-1, fused.size(-1))
    else:
        raise UserError(f"meft `key_init: ffn` does not know the input projection of {type(mlp).__name__}; "
                        "use `key_init: random`")
    rows = rows.detach().cpu()
    picks = torch.cat([torch.randperm(rows.size(0), generator=generator)
                       for _ in range(-(-count // rows.size(0)))])[:count]
    return rows[picks].clone()


def _adapter_dtype(body: nn.Module) -> torch.dtype:
    """The dtype the adapter is kept and computed in: the model's, at least float32 (half-precision models compute
    it in float32, a float64 model in float64). 4-bit weights are not floating point: the model's others decide."""
    import torch

    weights = next(w.dtype for w in body.parameters() if w.is_floating_point())
    return torch.promote_types(weights, torch.float32)


def _runs(ids: list[int]) -> list[tuple[int, int]]:
    """Ascending ids as half-open runs of consecutive ones: [1, 2, 3, 7] -> [(1, 4), (7, 8)]."""
    runs: list[list[int]] = []
    for e in ids:
        if runs and runs[-1][1] == e:
            runs[-1][1] = e + 1
        else:
            runs.append([e, e + 1])
    return [(first, end) for first, end in runs]


def _with_adapter(strategy: Meft, index: int, mlp: nn.Module, ffn_forward, x: torch.Tensor, *args, **kwargs):
    rows = strategy.ship(index, x, mlp.training)  # first, so that the copy overlaps the FFN on CUDA
    out = ffn_forward(x, *args, **kwargs)
    if isinstance(out, tuple):  # MoE blocks that also return router logits
        return (out[0] + strategy.adapter_out(index, x, rows),) + out[1:]
    return out + strategy.adapter_out(index, x, rows)


class _Schedule:
    """The run's learning-rate factor at a step (warm-up, decay), read off a scheduler on a dummy parameter."""

    def __init__(self, recipe, total_steps: int | None):
        import torch

        from memft.train.optim import build_scheduler

        t = recipe.train
        self.base, self.betas = t.lr, t.betas
        self.optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        self.scheduler = build_scheduler(self.optimizer, t, total_steps or t.max_steps or 10**9)

    def __call__(self, step: int) -> float:
        return self.scheduler.lr_lambdas[0](step)

