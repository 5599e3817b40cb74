"""The one place that knows Mixture-of-Experts routers: where they are, and the load-balancing loss.

Routers. Every supported MoE decoder (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) has a top-k router module at
`layer.mlp.gate` that returns `(logits, scores, indices)`. peft wraps it (0.21's `all-linear` adapts its
weight through `target_parameters`, a `ParamWrapper`); `router_of` looks through such wrappers to the
router itself, whose forward hooks still fire and whose output is the adapted one.

The load-balancing loss (Switch Transformer, eqs. 4-6), as transformers' `load_balancing_loss_func`
computes it with an attention mask: over the real tokens of every MoE layer together,

    aux = E * sum_e f_e * P_e,   f_e = (top-k slots routed to e) / R,   P_e = (sum of p_te) / R,

`R` the routed (layer, token) rows, `p` the router's softmax. `f` is a count (no gradient), so
`aux = sum_e w_e * sum_(l,t) m_t p_lte` with the constant `w_e = E * f_e / R`: one term per layer,
which is how RevFFN adds it layer by layer in its backward (`balance_weight`, `masked_probs`).
No supported decoder defines a router z-loss in transformers 5 (only Switch Transformers and
NLLB-MoE do, which memft does not train), so there is none to add.

`RouterAux` collects every router's logits during a training forward (`memft.train.loop.step_loss`
turns them into the loss term). Strategies that run a layer more than once per forward say how
the calls combine (`Strategy.router_logits`, TokenTune). Layers recomputed in backward by gradient
checkpointing ran their forward without autograd: their term's gradient is added while they are
recomputed, from the same constant weights, so checkpointing stays exact.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from memft.errors import UserError
from memft.registry import at_least_float32

ROUTER_AUX_ATTR = "_memft_router_aux"
"""Attribute of a model that trains with the load-balancing loss: its `RouterAux` (set by `apply_strategies`)."""


def router_of(layer: nn.Module) -> nn.Module | None:
    """The layer's top-k router (returns `(logits, scores, indices)`), looking through peft's wrappers; None for a
    dense FFN.

    Raises:
        UserError: for a MoE layer (an `mlp.experts`) whose router memft cannot find: running on without it would
            silently drop the load-balancing loss and RevFFN's routing replay.
    """
    mlp = getattr(layer, "mlp", None)
    if mlp is None or not hasattr(mlp, "experts"):
        return None
    gate = getattr(mlp, "gate", None)
    while gate is not None and not hasattr(gate, "top_k") and hasattr(gate, "base_layer"):
        gate = gate.base_layer  # peft: ParamWrapper (target_parameters) or a LoRA Linear
    if gate is None or not hasattr(gate, "top_k") or not hasattr(gate, "num_experts"):
        raise UserError(f"memft cannot find the router of the MoE layer {type(layer).__name__} (`mlp.gate` is "
                        f"{type(getattr(mlp, 'gate', None)).__name__}); supported: Mixtral, Qwen2-MoE, Qwen3-MoE "
                        "and OLMoE routers, also inside peft adapters")
    return gate


def router_aux_coef(recipe, config) -> float:
    """The weight of the load-balancing loss in this run; 0.0 when it is off.

    `train.router_aux_loss: auto` does what transformers' own loss does: on when the model config sets
    `output_router_logits` (a causal LM's loss; its classifiers never add it), off otherwise.
    """
    from memft.models.load import is_moe

    t = recipe.train
    if t.router_aux_loss == "off" or not is_moe(config):
        return 0.0
    if t.router_aux_loss == "auto" and not (getattr(config, "output_router_logits", False)
                                            and recipe.model.task == "causal_lm"):
        return 0.0
    coef = t.router_aux_loss_coef if t.router_aux_loss_coef is not None else getattr(
        config, "router_aux_loss_coef", None)
    if coef is None:
        raise UserError(f"the `{config.model_type}` config defines no `router_aux_loss_coef`; set "
                        "`train.router_aux_loss_coef`")
    return float(coef)


def masked_probs(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, E) router probabilities (float32 at least), zero at padding (`mask` (N,), 1 at real tokens)."""
    return torch.softmax(at_least_float32(logits), dim=-1) * mask.to(torch.promote_types(logits.dtype,
                                                                                         torch.float32))[:, None]


def expert_counts(chosen: torch.Tensor, num_experts: int, mask: torch.Tensor) -> torch.Tensor:
    """(E,) the real tokens' top-k slots routed to each expert (`chosen` (N, k) expert ids)."""
    m = mask if mask.is_floating_point() else mask.float()
    return m.new_zeros(num_experts).scatter_add_(0, chosen.reshape(-1).long(), m.repeat_interleave(chosen.size(-1)))


def top_k_choices(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """The experts transformers' loss counts as chosen: the top-k of the softmax (the routers' own choice)."""
    return torch.topk(torch.softmax(at_least_float32(logits), dim=-1), top_k, dim=-1).indices


def balance_weight(counts: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(E,) `w_e = E * f_e / R`: the loss is `sum_e w_e * sum_(l,t) m_t p_lte`; a constant for gradients."""
    return counts.numel() * (counts / rows) / rows


def load_balancing_loss(layer_logits: list[torch.Tensor], top_k: int, mask: torch.Tensor) -> torch.Tensor:
    """The loss over all MoE layers' real tokens (module docstring), with gradients through every layer's logits.

    Args:
        layer_logits: per MoE layer, the router logits `(B*T, E)` of the whole batch.
        top_k: experts per token.
        mask: `(B*T,)` 1 at real tokens.
    """
    weight, probs = balance_terms(layer_logits, top_k, mask)
    return (weight * probs).sum()


def balance_terms(layer_logits: list[torch.Tensor], top_k: int,
                  mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss's two factors: the constant weights `w_e` and `sum_(l,t) m_t p_lte` (with gradients), both (E,)."""
    mask = mask.to(torch.promote_types(layer_logits[0].dtype, torch.float32))  # counts as precise as the model
    counts = sum(expert_counts(top_k_choices(lg, top_k), lg.size(-1), mask) for lg in layer_logits)
    probs = sum(masked_probs(lg, mask).sum(0) for lg in layer_logits)
    return balance_weight(counts, mask.sum() * len(layer_logits)), probs


class RouterAux:
    """Records every MoE router's logits during a training forward; the load-balancing loss from them.

    `start(mask)` before the forward, `finish(merge)` after it returns the loss (None when no router ran).
    Layers whose logits were recorded without autograd but that backward recomputes with it (reentrant
    gradient checkpointing) get their term's gradient during the recomputation: the weights `w_e` are
    kept from `finish`, and the gradient of the loss term reaches them through `_AuxSeed`.
    """

    def __init__(self, model: nn.Module, coef: float):
        from memft.models.blocks import decoder_body

        self.coef = coef
        layers = decoder_body(model).layers
        routers = {i: r for i, layer in enumerate(layers) if (r := router_of(layer)) is not None}
        if not routers:
            raise UserError("`train.router_aux_loss` is on but the model has no MoE router")
        self.top_k = next(iter(routers.values())).top_k
        self.calls: dict[int, list[torch.Tensor]] = {}
        self.recording = False
        self.mask: torch.Tensor | None = None
        self.last_hidden: torch.Tensor | None = None
        self.replay: dict[int, torch.Tensor] = {}
        """Layers whose term's gradient is added when backward recomputes them -> the weights `w_e`."""
        self.grad: torch.Tensor | None = None
        """d loss / d aux of the current backward, known before any layer is recomputed."""
        for i, router in routers.items():
            router.register_forward_hook(self._hook(i))
        decoder_body(model).norm.register_forward_pre_hook(self._final_hidden)

    def start(self, attention_mask: torch.Tensor) -> None:
        self.calls, self.replay, self.grad, self.last_hidden = {}, {}, None, None
        self.mask = attention_mask.reshape(-1)
        self.recording = True

    def finish(self, merge: Callable[[list[torch.Tensor]], torch.Tensor]) -> torch.Tensor | None:
        """The loss of the forward since `start`; `merge` turns one layer's calls into its `(B*T, E)` logits."""
        self.recording = False
        if not self.calls:
            return None
        logits = {i: merge(calls) for i, calls in sorted(self.calls.items())}
        self.calls = {}
        weight, probs = balance_terms(list(logits.values()), self.top_k, self.mask)
        aux = (weight * probs).sum()
        recomputed = {i for i, lg in logits.items() if not lg.requires_grad and torch.is_grad_enabled()}
        if recomputed and self.last_hidden is not None and self.last_hidden.requires_grad:
            self.replay = {i: weight for i in recomputed}
            # tied to the last layer's output, so backward knows the seed before it recomputes any layer
            aux = _AuxSeed.apply(aux, self.last_hidden, self)
        self.last_hidden = None
        return aux

    def _final_hidden(self, norm, args):
        if self.recording:
            self.last_hidden = args[0]

    def _hook(self, index: int):
        def hook(module, args, output):
            logits = output[0]
            if self.recording:
                self.calls.setdefault(index, []).append(logits)
            elif index in self.replay and torch.is_grad_enabled() and logits.requires_grad:
                # backward recomputes a checkpointed layer: its scores now also carry the loss term's gradient
                weight = self.replay.pop(index)
                scores = _AuxGrad.apply(output[1], logits, weight, self.mask, self)
                return (logits, scores, *output[2:])
            return None
        return hook


class _AuxSeed(torch.autograd.Function):
    """Identity on the loss value; backward stores its gradient for the recomputed layers' terms."""

    @staticmethod
    def forward(ctx, aux, anchor, owner: RouterAux):
        ctx.owner = owner
        return aux.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.owner.grad = grad
        return grad, None, None


class _AuxGrad(torch.autograd.Function):
    """Identity on a router's scores whose backward adds `d loss / d logits` of its layer's term."""

    @staticmethod
    def forward(ctx, scores, logits, weight, mask, owner: RouterAux):
        ctx.save_for_backward(logits, weight, mask)
        ctx.owner = owner
        return scores.clone()

    @staticmethod
    def backward(ctx, grad_scores):
        logits, weight, mask = ctx.saved_tensors
        with torch.enable_grad():
            leaf = logits.detach().requires_grad_()
            term = (weight * masked_probs(leaf, mask).sum(0)).sum()
            (grad_logits,) = torch.autograd.grad(term, leaf)
        return grad_scores, grad_logits * ctx.owner.grad.to(grad_logits.dtype), None, None, None
