"""LCSB's unselected layers: their output in value, the identity in backward."""

from __future__ import annotations

import torch


class _IdentityBackward(torch.autograd.Function):
    """Returns `out` (computed without autograd) with the gradient of `h`: d result / d h = I.

    Equal in value to `h + (out - h).detach()` but bit-identical to `out` (that sum would round) and
    without allocating it. Saves nothing for backward.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        # detach(): an alias of `out`, not a view autograd tracks, so a later in-place op stays legal
        return out.detach()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def skip_backward(h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`out` in value, identity in backward: the output of an unselected layer.

    Args:
        h: the layer's input hidden states `(batch, seq, hidden)`.
        out: the layer's output computed under `torch.no_grad()`, same shape.
    """
    return _IdentityBackward.apply(h, out) if h.requires_grad else out
