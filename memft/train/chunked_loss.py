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

`linear_kl_divergence` does the same for distillation toward a frozen teacher (RevFFN's recovery): per chunk of
positions both heads' log-probabilities, and backward keeps the teacher's hidden rows and two log-sum-exps per row.
"""

from __future__ import annotations

from typing import Literal

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
    float32 sum of a trained head stored in another dtype: of its gradient when backward walks chunks of tokens, of
    the target rows' gradient (with a copy of those rows) when it walks vocabulary rows (`by_vocab`); the head's
    gradient itself, in its dtype, is the profile's `head_gradient`."""
    acc_dtype = torch.promote_types(dtype, torch.float32)
    acc = acc_dtype.itemsize
    low = dtype.itemsize if dtype.itemsize < acc else 0
    cast = vocab * hidden * dtype.itemsize if head_dtype != dtype else 0
    accumulator = 0
    chunk = min(tokens, chunk_tokens(vocab)) * vocab * (acc + low)
    if head_trains and head_dtype.itemsize != acc:
        if by_vocab(tokens, vocab, head_dtype, acc_dtype):
            accumulator = tokens * hidden * (acc + dtype.itemsize)
            chunk = tokens * min(vocab, max(1, CHUNK_BYTES // (4 * max(1, tokens)))) * (acc + low)
        else:
            accumulator = vocab * hidden * acc
    return chunk + tokens * hidden * dtype.itemsize + cast + accumulator


def distill_transient_bytes(tokens: int, vocab: int, hidden: int, dtype: torch.dtype, head_dtype: torch.dtype,
                            head_trains: bool) -> int:
    """`transient_bytes` for `linear_kl_divergence`'s backward: the teacher's chunk of probabilities on top, and
    the teacher head's compute-dtype copy when it is stored in another dtype. (Its forward holds three float32 chunks
    at most: both models' log-probabilities and logsumexp's temporary.)"""
    acc = torch.promote_types(dtype, torch.float32).itemsize
    teacher_cast = vocab * hidden * dtype.itemsize if head_dtype != dtype else 0
    return (transient_bytes(tokens, vocab, hidden, dtype, head_dtype, head_trains)
            + min(tokens, chunk_tokens(vocab)) * vocab * acc + teacher_cast)


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


def head_loss(model: nn.Module, head: nn.Linear, inputs: dict, loss_fn):
    """`loss_fn(hidden)`, run on the head's input (the final hidden states) at the head's call inside the model's
    forward, the head itself projecting nothing (the model returns (B, 0, V) logits).

    Inside the forward, the head's weight is the one the forward uses: FSDP has gathered the root's shards then
    (`memft.train.distributed`), not after. The result's first tensor is also set as the forward's `loss` output,
    before any wrapper's own forward hook runs, so a wrapper that hooks the outputs (FSDP gathers the root's
    weights again at the start of their backward) sees it."""
    results = []

    def take(module, args):
        results.append(loss_fn(args[0]))
        return (args[0][..., :0, :],)

    def attach(module, args, output):
        if results:
            output["loss"] = results[-1][0]
        return output

    handles = [head.register_forward_pre_hook(take), model.register_forward_hook(attach, prepend=True)]
    try:
        model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    if len(results) != 1:
        raise RuntimeError(f"the output head ran {len(results)} times in one forward; expected once")
    return results[0]


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
        d_hidden = torch.zeros_like(hidden) if needs_hidden else None
        d_bias = torch.zeros(bias.shape, dtype=acc, device=bias.device) if needs_bias else None
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
            if needs_weight and by_vocab(where.shape[0], weight.shape[0], weight.dtype, acc):
                d_weight = _backward_by_vocab(hidden, where, w, b, targets, lse, grad.to(acc), d_hidden, d_bias)
                d_weight = d_weight.to(weight.dtype)
            else:
                d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs_weight else None
                step = chunk_tokens(weight.shape[0])
                for start in range(0, where.shape[0], step):
                    sl = slice(start, start + step)
                    x = hidden[where[sl]].to(dtype)
                    # softmax(z) - onehot(y), scaled by the incoming gradient, in place on one chunk's logits
                    p = F.linear(x, w, b).to(acc).sub_(lse[sl, None]).exp_()
                    p[torch.arange(p.shape[0], device=p.device), targets[sl]] -= 1
                    p.mul_(grad.to(acc))
                    _add_chunk_gradients(p, x, w, where[sl], d_hidden, d_weight, d_bias)
                    del p  # before the next chunk's logits exist
                d_weight = None if d_weight is None else d_weight.to(weight.dtype)
        return (d_hidden, None, d_weight, None if d_bias is None else d_bias.to(bias.dtype), None, None)


def _add_chunk_gradients(dz: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rows: torch.Tensor,
                         d_hidden, d_weight, d_bias) -> None:
    """One token chunk's share of the head's backward from `dz` (float32 logit gradients of rows `rows`): the rows'
    hidden gradient `dz W`, and `dz^T x`, `sum(dz)` added to the weight's and bias's float32 sums."""
    dz_low = dz.to(x.dtype)
    if d_hidden is not None:
        d_hidden[rows] = (dz_low @ w).to(d_hidden.dtype)
    if d_weight is not None:
        d_weight += (dz_low.T @ x).to(d_weight.dtype)
    if d_bias is not None:
        d_bias += dz.sum(0)


WEIGHT_GRADIENT: Literal["auto", "by_tokens", "by_vocab"] = "auto"
"""How backward walks the logits when the head trains: in chunks of tokens (every chunk adds to a float32 gradient
of the whole head) or of vocabulary rows (every chunk writes its rows' gradient once, and the float32 sum is the
hidden rows' gradient). `auto`: by vocabulary when the head is stored in less than float32 and there are fewer
target tokens than vocabulary rows, so the float32 buffer is the smaller one (a switch for tests)."""


def by_vocab(tokens: int, vocab: int, head_dtype: torch.dtype, acc: torch.dtype) -> bool:
    """Whether a trained head's backward walks vocabulary chunks (`WEIGHT_GRADIENT`)."""
    if WEIGHT_GRADIENT != "auto":
        return WEIGHT_GRADIENT == "by_vocab"
    return head_dtype.itemsize < acc.itemsize and tokens < vocab


def _backward_by_vocab(hidden, where, w, b, targets, lse, grad, d_hidden, d_bias) -> torch.Tensor:
    """The loss's backward over chunks of vocabulary rows: for rows c, `dz_c = g (exp(z_c - lse) - onehot_c)`,
    `dW_c = dz_c^T x` (written once, in the compute dtype), `dx += dz_c W_c` (float32 over the chunks). Returns dW."""
    acc = lse.dtype
    x = hidden[where].to(w.dtype)
    d_weight = torch.empty_like(w)
    d_rows = torch.zeros(x.shape, dtype=acc, device=x.device) if d_hidden is not None else None
    rows = torch.arange(x.shape[0], device=x.device)
    step = max(1, CHUNK_BYTES // (4 * max(1, x.shape[0])))
    for start in range(0, w.shape[0], step):
        vs = slice(start, start + step)
        p = F.linear(x, w[vs], None if b is None else b[vs]).to(acc).sub_(lse[:, None]).exp_()
        hit = (targets >= start) & (targets < start + p.shape[1])
        p[rows[hit], targets[hit] - start] -= 1
        p.mul_(grad)
        pd = p.to(w.dtype)
        d_weight[vs] = pd.T @ x
        if d_rows is not None:
            d_rows += (pd @ w[vs]).to(acc)
        if d_bias is not None:
            d_bias[vs] = p.sum(0)
        del p, pd
    if d_hidden is not None:
        d_hidden[where] = d_rows.to(d_hidden.dtype)
    return d_weight


def linear_kl_divergence(student_hidden: torch.Tensor, student_head: nn.Linear, teacher_hidden: torch.Tensor,
                         teacher_head: nn.Linear, mask: torch.Tensor, temperature: float) -> tuple[torch.Tensor, int]:
    """Summed distillation loss `t^2 KL(softmax(z_T / t) || softmax(z_S / t))` over the positions where `mask` is
    true, with `z = head(hidden)`, and the number of positions; the teacher is a constant. Equal to
    `F.kl_div(log_softmax(at_least_float32(z_S) / t), log_softmax(at_least_float32(z_T) / t), log_target=True)`
    summed over the vocabulary and the masked positions, times t^2."""
    where = mask.reshape(-1).nonzero()[:, 0]
    device = student_hidden.device.type
    autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    width = teacher_hidden.shape[-1]
    # the teacher's rows are gathered once: nothing else keeps its hidden states, and backward needs only these
    teacher_rows = teacher_hidden.detach().reshape(-1, width)[where]
    t_bias = None if teacher_head.bias is None else teacher_head.bias.detach()
    loss = _LinearKLDivergence.apply(
        student_hidden.reshape(-1, student_hidden.shape[-1]), where, student_head.weight, student_head.bias,
        teacher_rows, teacher_head.weight.detach(), t_bias, float(temperature),
        autocast or student_hidden.dtype, autocast or teacher_hidden.dtype)
    return loss, int(where.numel())


def _log_probs(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, dtype: torch.dtype, acc: torch.dtype,
               t: float, lse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(head(x) / t) of a chunk of rows in `acc`, and its log-sum-exp (given: backward's recompute)."""
    z = F.linear(x.to(dtype), w, b).to(acc).div_(t)
    if lse is None:
        lse = torch.logsumexp(z, dim=-1)
    return z.sub_(lse[:, None]), lse


class _LinearKLDivergence(torch.autograd.Function):
    """forward:   per chunk, log p_S and log p_T (float32 at least),   loss += t^2 sum p_T (log p_T - log p_S)
    backward:  both recomputed from the saved log-sum-exps,   dz_S = g t (p_S - p_T)   (the 1/t inside the softmax
    against the t^2 outside),   dh = dz_S W_S,   dW_S += dz_S^T h,   db_S += sum(dz_S)."""

    @staticmethod
    def forward(ctx, hidden, where, weight, bias, t_rows, t_weight, t_bias, t, dtype, t_dtype):
        acc = torch.promote_types(torch.promote_types(dtype, t_dtype), torch.float32)
        step = chunk_tokens(weight.shape[0])
        lse = torch.empty(where.shape[0], dtype=acc, device=hidden.device)
        t_lse = torch.empty_like(lse)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
            tw, tb = t_weight.to(t_dtype), None if t_bias is None else t_bias.to(t_dtype)
            for start in range(0, where.shape[0], step):
                sl = slice(start, start + step)
                student, lse[sl] = _log_probs(hidden[where[sl]], w, b, dtype, acc, t)
                teacher, t_lse[sl] = _log_probs(t_rows[sl], tw, tb, t_dtype, acc, t)
                # p_T (log p_T - log p_S), in place on the two chunks' buffers
                diff = student.neg_().add_(teacher)
                total += teacher.exp_().mul_(diff).sum() * (t * t)
                del student, teacher, diff  # before the next chunk's logits exist
        ctx.save_for_backward(hidden, where, weight, bias, t_rows, t_weight, t_bias, lse, t_lse)
        ctx.t, ctx.dtype, ctx.t_dtype = t, dtype, t_dtype
        return total

    @staticmethod
    def backward(ctx, grad):
        hidden, where, weight, bias, t_rows, t_weight, t_bias, lse, t_lse = ctx.saved_tensors
        t, dtype, t_dtype, acc = ctx.t, ctx.dtype, ctx.t_dtype, lse.dtype
        needs_hidden, _, needs_weight, needs_bias = ctx.needs_input_grad[:4]
        step = chunk_tokens(weight.shape[0])
        d_hidden = torch.zeros_like(hidden) if needs_hidden else None
        d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs_weight else None
        d_bias = torch.zeros(bias.shape, dtype=acc, device=bias.device) if needs_bias else None
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
            tw, tb = t_weight.to(t_dtype), None if t_bias is None else t_bias.to(t_dtype)
            for start in range(0, where.shape[0], step):
                sl = slice(start, start + step)
                x = hidden[where[sl]].to(dtype)
                p = _log_probs(x, w, b, dtype, acc, t, lse[sl])[0].exp_()
                p.sub_(_log_probs(t_rows[sl], tw, tb, t_dtype, acc, t, t_lse[sl])[0].exp_()).mul_(grad.to(acc) * t)
                _add_chunk_gradients(p, x, w, where[sl], d_hidden, d_weight, d_bias)
                del p  # before the next chunk's logits exist
        return (d_hidden, None, None if d_weight is None else d_weight.to(weight.dtype),
                None if d_bias is None else d_bias.to(bias.dtype), None, None, None, None, None, None)
