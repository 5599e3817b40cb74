"""`lcsb`: layer-cyclic selective backpropagation (Park et al. 2026, arXiv 2602.13073).

The layer stack is split into `groups` groups. At optimizer step `t` only one group is *selected*
(`t mod groups` with `schedule: cyclic`; a seeded draw with `schedule: random`). A layer of an
unselected group runs its forward without autograd and hands its output on with an identity
backward, as if it returned `h + (out - h).detach()`: the forward is exact, the gradient reaches
the layers below through the residual path, the layer saves nothing for backward and costs no
backward compute. The selected layers therefore get the gradient of a stop-gradient surrogate
(the Jacobians of the unselected layers above them are replaced by the identity), which the paper
reads as block coordinate descent on the adapter parameters.

Unselected trainable parameters get zero gradients (`momentum_updates: true`, the paper's choice):
AdamW then keeps moving them with the momentum of the steps where they were selected. With `false`
their gradient stays None and AdamW skips them.

Parameters outside the layer stack (embeddings, final norm, LM or classification head) belong to no
group: skipping a layer saves nothing for them (the head's backward is needed to reach any layer,
and the embeddings' gradient arrives through the identity paths for free), so they train every step
when they match `always_train` (default: all of them) and are frozen otherwise.

Works on every model `memft.models.blocks.layer_stack` knows (Llama-family decoders, dense and MoE,
and BERT-family encoders), with `full`, `lora` and `qlora`, and with `train.gradient_checkpointing`
(a selected layer is checkpointed as usual; an unselected one has nothing to recompute).
"""

from __future__ import annotations

import random
import re
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from memft.errors import UserError
from memft.registry import BuildContext, Patterns, Strategy, StrategyParams, register

if TYPE_CHECKING:
    from torch import nn


class LcsbParams(StrategyParams):
    groups: int = Field(default=4, ge=1)
    """Number of layer groups G; each step back-propagates through one of them (1 = plain backprop).
    At most the number of layers."""
    partition: Literal["contiguous", "strided"] = "contiguous"
    """How layers are grouped. `contiguous`: blocks of consecutive layers (the paper's "blocks"; with 8
    layers and 4 groups: {0,1} {2,3} {4,5} {6,7}). `strided`: layer i goes to group i mod G ({0,4} {1,5} ...),
    so every step updates layers spread over the whole depth."""
    schedule: Literal["cyclic", "random"] = "cyclic"
    """`cyclic`: step t selects group t mod G (the paper). `random`: a uniform draw per step (LISA-like),
    seeded by `train.seed` and the step, so a resumed run draws the same groups."""
    always_train: Patterns = Field(default_factory=lambda: [".*"])
    """Regular expressions over the names of trainable parameters *outside* the layer stack (embeddings,
    final norm, LM head, `score` / `classifier`): those that match one train every step, the others are
    frozen. Layer parameters always follow their group. Default: all of them."""
    momentum_updates: bool = True
    """Give unselected trainable parameters zero gradients (not None) so AdamW keeps moving them with their
    momentum (the paper's behaviour). `false`: their gradients stay None and AdamW leaves them untouched."""


