"""Cross-entropy of a linear output head without the batch x sequence x vocabulary logits.

The plain loss projects every position onto the vocabulary, upcasts the logits to float32 and keeps them
(log-softmax's output) for backward; backward then allocates two more logit-sized gradients. At Qwen's
151,936-token vocabulary that is 1.2 GB per 2,048 tokens, plus its gradients.

Here only the target tokens are projected, in chunks of `chunk_tokens(vocab)` rows at a time:

    forward:   z = h_c W^T (+ b)  (float32),   lse_c = logsumexp(z),   loss += sum(lse_c - z[y])
    backward:  z again, then dz = g * (softmax(z) - onehot(y)),   dh_c = dz W,   dW += dz^T h_c,   db += sum(dz)

Backward keeps only the selected hidden rows (which the head would keep as its input anyway) and one float32
log-sum-exp per target; every chunk's logits are recomputed, so the price is one more head matmul per step.
The numbers are the plain loss's: the head runs in the compute dtype (autocast's, else the hidden states'),
the loss in at least float32, as `memft.registry.at_least_float32` does for the plain path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CHUNK_BYTES = 128 * 2**20
"""Float32 logits of one chunk: the bound on what the loss holds at once beyond its saved rows."""

NOT_PLAIN_HEAD = ("final_logit_softcapping", "logits_scaling", "logit_scale")
"""Config fields of models whose causal-LM forward transforms the head's output (Gemma-2's softcapping, Granite's
and Cohere's scaling): their loss is taken on the model's own logits."""


def chunk_tokens(vocab: int) -> int:
    return max(1, CHUNK_BYTES // (4 * vocab))


def transient_bytes(tokens: int, vocab: int, hidden: int, dtype: torch.dtype, head_dtype: torch.dtype,
                    head_trains: bool) -> int:
    """What the loss's backward allocates beyond what it saved: one chunk's probabilities (float32, and their copy in
    the compute dtype), the hidden states' gradient, a compute-dtype copy of a head stored in another dtype, and the
    float32 accumulator of a trained head's gradient when the head is stored in another dtype (the gradient itself,
    in the head's dtype, is the profile's `head_gradient`)."""
    acc = torch.promote_types(dtype, torch.float32).itemsize
    low = dtype.itemsize if dtype.itemsize < acc else 0
    cast = vocab * hidden * dtype.itemsize if head_dtype != dtype else 0
    accumulator = vocab * hidden * acc if head_trains and head_dtype.itemsize != acc else 0
    chunk = min(tokens, chunk_tokens(vocab)) * vocab * (acc + low)
    return chunk + tokens * hidden * dtype.itemsize + cast + accumulator


def linear_head(model: nn.Module) -> nn.Linear | None:
    """The model's output head when its causal-LM forward is `head(hidden)` and nothing after; else None (peft-adapted
    or 4-bit heads, softcapped or scaled logits), and the loss takes the model's logits as they are."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if type(head) is not nn.Linear:
        return None
    config = getattr(model, "config", None)
    for field in NOT_PLAIN_HEAD:
        value = getattr(config, field, None)
        if value is not None and value != 1.0:
            return None
    return head


def hidden_states(model: nn.Module, head: nn.Linear, inputs: dict) -> torch.Tensor:
    """The model's final hidden states (B, S, H), the head's input, from a forward whose head projects nothing.

    A pre-hook on the head takes its input and hands it an empty slice, so the logits the model returns are
    (B, 0, V): wrappers (peft, memft's strategies) run their own forward unchanged."""
    captured = []

    def take(module, args):
        captured.append(args[0])
        return (args[0][..., :0, :],)

    handle = head.register_forward_pre_hook(take)
    try:
        model(**inputs)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"the output head ran {len(captured)} times in one forward; expected once")
    return captured[0]


def linear_cross_entropy(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor,
                         ignore_index: int = -100) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of `head(hidden)` against `labels` (same leading shape; `ignore_index` skipped), and the
    number of targets. Equal to `F.cross_entropy(at_least_float32(head(hidden)), labels, reduction="sum")`."""
    flat = labels.reshape(-1)
    where = (flat != ignore_index).nonzero()[:, 0]
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    # the hidden states are passed whole with the targets' positions: the rows are gathered chunk by chunk, so
    # backward keeps the tensor the model holds anyway rather than a copy of its target rows
    loss = _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), where, head.weight, head.bias,
                                     flat[where], dtype)
    return loss, int(where.numel())


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, where, weight, bias, targets, dtype):
        acc = torch.promote_types(dtype, torch.float32)
        step = chunk_tokens(weight.shape[0])
        lse = torch.empty(where.shape[0], dtype=acc, device=hidden.device)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
            for start in range(0, where.shape[0], step):
                sl = slice(start, start + step)
                z = F.linear(hidden[where[sl]].to(dtype), w, b).to(acc)
                lse[sl] = torch.logsumexp(z, dim=-1)
                total += (lse[sl] - z.gather(1, targets[sl, None])[:, 0]).sum()
        ctx.save_for_backward(hidden, where, weight, bias, targets, lse)
        ctx.dtype = dtype
        return total

    @staticmethod
    def backward(ctx, grad):
        hidden, where, weight, bias, targets, lse = ctx.saved_tensors
        dtype, acc = ctx.dtype, lse.dtype
        needs_hidden, _, needs_weight, needs_bias = ctx.needs_input_grad[:4]
        step = chunk_tokens(weight.shape[0])
        d_hidden = torch.zeros_like(hidden) if needs_hidden else None
        d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs_weight else None
        d_bias = torch.zeros(bias.shape, dtype=acc, device=bias.device) if needs_bias else None
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
            for start in range(0, where.shape[0], step):
                sl = slice(start, start + step)
                x = hidden[where[sl]].to(dtype)
                # softmax(z) - onehot(y), scaled by the incoming gradient, in place on one chunk's logits
                p = F.linear(x, w, b).to(acc).sub_(lse[sl, None]).exp_()
                p[torch.arange(p.shape[0], device=p.device), targets[sl]] -= 1
                p.mul_(grad.to(acc))
                pd = p.to(dtype)
                if d_hidden is not None:
                    d_hidden[where[sl]] = (pd @ w).to(hidden.dtype)
                if d_weight is not None:
                    d_weight += (pd.T @ x).to(acc)
                if d_bias is not None:
                    d_bias += p.sum(0)
        return (d_hidden, None, None if d_weight is None else d_weight.to(weight.dtype),
                None if d_bias is None else d_bias.to(bias.dtype), None, None)
