"""Optimizer and learning-rate schedule from the recipe's `train` block."""

from __future__ import annotations

import torch
from transformers import get_scheduler

from memft.recipe import TrainConfig


def build_optimizer(groups: list[dict], cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (fused kernel on CUDA) or bitsandbytes' 8-bit AdamW over `groups`; with `optimizer_in_backward`, one of
    them per parameter, stepped by backward itself (`StepInBackward`)."""
    if cfg.optimizer_in_backward:
        return StepInBackward(groups, lambda one: _optimizer(one, cfg, device))
    return _optimizer(groups, cfg, device)


def _optimizer(groups: list[dict], cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    kwargs = dict(lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **kwargs)
    # fused AdamW is one kernel per step on CUDA; on the CPU the default (foreach) is as fast here
    return torch.optim.AdamW(groups, fused=device.type == "cuda", **kwargs)


class StepInBackward(torch.optim.Optimizer):
    """The optimizer step inside backward: each parameter is updated by its own optimizer the moment its gradient
    is complete (`register_post_accumulate_grad_hook`), and the gradient is freed at once, so the gradients of the
    whole model never exist together; at most about one layer's are alive (torchtune's `optimizer_in_bwd`).

    AdamW updates every parameter from its own gradient and moments alone, so stepping them one at a time is the
    ordinary step (tests/test_optim_in_backward.py: float64, 1e-12). What needs every gradient first cannot run
    this way and is refused at validate: gradient accumulation, global-norm clipping, strategies that change
    gradients after backward. The global norm is still measured (`grad_norm`), from each gradient before its step.

    To the loop, the scheduler and checkpoints this is one optimizer: `param_groups` are the per-parameter
    optimizers' groups themselves (the scheduler's lr reaches them), `step()` and `zero_grad()` do nothing, and the
    state dict has the layout of one optimizer with one group per parameter.
    """

    def __init__(self, groups: list[dict], make):
        params, self.inner = [], []
        for group in groups:
            options = {k: v for k, v in group.items() if k != "params"}
            for p in group["params"]:
                params.append(p)
                self.inner.append(make([{"params": [p], **options}]))
        super().__init__(params, {})
        self.param_groups = [o.param_groups[0] for o in self.inner]
        self._squares = None
        self._hooks = [p.register_post_accumulate_grad_hook(self._stepper(o)) for p, o in zip(params, self.inner)]

    def _stepper(self, optimizer: torch.optim.Optimizer):
        def step(p: torch.Tensor) -> None:
            g = p.grad.detach()
            square = g.to(torch.promote_types(g.dtype, torch.float32)).square().sum()
            self._squares = square if self._squares is None else self._squares + square.to(self._squares.device)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    def grad_norm(self) -> torch.Tensor:
        """The global L2 norm of the gradients stepped since the last call (0 when none was)."""
        squares, self._squares = self._squares, None
        return torch.zeros(()) if squares is None else squares.sqrt()

    def step(self, closure=None):  # every parameter was stepped during backward
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:  # and its gradient freed there
        return None

    def state_dict(self) -> dict:
        state, groups = {}, []
        for i, o in enumerate(self.inner):
            one = o.state_dict()
            if 0 in one["state"]:
                state[i] = one["state"][0]
            groups.append({**one["param_groups"][0], "params": [i]})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict["param_groups"]
        if len(saved) != len(self.inner):
            raise ValueError(f"the state has {len(saved)} parameter groups; this optimizer steps {len(self.inner)} "
                             "parameters one by one")
        for i, o in enumerate(self.inner):
            one = {0: state_dict["state"][i]} if i in state_dict["state"] else {}
            o.load_state_dict({"state": one, "param_groups": [{**saved[i], "params": [0]}]})
        self.param_groups = [o.param_groups[0] for o in self.inner]


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    """Linear warmup for `warmup_steps`, then constant / linear decay / cosine decay to 0 at `total_steps`."""
    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[cfg.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=total_steps)


def clip_gradients(grads: list[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """The global L2 norm of `grads` (on any devices: the model's and strategies' host gradients alike), and with
    `max_norm` every gradient scaled in place by `min(1, max_norm / (norm + 1e-6))`, torch's `clip_grad_norm_` rule.

    Takes gradients rather than parameters so that gradients no optimizer parameter holds (MEFT's host rows,
    `Strategy.outside_grads`) count in the norm and are clipped like every other one.
    """
    norm = torch.nn.utils.get_total_norm(grads)
    if max_norm is not None and grads:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for g in grads:
            by_device.setdefault(g.device, []).append(g)
        for device, group in by_device.items():
            torch._foreach_mul_(group, coef.to(device))
    return norm
