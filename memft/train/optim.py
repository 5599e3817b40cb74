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
