"""What `memft eval` writes: the scores with every setting that changes them, so a number can be reproduced."""

from __future__ import annotations

import memft
from memft.eval.loglik import max_length_of


def mmlu_report(result, loaded, **settings) -> dict:
    """`result`: `mmlu.Result`; `loaded`: `models.EvalModel`; `settings`: data, split, shots, limit, batch_size."""
    tok = loaded.tokenizer
    ids = tok.encode("a")
    return {
        "task": "mmlu", "memft_version": memft.__version__, "model": loaded.source, "adapters": loaded.adapters,
        "dtype": loaded.dtype, **settings,
        "template": "lm-evaluation-harness `mmlu` (0.4.10+): description, first-n dev shots, ' A'..' D' by "
                    "summed log-likelihood",
        "bos": bool(ids) and tok.bos_token_id is not None and ids[0] == tok.bos_token_id,
        "max_length": max_length_of(loaded.model, tok), "seed": None,
        "results": result.summary(), "questions": result.records,
    }
