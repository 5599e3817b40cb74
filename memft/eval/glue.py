"""GLUE validation metrics: for a classifier, its arg-max class; for a causal LM, lm-evaluation-harness's prompted
multiple-choice form (0-shot; its prompts, its choice order, the first maximum of the summed log-likelihoods).

Data: the original GLUE TSVs (`<dir>/<Task>/dev.tsv`, MNLI `dev_matched.tsv`; read on tabs without quoting,
CoLA without a header) or `hub` for `nyu-mll/glue` (validation; MNLI validation_matched). Metrics as the
GLUE benchmark and the harness define them: accuracy; Matthews correlation for CoLA; F1 of the positive class
and accuracy for MRPC and QQP; Pearson and Spearman correlation for STS-B (classifiers only: the harness has no
STS-B task).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from memft.errors import UserError
from memft.eval import loglik
from memft.textio import open_text


@dataclass(frozen=True)
class Task:
    folder: str
    file: str
    fields: tuple[str, ...]
    """Text columns (hub names); a pair task has two."""
    label: str
    local: tuple
    """Columns of the local TSV: (text column(s)..., label column), by header name or, header-less, number."""
    names: tuple[str, ...] = ()
    """String labels of the local files in GLUE's id order (RTE: entailment = 0)."""
    prompt: Callable[[dict], str] | None = None
    choices: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ("acc",)


def _mnli(d: dict) -> str:
    hypothesis = d["hypothesis"].strip()
    return f"{d['premise']}\nQuestion: {hypothesis}{'' if hypothesis.endswith('.') else '.'} True, False or Neither?\nAnswer:"


TASKS = {  # prompts and choices: lm-evaluation-harness tasks/glue/<task>/default.yaml
    "sst2": Task("SST-2", "dev.tsv", ("sentence",), "label", ("sentence", "label"),
                 prompt=lambda d: f"{d['sentence']}\nQuestion: Is this sentence positive or negative?\nAnswer:",
                 choices=("negative", "positive")),
    "cola": Task("CoLA", "dev.tsv", ("sentence",), "label", ("3", "1"),
                 prompt=lambda d: f"{d['sentence']}\nQuestion: Does this sentence make sense?\nAnswer:",
                 choices=("no", "yes"), metrics=("mcc",)),
    "mrpc": Task("MRPC", "dev.tsv", ("sentence1", "sentence2"), "label", ("#1 String", "#2 String", "Quality"),
                 prompt=lambda d: f"Sentence 1: {d['sentence1']}\nSentence 2: {d['sentence2']}\nQuestion: Do both "
                                  "sentences mean the same thing?\nAnswer:",
                 choices=("no", "yes"), metrics=("acc", "f1")),
    "qqp": Task("QQP", "dev.tsv", ("question1", "question2"), "label", ("question1", "question2", "is_duplicate"),
                prompt=lambda d: f"Question 1: {d['question1']}\nQuestion 2: {d['question2']}\nQuestion: Do both "
                                 "questions ask the same thing?\nAnswer:",
                choices=("no", "yes"), metrics=("acc", "f1")),
    "rte": Task("RTE", "dev.tsv", ("sentence1", "sentence2"), "label", ("sentence1", "sentence2", "label"),
                names=("entailment", "not_entailment"),
                prompt=lambda d: f"{d['sentence1']}\nQuestion: {d['sentence2']} True or False?\nAnswer:",
                choices=("True", "False")),
    "qnli": Task("QNLI", "dev.tsv", ("question", "sentence"), "label", ("question", "sentence", "label"),
                 names=("entailment", "not_entailment"),
                 prompt=lambda d: f"{d['question']}\n{d['sentence']}\nQuestion: Does this response answer the "
                                  "question?\nAnswer:",
                 choices=("yes", "no")),
    "mnli": Task("MNLI", "dev_matched.tsv", ("premise", "hypothesis"), "label", ("sentence1", "sentence2", "gold_label"),
                 names=("entailment", "neutral", "contradiction"), prompt=_mnli, choices=("True", "Neither", "False")),
    "wnli": Task("WNLI", "dev.tsv", ("sentence1", "sentence2"), "label", ("sentence1", "sentence2", "label"),
                 prompt=lambda d: f"{d['sentence1']}\nQuestion: {d['sentence2']} True or False?\nAnswer:",
                 choices=("False", "True")),
    "stsb": Task("STS-B", "dev.tsv", ("sentence1", "sentence2"), "label", ("sentence1", "sentence2", "score"),
                 metrics=("pearson", "spearman")),
}


def load(task: str, source: str | Path, limit: int | None = None) -> list[dict]:
    """Validation rows as `{<fields>..., "label": int (float for STS-B)}`."""
    spec = _spec(task)
    if str(source) == "hub":
        from memft.data.sources import read_hub

        rows = read_hub("nyu-mll/glue", task, "validation_matched" if task == "mnli" else "validation", limit,
                        local_hint="pass `--data DIR` with the original GLUE TSVs")
        return [{**{f: r[f] for f in spec.fields}, "label": r["label"]} for r in rows]
    path = Path(source) / spec.folder / spec.file
    if not path.is_file():
        raise UserError(f"no GLUE {task} validation file at {path} (the original GLUE layout: <dir>/{spec.folder}/"
                        f"{spec.file}); or use `--data hub`")
    with open_text(path, f"GLUE {task} file") as f:  # MRPC's dev.tsv starts with a UTF-8 BOM
        table = [r for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if r]
    header = None if task == "cola" else table.pop(0)
    column = {c: (int(c) if header is None else header.index(c)) for c in spec.local if header is None or c in header}
    if len(column) != len(spec.local):
        raise UserError(f"{path}: expected the columns {', '.join(spec.local)} in its header")
    rows = []
    for r in table[:limit]:
        *texts, label = (r[column[c]] for c in spec.local)
        value = float(label) if task == "stsb" else (spec.names.index(label) if spec.names else int(label))
        rows.append({**dict(zip(spec.fields, texts)), "label": value})
    return rows


