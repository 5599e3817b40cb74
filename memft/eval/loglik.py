"""Log-likelihood of continuations given contexts, scored the way lm-evaluation-harness's `HFLM` scores them.

For each `(context, continuation)` request (harness 0.4.10+, `TemplateLM._encode_pair` and
`HFLM._loglikelihood_tokens`):
* trailing whitespace of the context moves to the continuation;
* context + continuation are encoded together with the tokenizer's defaults (a Llama tokenizer adds BOS),
  the context alone likewise, and the joint encoding is split at the context's length;
* the model reads the last `max_length` tokens of context + continuation minus its final token (left
  truncation), and the score is the sum of the continuation tokens' log-softmax; `greedy` says whether each
  continuation token was the arg-max.

Requests whose tokens agree up to the continuation's last token share one forward (MMLU's " A" .. " D"
after the same question), and batches are built longest first, right-padded; results come back in the
order asked.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from memft.models.blocks import unwrap


@dataclass(frozen=True)
class Score:
    loglikelihood: float
    greedy: bool


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens), split from one joint encoding as the harness does."""
    if not context:  # nothing to condition on: the harness puts BOS (else EOS) before the continuation
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return ([prefix], cont) if cont[:1] != [prefix] else (cont[:1], cont[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    head = tokenizer.encode(context)
    return head, whole[len(head):]


def max_length_of(model, tokenizer, default: int = 2048) -> int:
    """The harness's `max_length`: the model config's position limit, else the tokenizer's, else 2048."""
    config = getattr(model.config, "text_config", None) or model.config
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and limit < 10**9 else default


@torch.no_grad()
def score(model, tokenizer, requests: Sequence[tuple[str, str]], *, batch_size: int = 16,
          max_length: int | None = None, reuse_prefix: bool = True,
          progress: Callable[[int], None] | None = None) -> list[Score]:
    """The log-likelihood of each continuation given its context (`progress(n)`: n more requests done).

    `reuse_prefix`: a batch whose inputs start with the same tokens (MMLU's description and few-shot
    examples, shared by a subject's questions) runs that prefix once and the rest of each input on its
    key-value cache. The scores are those of full forwards up to float rounding (tested to 1e-4).
    """
    model.eval()  # no dropout: a model scored right after training is still in train mode
    max_length = max_length or max_length_of(model, tokenizer)
    encoded = [encode_pair(tokenizer, ctx, cont) for ctx, cont in requests]
    # one forward per distinct input: the tokens the model reads are (context + continuation)[:-1]
    inputs: dict[tuple[int, ...], list[int]] = {}
    for i, (head, cont) in enumerate(encoded):
        inputs.setdefault(tuple((head + cont)[-(max_length + 1):][:-1]), []).append(i)
    runs = _prefix_runs(sorted(inputs)) if reuse_prefix else []  # sorted: a shared prefix puts inputs side by side
    batches = [run[i:i + batch_size] for run in runs if len(run) > 1 for i in range(0, len(run), batch_size)]
    alone = sorted((toks for run in runs if len(run) == 1 for toks in run) if reuse_prefix else inputs,
                   key=lambda toks: (-len(toks), toks))  # the rest longest first, like the harness
    batches += [alone[i:i + batch_size] for i in range(0, len(alone), batch_size)]
    results: list[Score | None] = [None] * len(requests)
    checked = False
    for chunk in batches:
        # the shared prefix must end before the first position whose logits score a continuation
        first_scored = min(len(toks) - max(len(encoded[i][1]) for i in inputs[toks]) for toks in chunk)
        shared = min(_common_prefix(chunk), first_scored) if reuse_prefix else 0
        shared = shared if _worth_sharing(shared, min(map(len, chunk))) else 0
        logprobs = _forward(model, chunk, shared)
        if shared and not checked:  # a model whose forward ignores the cache (a rewired stack) is caught here
            checked = True
            plain = _forward(model, chunk[:1], 0)[0, shared:len(chunk[0])]
            if (plain - logprobs[0, :len(chunk[0]) - shared]).abs().max() > 1e-3:
                reuse_prefix, shared = False, 0
                logprobs = _forward(model, chunk, 0)
        for row, toks in enumerate(chunk):
            for i in inputs[toks]:
                cont = torch.tensor(encoded[i][1])
                end = len(toks) - shared
                picked = logprobs[row, end - len(cont):end]
                results[i] = Score(float(picked.gather(1, cont[:, None]).sum()), bool((picked.argmax(-1) == cont).all()))
            if progress:
                progress(len(inputs[toks]))
    return results  # type: ignore[return-value]


MIN_SHARED = 32
"""A common prefix shorter than this many tokens is not run separately."""


def _worth_sharing(shared: int, length: int) -> bool:
    """Whether a prefix of `shared` tokens is worth its own forward for inputs of `length` tokens: the rest
    then runs on a cache, whose attention is slower per query than a plain causal forward (on a CPU about
    3x faster overall when the prefix is 85% of the input; slower than a plain forward when it is 6%)."""
    return shared >= MIN_SHARED and 2 * shared >= length


def _prefix_runs(ordered: list[tuple[int, ...]]) -> list[list[tuple[int, ...]]]:
    """`ordered` (sorted) cut where an input shares too little with its run's first to run on one cache."""
    runs: list[list[tuple[int, ...]]] = []
    for toks in ordered:
        if runs and _worth_sharing(_common_prefix([runs[-1][0], toks]), min(len(runs[-1][0]), len(toks))):
            runs[-1].append(toks)
        else:
            runs.append([toks])
    return runs


def _common_prefix(chunk: list[tuple[int, ...]]) -> int:
    first, last = min(chunk), max(chunk)  # the common prefix of a set is that of its extremes
    n = 0
    while n < min(len(first), len(last)) and first[n] == last[n]:
        n += 1
    return n


def _cache_argument(model) -> str:
    """What the model's forward calls its KV cache, argument and output: `cache` since transformers 5.2x (which
    warns on the old name and drops it in 5.40), `past_key_values` before."""
    forward = inspect.signature(type(unwrap(model)).forward).parameters
    return "cache" if "cache" in forward else "past_key_values"


def _forward(model, chunk: list[tuple[int, ...]], shared: int) -> torch.Tensor:
    """Log-softmax over the vocabulary at every position of each input after its first `shared` tokens
    (right-padded; causal attention, so the padding never reaches a real position)."""
    device = next(model.parameters()).device
    cache, name = None, _cache_argument(model)
    if shared:
        cache = getattr(model(torch.tensor([chunk[0][:shared]], device=device), use_cache=True), name)
        cache.batch_repeat_interleave(len(chunk))
    width = max(len(toks) for toks in chunk) - shared
    batch = torch.zeros((len(chunk), width), dtype=torch.long)
    for row, toks in enumerate(chunk):
        batch[row, :len(toks) - shared] = torch.tensor(toks[shared:])
    logits = model(batch.to(device), **{name: cache}, use_cache=cache is not None).logits
    # in the logits' dtype, as the harness does by default (bf16 models: bf16 log-softmax)
    return F.log_softmax(logits, dim=-1).float().cpu()