def partition_layers(n_layers: int, groups: int, partition: str) -> list[list[int]]:
    """The layer indices of each group, e.g. `(8, 4, "contiguous")` -> `[[0, 1], [2, 3], [4, 5], [6, 7]]`.

    Contiguous groups differ in size by at most one when `groups` does not divide `n_layers`.
    """
    if partition == "strided":
        return [list(range(g, n_layers, groups)) for g in range(groups)]
    return [[i for i in range(n_layers) if i * groups // n_layers == g] for g in range(groups)]


@register
class Lcsb(Strategy):
    name = "lcsb"
    depth_uniform = False  # see `memft profile`: its per-layer cost depends on the depth (`depth_block`)
    Params = LcsbParams
    # last: the gate wraps each layer as the other strategies left it (adapters, RevFFN/TokenTune wrappers)
    order = 60
    summary = "Layer-cyclic selective backprop: each step back-propagates through 1 of `groups` layer groups."
    step_in_backward = ("its momentum updates give unselected layers a zero gradient after backward "
                        "(`after_backward`), when a step in backward has no gradient left to fill")

    def __init__(self, params: LcsbParams):
        super().__init__(params)
        self.seed = 0
        self.layer_groups: list[list[int]] = []
        self.selected: int | None = None
        """The group selected for the current step; None (before the first step): every layer is selected."""
        self._group_of: list[int] = []
        self._layers: nn.ModuleList | None = None

    def depth_block(self, layers: int) -> int | None:
        # with G groups dividing the depth, G more layers add one layer to every group (contiguous or strided) and
        # the same number more above the selected group's first layer: the costs grow by one block each time
        groups = self.params.groups
        return groups if layers % groups == 0 else None

    def apply(self, model: nn.Module, ctx: BuildContext) -> nn.Module:
        from memft.models.blocks import is_encoder, layer_stack

        layers = layer_stack(model)
        n, groups = len(layers), self.params.groups
        if groups > n:
            raise UserError(f"`lcsb.groups` is {groups} but the model has {n} layers; use at most {n} groups")
        self.seed = ctx.recipe.train.seed
        self.layer_groups = partition_layers(n, groups, self.params.partition)
        self._group_of = [0] * n
        for g, members in enumerate(self.layer_groups):
            for i in members:
                self._group_of[i] = g
        for i, layer in enumerate(layers):
            self._gate(layer, i)
        self._layers = layers
        frozen = self._apply_always_train(model, layers)

        sizes = "/".join(str(len(m)) for m in self.layer_groups)
        order = "t mod G" if self.params.schedule == "cyclic" else "a seeded random draw"
        ctx.notes.append(f"lcsb: {n} layers in {groups} {self.params.partition} groups ({sizes} layers); step t "
                         f"back-propagates through group {order}, the others pass gradients through the identity")
        if groups > 1 and is_encoder(model):
            ctx.notes.append("lcsb: BERT-family layers are post-LayerNorm, so the identity that replaces a skipped "
                             "layer's Jacobian is a crude stand-in (docs/strategies/lcsb.md measures how crude)")
        if frozen:
            ctx.notes.append(f"lcsb: {frozen:,} parameters outside the layers match no `always_train` pattern "
                             "and are frozen")
        if groups > 1:
            ctx.notes.append("lcsb: unselected layers' trainable parameters " + (
                "get zero gradients (AdamW keeps moving them with their momentum)" if self.params.momentum_updates
                else "keep None gradients (AdamW leaves them untouched)"))
        return model

    def _gate(self, layer: nn.Module, index: int) -> None:
        """Wrap `layer.forward` so that, when its group is not selected, it runs without autograd."""
        import torch

        from memft.strategies.lcsb.skip import skip_backward

        if getattr(layer, "_lcsb_gated", False):
            raise UserError("`lcsb` was applied twice to the same model; list it once in `strategies`")
        inner = layer.forward  # bound: the class's forward (checkpointing-aware), or another strategy's wrapper

        def forward(*args, **kwargs):
            if not torch.is_grad_enabled() or self.selected is None or self._group_of[index] == self.selected:
                return inner(*args, **kwargs)
            h = args[0] if args else kwargs["hidden_states"]
            with torch.no_grad():
                out = inner(*args, **kwargs)
            if isinstance(out, tuple):  # older transformers return (hidden_states, attentions, ...)
                return (skip_backward(h, out[0]), *out[1:])
            return skip_backward(h, out)

        # an instance attribute, so parameter names (and so checkpoints and peft adapters) stay unchanged
        layer.forward = forward
        layer._lcsb_gated = True

    def _apply_always_train(self, model: nn.Module, layers: nn.ModuleList) -> int:
        """Freeze trainable parameters outside the layer stack that match no `always_train` pattern."""
        patterns = [re.compile(p) for p in self.params.always_train]
        inside = {id(p) for p in layers.parameters()}
        frozen = 0
        for name, p in model.named_parameters():
            if p.requires_grad and id(p) not in inside and not any(rx.search(name) for rx in patterns):
                p.requires_grad_(False)
                frozen += p.numel()
        return frozen

    def group_for_step(self, step: int) -> int:
        """The group selected at optimizer step `step` (0-based). Stateless: a function of the step and seed."""
        groups = self.params.groups
        if self.params.schedule == "cyclic":
            return step % groups
        # seeding with a string hashes it with SHA-512: the same draw in every process (no PYTHONHASHSEED)
        return random.Random(f"lcsb:{self.seed}:{step}").randrange(groups)

    def on_step_start(self, step: int, batch: dict) -> dict:
        # called once per micro-batch with the same step: every micro-batch of a step selects the same group
        self.selected = self.group_for_step(step)
        return batch

    def after_backward(self, step: int) -> None:
        if not self.params.momentum_updates or self.selected is None:
            return
        import torch

        # the layers' parameters now, not at `apply`: FSDP replaces them with its sharded ones afterwards
        for g, members in enumerate(self.layer_groups):
            if g == self.selected:
                continue
            for p in (p for i in members for p in self._layers[i].parameters()):
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)