def _spec(task: str) -> Task:
    if task not in TASKS:
        raise UserError(f"unknown GLUE task `{task}`; choose one of {', '.join(TASKS)}")
    return TASKS[task]


# ---------------------------------------------------------------------- predictions


@torch.no_grad()
def classify(model, tokenizer, task: str, rows: list[dict], *, batch_size: int = 32, max_length: int = 512,
             progress: Callable[[int], None] | None = None) -> list[float]:
    """A sequence classifier's prediction per row: its arg-max class (the raw score for STS-B)."""
    from memft.data.formats import pad_token_id

    spec = _spec(task)
    model.eval()
    device = next(model.parameters()).device
    pad = pad_token_id(tokenizer)
    preds: list[float] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        texts = [[r[f] for r in chunk] for f in spec.fields]
        enc = tokenizer(*texts, truncation=True, max_length=max_length)  # as training encodes (BERT: segments)
        ids = enc["input_ids"]
        width = max(map(len, ids))  # right-padded with the pad id training used (EOS when there is no pad token)
        inputs = {"input_ids": [x + [pad] * (width - len(x)) for x in ids],
                  "attention_mask": [[1] * len(x) + [0] * (width - len(x)) for x in ids]}
        if "token_type_ids" in enc:
            inputs["token_type_ids"] = [t + [0] * (width - len(t)) for t in enc["token_type_ids"]]
        logits = model(**{k: torch.tensor(v, device=device) for k, v in inputs.items()}).logits.float().cpu()
        preds += logits[:, 0].tolist() if task == "stsb" else logits.argmax(-1).tolist()
        if progress:
            progress(len(chunk))
    return preds


def as_glue_labels(task: str, preds: list, label_names: list[str] | None) -> list:
    """A memft classification run's class ids as GLUE's label ids: a run trained on string labels numbers them
    in sorted order (MNLI: contradiction, entailment, neutral), GLUE in its own (entailment, neutral, ...)."""
    names = _spec(task).names
    if task == "stsb" or not label_names:
        return preds
    if not names or any(n not in names for n in label_names):
        raise UserError(f"the model's classes {label_names} are not {task}'s labels {list(names) or '0, 1'}")
    return [names.index(label_names[int(p)]) for p in preds]


def choose(model, tokenizer, task: str, rows: list[dict], *, batch_size: int = 16, max_length: int | None = None,
           progress: Callable[[int], None] | None = None) -> tuple[list[int], list[list[float]]]:
    """A causal LM's answer per row in the harness's prompted form: (predicted choice, each choice's score)."""
    spec = _spec(task)
    if spec.prompt is None:
        raise UserError(f"`{task}` has no prompted form for a causal LM (lm-evaluation-harness has none either); "
                        "evaluate a sequence classifier on it")
    k = len(spec.choices)
    requests = [(spec.prompt(r), f" {c}") for r in rows for c in spec.choices]
    scores = loglik.score(model, tokenizer, requests, batch_size=batch_size, max_length=max_length, progress=progress)
    lls = [[s.loglikelihood for s in scores[i:i + k]] for i in range(0, len(scores), k)]
    return [ll.index(max(ll)) for ll in lls], lls


# ---------------------------------------------------------------------- metrics


def metrics(task: str, golds: list, preds: list) -> dict[str, float]:
    return {name: METRICS[name](golds, preds) for name in _spec(task).metrics}


def accuracy(golds: list, preds: list) -> float:
    return sum(g == p for g, p in zip(golds, preds)) / len(golds)


def _confusion(golds: list, preds: list) -> tuple[int, int, int, int]:
    tp = sum(g == 1 and p == 1 for g, p in zip(golds, preds))
    tn = sum(g == 0 and p == 0 for g, p in zip(golds, preds))
    fp = sum(g == 0 and p == 1 for g, p in zip(golds, preds))
    fn = sum(g == 1 and p == 0 for g, p in zip(golds, preds))
    return tp, tn, fp, fn


def matthews(golds: list, preds: list) -> float:
    """Binary Matthews correlation; 0 when a row or column of the confusion matrix is empty (as scikit-learn)."""
    tp, tn, fp, fn = _confusion(golds, preds)
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denominator if denominator else 0.0


def f1(golds: list, preds: list) -> float:
    """F1 of the positive class (label 1); 0 when there is no positive at all (as scikit-learn)."""
    tp, _, fp, fn = _confusion(golds, preds)
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def pearson(xs: list, ys: list) -> float:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    cov = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sx, sy = math.sqrt(sum((x - mx) ** 2 for x in xs)), math.sqrt(sum((y - my) ** 2 for y in ys))
    return cov / (sx * sy) if sx and sy else float("nan")


def _ranks(values: list) -> list[float]:
    """1-based ranks, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in order[i:j + 1]:
            ranks[k] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(xs: list, ys: list) -> float:
    return pearson(_ranks(xs), _ranks(ys))


METRICS = {"acc": accuracy, "mcc": matthews, "f1": f1, "pearson": pearson, "spearman": spearman}
