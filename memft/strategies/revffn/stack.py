"""The reversible decoder stack: couplings, routing replay, and the autograd function.

A coupling turns every pre-norm layer `h = x + A(x); out = h + F(h)` into steps on two streams
`(s0, s1)`, each step `s[t] = scale * s[t] + coef * branch(s[u])` with `u != t` and `branch` the
layer's attention branch, FFN / MoE branch or the identity. Such a step is undone exactly by
`s[t] = (s[t] - coef * branch(s[u])) / scale`, so backward can rebuild every layer's input from
its output instead of keeping it:

* `additive` (the paper's baseline): `s0 += A(s1); s1 += F(s0)`; both streams start as the
  embeddings, the output is `(s0 + s1) / 2`.
* `momentum` (a momentum residual network): per branch `v = gamma * v + (1 - gamma) * f(x); x += v`
  with `s0 = x` (starts as the embeddings) and `s1 = v` (starts at zero); the output is `x`. At
  `gamma -> 0` this is the pretrained layer itself, so conversion drift is small, but undoing a step
  divides by `gamma`: reconstruction error grows by about `1 / gamma` per branch (`buffer_every`).

The streams and their add / subtract stay in float32 (float64 for float64 models) whatever dtype
the blocks run in.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from memft.models.blocks import attention_branch, ffn_branch
from memft.models.moe import balance_weight, expert_counts, masked_probs, router_of


@dataclass(frozen=True)
class Step:
    """`s[target] = scale * s[target] + coef * branch(s[source])`; branch None is the identity."""

    target: int
    source: int
    branch: str | None
    scale: float = 1.0
    coef: float = 1.0


def coupling_steps(coupling: str, gamma: float) -> list[Step]:
    """The steps one decoder layer becomes."""
    if coupling == "additive":
        return [Step(0, 1, "attention"), Step(1, 0, "ffn")]
    if coupling == "momentum":
        return [Step(1, 0, "attention", gamma, 1 - gamma), Step(0, 1, None),
                Step(1, 0, "ffn", gamma, 1 - gamma), Step(0, 1, None)]
    raise ValueError(f"unknown coupling {coupling!r}")


def init_streams(h: torch.Tensor, coupling: str) -> tuple[torch.Tensor, torch.Tensor]:
    return (h, h) if coupling == "additive" else (h, torch.zeros_like(h))


def merge_streams(s0: torch.Tensor, s1: torch.Tensor, coupling: str) -> torch.Tensor:
    return (s0 + s1) / 2 if coupling == "additive" else s0


def apply_step(step: Step, streams: list[torch.Tensor], y: torch.Tensor) -> None:
    """Forward of a step, given the branch output `y` (the source stream itself for identity steps)."""
    t = streams[step.target]
    streams[step.target] = (t if step.scale == 1 else step.scale * t) + (y if step.coef == 1 else step.coef * y)


def undo_step(step: Step, streams: list[torch.Tensor], y: torch.Tensor) -> None:
    t = streams[step.target] - (y if step.coef == 1 else step.coef * y)
    streams[step.target] = t if step.scale == 1 else t / step.scale


# ---------------------------------------------------------------------------------- routing


class RouterTap:
    """A forward hook on one MoE router.

    `record`: keep the forward's expert choices and the router logits. `replay`: keep the logits
    (with their graph, for the load-balancing loss) and force the recorded choices, re-weighted by
    the recomputed probabilities exactly as the router weights its own choices; a token whose
    recomputed top-k differs from the recorded one is a routing flip (caused by reconstruction
    error) and is counted.
    """

    def __init__(self, router: nn.Module):
        self.router = router
        self.mode: str | None = None
        self.choices: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None
        self.flips = 0
        self.handle = router.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        if self.mode is None:
            return None
        logits, scores, chosen = output
        self.logits = logits
        if self.mode == "record":
            self.choices = chosen.detach()
            return None
        recorded = self.choices.to(chosen.dtype)
        if torch.equal(chosen, recorded):
            return None  # same choices: the router's own output is already exact
        self.flips += int((chosen.sort(-1).values != recorded.sort(-1).values).any(-1).sum())
        weights = torch.softmax(logits.float(), dim=-1).gather(-1, recorded)
        if getattr(module, "norm_topk_prob", True):  # Mixtral always renormalises; the others say so
            weights = weights / weights.sum(-1, keepdim=True)
        return logits, weights.to(scores.dtype), recorded


def choice_dtype(num_experts: int) -> torch.dtype:
    """The smallest integer type that holds an expert index (saved per token and layer)."""
    return torch.uint8 if num_experts <= 256 else torch.int16 if num_experts <= 32767 else torch.int32


@dataclass
class Saved:
    """What a forward leaves for backward besides the output streams (all of it saved through autograd)."""

    kept: dict[int, tuple[torch.Tensor, torch.Tensor]]
    """Layer -> its exact input streams (buffer points; every layer when tracking)."""
    choices: dict[int, torch.Tensor]
    """MoE layer -> the experts its tokens were routed to, (B*T, top_k), a small integer type."""
    rng: dict[tuple[int, int], torch.Tensor]
    """(layer, step) -> the RNG state its branch started from, when branches draw random numbers."""
    aux_weight: torch.Tensor | None
    """Per expert, `E * f_e / R`: the load-balancing loss is `sum_l sum_e aux_weight_e * sum_t m_t p_lte`."""

    def tensors(self) -> list[torch.Tensor]:
        return ([t for k in sorted(self.kept) for t in self.kept[k]] + [self.choices[k] for k in sorted(self.choices)]
                + [self.rng[k] for k in sorted(self.rng)] + ([self.aux_weight] if self.aux_weight is not None else []))

    def layout(self) -> tuple:
        return sorted(self.kept), sorted(self.choices), sorted(self.rng), self.aux_weight is not None

    @staticmethod
    def from_tensors(layout: tuple, tensors: list[torch.Tensor]) -> Saved:
        kept_keys, choice_keys, rng_keys, has_aux = layout
        it = iter(tensors)
        kept = {k: (next(it), next(it)) for k in kept_keys}
        choices = {k: next(it) for k in choice_keys}
        rng = {k: next(it) for k in rng_keys}
        return Saved(kept, choices, rng, next(it) if has_aux else None)


# ---------------------------------------------------------------------------------- the stack

CALIBRATION_MARGIN = 10
"""`buffer_every: auto` picks a spacing whose measured error is this many times below the tolerance."""


class ReversibleStack:
    """Runs a decoder's layers as a reversible two-stream stack.

    Args:
        layers: the decoder layers (pre-norm, see `memft.models.blocks`).
        coupling / gamma: see the module docstring.
        buffer_every: keep the exact streams entering every k-th layer (0: only the output), so
            reconstruction error cannot build up over more than k layers. None: chosen by `calibrate`
            on the first forward with gradients, as the most layers rebuilt within `tolerance`.
        tolerance: the relative reconstruction error `calibrate` allows.
    """

    def __init__(self, layers: nn.ModuleList, coupling: str, gamma: float, buffer_every: int | None,
                 tolerance: float = 1e-3):
        self.layers = layers
        self.coupling = coupling
        self.steps = coupling_steps(coupling, gamma)
        self.buffer_every = buffer_every
        self.tolerance = tolerance
        self.calibration: dict[int, float] = {}
        """What `calibrate` measured (until reported): layers rebuilt from the output -> relative error of the
        rebuilt input."""
        self.taps = [RouterTap(r) if (r := router_of(layer)) is not None else None for layer in layers]
        self.layer_kwargs: list[dict] = [{} for _ in layers]
        """What the model passed each layer in the current forward (mask, rotary embeddings, positions)."""
        self.embeddings: torch.Tensor | None = None
        """The hidden states the first layer was given in the current forward."""
        self.token_mask: torch.Tensor | None = None
        """(B, T) 1 at real tokens, for the load-balancing loss (None: every token counts)."""
        self.track_reconstruction = False
        """When set, the next backward measures every layer's reconstruction error (costs a buffer per layer)."""
        self.reconstruction_error: list[float] = []
        """Per layer, the relative error of the rebuilt input streams in the last tracked backward."""
        self.aux: torch.Tensor | None = None
        """The load-balancing loss of the last forward (None for dense models)."""
        self.replay_rng = False
        """Set per forward: whether branches draw random numbers backward must draw again."""
        config = vars(getattr(layers[0].self_attn, "config", object()))
        probabilities = [v for k, v in config.items() if ("dropout" in k or "jitter" in k) and isinstance(v, float)]
        self.draws_random = any(p > 0 for p in probabilities) or any(
            isinstance(m, nn.Dropout) and m.p > 0 for m in layers.modules())
        """Whether the layers have dropout or router jitter at all (in training mode); read once."""

    @property
    def flips(self) -> int:
        return sum(t.flips for t in self.taps if t is not None)

    # ---------------------------------------------------------------- one branch
    def branch(self, i: int, step: Step, x: torch.Tensor) -> torch.Tensor:
        """The step's branch on stream `x`, computed in the layer's dtype, returned in the stream's."""
        if step.branch is None:
            return x
        layer = self.layers[i]
        inp = x.to(_dtype_of(layer))
        y = attention_branch(layer, inp, self.layer_kwargs[i]) if step.branch == "attention" else ffn_branch(layer, inp)
        return y.to(x.dtype)

    def needs_rng(self) -> bool:
        """Whether branches draw random numbers (dropout, router jitter) that recomputation must replay."""
        return self.layers.training and self.draws_random

    # ---------------------------------------------------------------- entry point
    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        """The stack's output for embeddings `h` (the layers' arguments are in `layer_kwargs`)."""
        stream_dtype = torch.promote_types(h.dtype, torch.float32)
        s0, s1 = init_streams(h.to(stream_dtype), self.coupling)
        params_need_grad = any(p.requires_grad for p in self.layers.parameters())
        if torch.is_grad_enabled() and (h.requires_grad or params_need_grad):
            if self.buffer_every is None:
                self.buffer_every = self.calibrate(s0, s1)
            if not s0.requires_grad:  # frozen embeddings: backward must still run for the layers' weights
                s0 = s0.detach().requires_grad_()
            s0, s1, aux = _Reversible.apply(self, s0, s1)
        else:
            with torch.no_grad():
                s0, s1, aux, _ = self.forward_streams(s0, s1, keep=set())
        self.aux = aux if any(self.taps) else None
        return merge_streams(s0, s1, self.coupling).to(h.dtype)

    # ---------------------------------------------------------------- forward
    def forward_streams(self, s0, s1, keep: set[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Saved]:
        """Run every layer; return the output streams, the load-balancing loss and what backward needs
        (the exact input streams of the layers in `keep`, expert choices, RNG states)."""
        streams = [s0, s1]
        kept, choices, rng = {}, {}, {}
        mask = self._flat_mask(s0)
        counts = probs = None
        for tap in filter(None, self.taps):
            tap.mode = "record"
        try:
            for i in range(len(self.layers)):
                if i in keep:
                    kept[i] = (streams[0], streams[1])
                for j, step in enumerate(self.steps):
                    if step.branch and self.replay_rng:
                        rng[(i, j)] = _rng_state(s0.device)
                    apply_step(step, streams, self.branch(i, step, streams[step.source]))
                    tap = self.taps[i] if step.branch == "ffn" else None
                    if tap is not None:
                        p = masked_probs(tap.logits, mask).sum(0)
                        c = expert_counts(tap.choices, tap.router.num_experts, mask)
                        probs, counts = (p, c) if probs is None else (probs + p, counts + c)
                        choices[i] = tap.choices.to(choice_dtype(tap.router.num_experts))
        finally:
            for tap in filter(None, self.taps):
                tap.mode, tap.logits = None, None
        aux, weight = streams[0].new_zeros(()), None
        if counts is not None:
            weight = balance_weight(counts, mask.sum() * len(choices))  # rows: routed (layer, token) pairs
            aux = (weight * probs).sum()  # memft.models.moe.load_balancing_loss, summed layer by layer
        return streams[0], streams[1], aux, Saved(kept, choices, rng, weight)

    def _flat_mask(self, like: torch.Tensor) -> torch.Tensor:
        if self.token_mask is None or self.token_mask.shape != like.shape[:2]:
            return like.new_ones(like.shape[0] * like.shape[1])
        return self.token_mask.reshape(-1).to(like.device, like.dtype)

    # ---------------------------------------------------------------- calibration
    @torch.no_grad()
    def calibrate(self, s0: torch.Tensor, s1: torch.Tensor) -> int:
        """How many layers can be rebuilt in a row within `tolerance`: run the stack once without gradients,
        keeping the exact inputs of the layers 1, 2, 4, 8, ... below the output, rebuild from the output and
        compare. Returns 0 when the whole stack rebuilds within tolerance. Draws no random numbers."""
        n = len(self.layers)
        distances = sorted({min(2 ** j, n) for j in range(n.bit_length() + 1)})
        training = self.layers.training
        self.layers.eval()  # rounding is what is measured: no dropout or router jitter
        flips = [t.flips for t in self.taps if t is not None]
        try:
            y0, y1, _, saved = self.forward_streams(s0, s1, keep={n - d for d in distances})
            errors = self.rebuild(y0, y1, saved)
        finally:
            self.layers.train(training)
            for tap, before in zip(filter(None, self.taps), flips):
                tap.flips = before  # calibration flips are not training flips
        self.calibration = {d: errors[n - d] for d in distances}
        # one batch and the step-1 weights only estimate the error (bf16 rounding is chaotic, weights move):
        # keep an order of magnitude of headroom
        within = [d for d in distances if self.calibration[d] <= self.tolerance / CALIBRATION_MARGIN]
        if within and within[-1] == n:
            return 0
        return max(within[-1] if within else 1, 1)

    @torch.no_grad()
    def rebuild(self, y0, y1, saved: Saved) -> dict[int, float]:
        """Undo every layer from the output, without gradients or buffers; the relative error of the rebuilt
        input of each layer in `kept`."""
        streams, errors = [y0, y1], {}
        for i in reversed(range(len(self.layers))):
            tap = self.taps[i]
            if tap is not None:
                tap.mode, tap.choices = "replay", saved.choices[i]
            try:
                for step in reversed(self.steps):
                    undo_step(step, streams, self.branch(i, step, streams[step.source]))
            finally:
                if tap is not None:
                    tap.mode, tap.logits = None, None
            if i in saved.kept:
                errors[i] = _relative_error(streams, saved.kept[i])
        return errors

    # ---------------------------------------------------------------- backward
    def backward_streams(self, s0, s1, g0, g1, g_aux, saved: Saved, buffer_points: set[int]):
        """Walk the layers in reverse: rebuild each step's input, recompute its branch with grad,
        backpropagate through it (parameter gradients accumulate in `.grad`), free it. At the layers in
        `kept` the rebuilt streams are compared with the exact ones; at `buffer_points` the exact ones
        replace them."""
        streams, grads = [s0, s1], [g0, g1]
        mask = self._flat_mask(s0)
        errors = [0.0] * len(self.layers)
        for i in reversed(range(len(self.layers))):
            tap = self.taps[i]
            if tap is not None:
                tap.mode, tap.choices = "replay", saved.choices[i]
            try:
                for j in reversed(range(len(self.steps))):
                    step = self.steps[j]
                    src = streams[step.source].detach()
                    if step.branch is None:
                        undo_step(step, streams, src)
                        grads[step.source] = grads[step.source] + step.coef * grads[step.target]
                    else:
                        src.requires_grad_(True)
                        with torch.enable_grad(), _replaying(saved.rng.get((i, j)), s0.device):
                            y = self.branch(i, step, src)
                            outputs, seeds = [y], [step.coef * grads[step.target]]
                            if tap is not None and step.branch == "ffn" and g_aux is not None:
                                p = masked_probs(tap.logits, mask).sum(0)
                                outputs.append((saved.aux_weight * p).sum())  # this layer's aux term
                                seeds.append(g_aux)
                        torch.autograd.backward(outputs, seeds)
                        undo_step(step, streams, y.detach())
                        grads[step.source] = grads[step.source] + src.grad
                    if step.scale != 1:
                        grads[step.target] = step.scale * grads[step.target]
            finally:
                if tap is not None:
                    tap.mode, tap.logits = None, None
            if i in saved.kept:
                exact = saved.kept[i]
                errors[i] = _relative_error(streams, exact)
                if i in buffer_points:
                    streams = [exact[0], exact[1]]
        if self.track_reconstruction:
            self.reconstruction_error = errors
            self.track_reconstruction = False
        return grads[0], grads[1]


class _Reversible(torch.autograd.Function):
    """Forward without keeping per-layer activations; backward rebuilds them layer by layer.

    Saved for backward (and so counted by the activation meter): the two output streams, the
    exact streams at buffer points, each MoE layer's expert choices (one small integer per token and
    slot) and RNG states when dropout is active. Only the buffers and the choices grow with depth.
    """

    @staticmethod
    def forward(ctx, stack: ReversibleStack, s0, s1):
        n = len(stack.layers)
        buffer_points = set(range(0, n, stack.buffer_every)) if stack.buffer_every else set()
        keep = set(range(n)) if stack.track_reconstruction else buffer_points
        stack.replay_rng = stack.needs_rng()
        with torch.no_grad():
            y0, y1, aux, saved = stack.forward_streams(s0, s1, keep)
        ctx.stack = stack
        ctx.layer_kwargs, ctx.token_mask = list(stack.layer_kwargs), stack.token_mask
        ctx.layout, ctx.buffer_points = saved.layout(), buffer_points
        ctx.autocast = _autocast_state(s0.device)
        ctx.save_for_backward(y0, y1, *saved.tensors())
        return y0, y1, aux

    @staticmethod
    def backward(ctx, g0, g1, g_aux):
        stack = ctx.stack
        stack.layer_kwargs, stack.token_mask = ctx.layer_kwargs, ctx.token_mask
        y0, y1, *rest = ctx.saved_tensors
        saved = Saved.from_tensors(ctx.layout, rest)
        g0 = torch.zeros_like(y0) if g0 is None else g0
        g1 = torch.zeros_like(y1) if g1 is None else g1
        with _autocast_from(ctx.autocast):
            gx0, gx1 = stack.backward_streams(y0, y1, g0, g1, g_aux, saved, ctx.buffer_points)
        return None, gx0, gx1


# ---------------------------------------------------------------------------------- helpers


def _dtype_of(layer: nn.Module) -> torch.dtype:
    for p in layer.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _relative_error(rebuilt, exact) -> float:
    """|rebuilt - exact| / |exact| over both streams together (the momentum stream starts at zero)."""
    diff = sum(float((a.double() - b.double()).norm() ** 2) for a, b in zip(rebuilt, exact))
    norm = sum(float(b.double().norm() ** 2) for b in exact)
    return (diff / max(norm, 1e-300)) ** 0.5


def _rng_state(device: torch.device) -> torch.Tensor:
    state = torch.get_rng_state()
    if device.type == "cuda":
        return torch.cat([state, torch.cuda.get_rng_state(device)])
    return state


class _replaying:
    """Recompute a branch with the random numbers its forward drew (dropout, router jitter)."""

    def __init__(self, state: torch.Tensor | None, device: torch.device):
        self.state, self.device = state, device
        self.fork = None

    def __enter__(self):
        if self.state is None:
            return self
        cuda = self.device.type == "cuda"
        self.fork = torch.random.fork_rng(devices=[self.device] if cuda else [])
        self.fork.__enter__()
        cpu_len = torch.get_rng_state().numel()
        torch.set_rng_state(self.state[:cpu_len])
        if cuda:
            torch.cuda.set_rng_state(self.state[cpu_len:], self.device)
        return self

    def __exit__(self, *exc):
        if self.fork is not None:
            self.fork.__exit__(*exc)


def _autocast_state(device: torch.device):
    kind = device.type
    return kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)


def _autocast_from(state):
    kind, enabled, dtype = state
    return torch.autocast(kind, dtype=dtype, enabled=True) if enabled else nullcontext()
