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

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


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
          max_length: int | None = None, progress: Callable[[int], None] | None = None) -> list[Score]:
    """The log-likelihood of each continuation given its context (`progress(n)`: n more requests done)."""
    max_length = max_length or max_length_of(model, tokenizer)
    encoded = [encode_pair(tokenizer, ctx, cont) for ctx, cont in requests]
    # one forward per distinct input: the tokens the model reads are (context + continuation)[:-1]
    inputs: dict[tuple[int, ...], list[int]] = {}
    for i, (head, cont) in enumerate(encoded):
        inputs.setdefault(tuple((head + cont)[-(max_length + 1):][:-1]), []).append(i)
    order = sorted(inputs, key=lambda toks: (-len(toks), toks))  # longest first, like the harness
    device = next(model.parameters()).device
    results: list[Score | None] = [None] * len(requests)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = len(chunk[0])
        batch = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, toks in enumerate(chunk):
            batch[row, :len(toks)] = torch.tensor(toks)
        # in the logits' dtype, as the harness does by default (bf16 models: bf16 log-softmax)
        logprobs = F.log_softmax(model(batch.to(device)).logits, dim=-1).float().cpu()
        for row, toks in enumerate(chunk):
            for i in inputs[toks]:
                cont = torch.tensor(encoded[i][1])
                picked = logprobs[row, len(toks) - len(cont):len(toks)]
                results[i] = Score(float(picked.gather(1, cont[:, None]).sum()), bool((picked.argmax(-1) == cont).all()))
            if progress:
                progress(len(inputs[toks]))
    return results  # type: ignore[return-value]
