"""`revffn`: reversible decoder layers, so activation memory no longer grows with depth.

Liu et al., "RevFFN: Memory-Efficient Full-Parameter Fine-Tuning of Mixture-of-Experts LLMs with
Reversible Blocks" (arXiv 2512.20920). Every pretrained decoder layer, dense or MoE, becomes a
reversible two-stream block that reuses its attention and FFN / MoE weights at full width
(`stack.py` has the couplings). One autograd function runs the whole stack without keeping
per-layer activations; backward walks the layers in reverse, rebuilding each one's input from its
output, recomputing it with gradients and backpropagating through it.

How it sits in a transformers model: the decoder layers only record the arguments the model
passes them (mask, rotary embeddings, positions) and hand the embeddings through; a pre-hook on
the final norm runs the reversible stack on them. Embeddings, masks, rotary, final norm and head
stay the model's own, so padding, sliding windows and every supported architecture work unchanged.

The rewiring changes the pretrained function (see docs/strategies/revffn.md for the measured drift),
so `recovery.steps` first distils the converted model toward the original one (a frozen copy,
run under no_grad) before the task loss takes over. MoE: the load-balancing loss is part of the
loss with exact gradients, and recomputation routes every token as the forward did.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator

from memft.registry import BuildContext, LossOutput, MemoryEstimate, Strategy, StrategyParams, register

if TYPE_CHECKING:
    import torch
    from torch import nn

    from memft.strategies.revffn.stack import ReversibleStack


class RecoveryParams(StrategyParams):
    steps: int = Field(default=0, ge=0)
    """Optimizer steps at the start of the run that distil the converted model toward the original one
    (KL divergence of next-token distributions on the training data) instead of the task loss. 0: none."""
    temperature: float = Field(default=1.0, gt=0)
    """Softmax temperature of the distillation (the loss is scaled by its square)."""
    teacher: Literal["auto", "device", "host"] = "auto"
    """Where the frozen copy of the original weights lives during recovery. `host`: its decoder layers stay in
    pinned host memory and are copied to the device one layer at a time for the teacher's forward (bitwise the same
    outputs; one host-to-device copy of the layers per step); `device`: a whole second copy on the device. `auto`:
    `host` when training on a GPU, `device` on the CPU (where both are the same memory)."""


class RevFFNParams(StrategyParams):
    coupling: Literal["additive", "momentum"] = "additive"
    """`additive` (the paper's): `y1 = x1 + attn(x2); y2 = x2 + ffn(y1)`, output `(y1+y2)/2`; rebuilds stably at any
    depth (activation memory flat), but moves far from the pretrained function, so give it a `recovery`.
    `momentum`: per branch `v = gamma*v + (1-gamma)*f(x); x += v`; stays close to the pretrained function, but
    rebuilding amplifies error ~1/gamma per branch, so deep or bf16 models need buffers (`buffer_every`).
    Measurements: docs/strategies/revffn.md."""
    gamma: float = Field(default=0.5, gt=0, lt=1)
    """Momentum of the `momentum` coupling: smaller keeps the pretrained function closer, larger rebuilds more exactly."""
    buffer_every: int | Literal["auto"] = "auto"
    """Keep the exact streams entering every k-th layer, so reconstruction error builds up over k layers at most
    (0: never; activation memory then does not grow with depth). Costs two hidden states per kept layer. `auto`:
    on the first step, measure how many layers rebuild within `rebuild_tolerance` and use that (often 0 for
    `additive`, a few layers for `momentum`), with a 10x margin."""
    rebuild_tolerance: float = Field(default=1e-3, gt=0)
    """The relative error of a rebuilt layer input that `buffer_every: auto` accepts."""
    aux_loss_coef: float | None = None
    """Moved: the load-balancing loss is set for every strategy by `train.router_aux_loss` and
    `train.router_aux_loss_coef`."""
    recovery: RecoveryParams = Field(default_factory=RecoveryParams)
    """Bring back the pretrained function before fine-tuning (see `recovery.*`)."""
    track_reconstruction_every: int = Field(default=0, ge=0)
    """Every N optimizer steps, measure each layer's reconstruction error (logged as `revffn_reconstruction_error`;
    that step keeps every layer's input, like checkpointing). 0: never."""

    @field_validator("aux_loss_coef")
    @classmethod
    def _moved(cls, value):
        if value is not None:
            raise ValueError(f"moved to `train`: write `train.router_aux_loss: on` and `train.router_aux_loss_coef: "
                             f"{value}` (one load-balancing loss for every strategy)")
        return value

    @field_validator("buffer_every", mode="before")
    @classmethod
    def _layers_or_auto(cls, value):
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            return value
        raise ValueError("should be `auto` or a number of layers >= 0 (0: no buffers)")


@register
class RevFFN(Strategy):
    name = "revffn"
    depth_uniform = False  # see `memft profile`: its per-layer cost depends on the depth
    Params = RevFFNParams
    order = 50
    summary = "Reversible two-stream decoder layers: activations stop growing with depth (with a recovery stage)."
    # the reversible backward accumulates each layer's weight gradients into `.grad` as autograd does, so
    # `train.optimizer_in_backward` steps them as they complete (tests/test_optim_in_backward.py)
    conflicts = {
        "tokentune": "both replace the decoder layers' forward; use `revffn` for depth, `tokentune` for tokens.",
        "lcsb": "LCSB's frozen layers pass gradients through the residual identity, which the reversible "
                "coupling no longer has; use one of them.",
    }
    rewires = "its weights were trained as a reversible two-stream stack, not as residual layers"
    computes_router_aux = True  # the stack adds each layer's load-balancing term in its own backward
    params: RevFFNParams

    def __init__(self, params: RevFFNParams):
        super().__init__(params)
        self.stack: ReversibleStack | None = None
        self.teacher: nn.Module | None = None
        self.teacher_streamed = False
        """Its decoder layers live in host memory (`recovery.teacher`) and are streamed to the device."""
        self.step = 0
        self.aux_coef = 0.0
        self.task = "causal_lm"
        self.earlier_flips = 0
        """Routing flips counted before a resume."""
        self.phase: str | None = None
        """What the last training loss was: `distill` (the KL toward the original model) or `task`; logged as
        `revffn_phase`, so the plot draws the KL apart from the cross-entropy."""

    def check(self, recipe) -> list[str]:
        problems = []
        if recipe.train.gradient_checkpointing:
            problems.append("`train.gradient_checkpointing` recomputes layers that `revffn` already rebuilds from "
                            "their outputs; turn it off")
        return problems

    def vary_for_profile(self, rng) -> None:
        if self.params.buffer_every == "auto":  # the spacing a random twin measures says nothing of the real model's
            self.params = self.params.model_copy(update={"buffer_every": 0})

    def _teacher_on_host(self, device: torch.device) -> bool:
        teacher = self.params.recovery.teacher
        return teacher == "host" or (teacher == "auto" and device.type == "cuda")

    def estimate(self, model: nn.Module, recipe, tokens: int, device: torch.device) -> MemoryEstimate | None:
        out = MemoryEstimate()
        if self.params.buffer_every == "auto":
            kept = 2 * tokens * model.config.hidden_size * next(model.parameters()).element_size()
            out.notes.append(f"revffn: activations without buffers; `buffer_every: auto` is measured on the first "
                             f"step and each kept layer adds its two input streams ({kept:,} bytes)")
        if self.teacher is not None:
            from memft.strategies.revffn.teacher import placement_bytes

            on_host = self._teacher_on_host(device)
            resident, host = placement_bytes(self.teacher, on_host)
            out.device["revffn recovery teacher"] = resident
            if on_host:
                out.host["revffn recovery teacher (decoder layers)"] = host
            out.notes.append("revffn: the recovery teacher (a frozen copy of the weights"
                             + (", its decoder layers streamed from host memory one at a time" if on_host else "")
                             + f") is freed after step {self.params.recovery.steps}")
        return out

    def apply(self, model: nn.Module, ctx: BuildContext) -> nn.Module:
        from memft.models.blocks import decoder_body
        from memft.models.moe import router_aux_coef
        from memft.strategies.revffn.stack import ReversibleStack
        from memft.strategies.revffn.teacher import frozen_copy

        p = self.params
        body = decoder_body(model)
        self.task = ctx.recipe.model.task
        if p.recovery.steps:  # the original function, before rewiring: the distillation teacher
            # a profile's skeleton is on the meta device: its teacher's bytes are placed in `estimate`
            self.teacher_streamed = self._teacher_on_host(ctx.device) and ctx.device.type != "meta"
            self.teacher = frozen_copy(model, on_host=self.teacher_streamed)
        buffer_every = None if p.buffer_every == "auto" else p.buffer_every
        self.stack = ReversibleStack(body.layers, p.coupling, p.gamma, buffer_every, p.rebuild_tolerance)
        for i, layer in enumerate(body.layers):
            layer.forward = functools.partial(_record_arguments, self.stack, i)
        body.norm.register_forward_pre_hook(self._run_stack)
        body.register_forward_pre_hook(self._capture_mask, with_kwargs=True)
        self.aux_coef = router_aux_coef(ctx.recipe, model.config)
        n = len(body.layers)
        kind = f"momentum coupling (gamma {p.gamma})" if p.coupling == "momentum" else "additive coupling"
        ctx.notes.append(f"revffn: {n} layers as one reversible stack, {kind}"
                         + (f", exact inputs kept every {p.buffer_every} layers" if buffer_every else
                            ", buffer spacing measured on the first step" if buffer_every is None else "")
                         + (f"; MoE load-balancing loss x{self.aux_coef:g}, routing replayed in backward"
                            if any(self.stack.taps) else ""))
        if p.recovery.steps:
            where = ("its decoder layers in host memory, streamed to the device one at a time"
                     if self._teacher_on_host(ctx.device) else "on the device")
            ctx.notes.append(f"revffn: the first {p.recovery.steps} steps distil toward the original model "
                             f"(a frozen copy of its weights is kept until then, {where})")
        if p.recovery.steps and ctx.total_steps is not None and ctx.total_steps <= p.recovery.steps:
            steps = (f"`train.max_steps` ({ctx.total_steps})" if ctx.recipe.train.max_steps
                     else f"the run's {ctx.total_steps} steps (`train.epochs`)")
            ctx.notes.append(f"revffn: {steps} <= `recovery.steps` ({p.recovery.steps}): the whole run distils "
                             "toward the original model and never fine-tunes on the data's labels")
        return model

    # ------------------------------------------------------------------ hooks into the model
    def _run_stack(self, norm: nn.Module, args: tuple):
        stack = self.stack
        h = args[0]
        if stack.embeddings is not h:
            raise RuntimeError("revffn: the final norm did not receive what the first layer was given; "
                               "something else rewired the decoder layers")
        stack.embeddings = None
        return (stack(h),) + tuple(args[1:])

    def _capture_mask(self, body: nn.Module, args: tuple, kwargs: dict):
        from memft.data.batching import token_mask

        self.stack.token_mask = token_mask(kwargs)  # a packed batch's too (it passes no attention_mask)

    # ------------------------------------------------------------------ hooks into the loop
    def _recovering(self) -> bool:
        return self.teacher is not None and self.step < self.params.recovery.steps

    def on_step_start(self, step: int, batch: dict) -> dict:
        self.step = step
        every = self.params.track_reconstruction_every
        if every and step % every == 0:
            self.stack.track_reconstruction = True
        return batch

    def count_targets(self, batch: dict) -> int | None:
        return int(batch["attention_mask"].sum()) if self._recovering() else None

    def loss(self, model: nn.Module, batch: dict) -> LossOutput:
        import torch

        from memft.train.loop import default_loss

        self.phase = "distill" if self._recovering() else "task"
        out = self._distill(model, batch) if self.phase == "distill" else default_loss(model, batch, self.task)
        aux = self.stack.aux
        if aux is not None and self.aux_coef and torch.is_grad_enabled():
            # the model's loss is mean CE + coef * aux; the loop divides our sum by `count`
            out.loss_sum = out.loss_sum + self.aux_coef * aux * out.count
            out.aux_loss = aux
        return out

    def _distill(self, model: nn.Module, batch: dict) -> LossOutput:
        from memft.strategies.revffn.distill import distill_loss

        device = batch["input_ids"].device
        if not self.teacher_streamed and next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        return distill_loss(model, self.teacher, batch, self.params.recovery.temperature)

    def after_optimizer_step(self, step: int) -> None:
        if self.teacher is not None and step + 1 >= self.params.recovery.steps:
            self.teacher = None  # recovery is over: free the copy

    def metrics(self) -> dict:
        out = {"revffn_buffer_every": self.stack.buffer_every}
        if self.phase is not None:
            out["revffn_phase"] = self.phase
        if self.stack.calibration:  # logged once, on the first line after it was measured
            out["revffn_calibration"] = {str(k): v for k, v in self.stack.calibration.items()}
            self.stack.calibration = {}
        if any(self.stack.taps):
            out["revffn_routing_flips"] = self.earlier_flips + self.stack.flips
        if self.stack.reconstruction_error:
            out["revffn_reconstruction_error"] = self.stack.reconstruction_error
            self.stack.reconstruction_error = []
        return out

    def state_dict(self) -> dict:
        return {"next_step": self.step + 1, "routing_flips": self.earlier_flips + self.stack.flips,
                "buffer_every": self.stack.buffer_every}

    def load_state_dict(self, state: dict) -> None:
        self.earlier_flips = int(state.get("routing_flips", 0))
        if self.params.buffer_every == "auto" and state.get("buffer_every") is not None:
            self.stack.buffer_every = int(state["buffer_every"])  # a resumed run keeps the measured spacing
        if int(state.get("next_step", 0)) >= self.params.recovery.steps:
            self.teacher = None  # resumed after the recovery stage


def _record_arguments(stack: ReversibleStack, index: int, hidden_states: torch.Tensor, *args, **kwargs):
    """Replaces a decoder layer's forward: keep its arguments for the stack, pass the embeddings on."""
    if args:
        raise TypeError("revffn: decoder layers are expected to get everything but the hidden states by keyword")
    if index == 0:
        stack.embeddings = hidden_states
    stack.layer_kwargs[index] = kwargs
    return hidden_states
