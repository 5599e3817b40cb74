"""Optimizer and learning-rate schedule from the recipe's `train` block."""

from __future__ import annotations

import torch
from transformers import get_scheduler

from memft.recipe import TrainConfig


def build_optimizer(groups: list[dict], cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (fused kernel on CUDA) or bitsandbytes' 8-bit AdamW over `groups`."""
    kwargs = dict(lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **kwargs)
    # fused AdamW is one kernel per step on CUDA; on the CPU the default (foreach) is as fast here
    return torch.optim.AdamW(groups, fused=device.type == "cuda", **kwargs)


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
