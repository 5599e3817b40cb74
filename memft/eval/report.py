"""What `memft eval` writes: the scores with every setting that changes them, so a number can be reproduced."""

from __future__ import annotations

import memft
from memft.eval.loglik import max_length_of


def _header(task: str, loaded) -> dict:
    """What every report starts with: the task, memft's version and what was scored."""
    return {"task": task, "memft_version": memft.__version__, "model": loaded.source, "adapters": loaded.adapters,
            "dtype": loaded.dtype}


def mmlu_report(result, loaded, **settings) -> dict:
    """`result`: `mmlu.Result`; `loaded`: `models.EvalModel`; `settings`: data, split, shots, limit, batch_size."""
    tok = loaded.tokenizer
    ids = tok.encode("a")
    return {
        **_header("mmlu", loaded), **settings,
        "template": "lm-evaluation-harness `mmlu` (0.4.10+): description, first-n dev shots, ' A'..' D' by "
                    "summed log-likelihood",
        "bos": bool(ids) and tok.bos_token_id is not None and ids[0] == tok.bos_token_id,
        "max_length": max_length_of(loaded.model, tok), "seed": None,
        "results": result.summary(), "questions": result.records,
    }


def glue_report(task: str, rows: list[dict], preds: list, scores, loaded, **settings) -> dict:
    from memft.eval import glue

    golds = [r["label"] for r in rows]
    form = "classifier" if scores is None else "lm-evaluation-harness glue prompt, 0-shot, summed log-likelihood"
    return {
        **_header(task, loaded), "form": form, **settings, "examples": len(rows), "seed": None,
        "results": glue.metrics(task, golds, preds),
        "predictions": [{"gold": g, "pred": p, **({"loglikelihoods": s} if scores else {})}
                        for g, p, s in zip(golds, preds, scores or [None] * len(rows))],
    }
