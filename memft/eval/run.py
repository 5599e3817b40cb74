"""Running a benchmark on a loaded model: what `memft eval` and a recipe's `eval:` section both call."""

from __future__ import annotations

import json
from collections.abc import Callable

from memft.eval import glue, mmlu
from memft.eval.models import EvalModel
from memft.eval.report import glue_report, mmlu_report


def _counter(total: int, progress: Callable[[int, int], None] | None) -> Callable[[int], None]:
    """`advance(n)` for the scorers, reported to `progress(done, total)`."""
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    return advance


def run_mmlu(loaded: EvalModel, *, data: str, split: str, shots: int, subjects: list[str] | None = None,
             limit: int | None = None, batch_size: int = 16,
             progress: Callable[[int, int], None] | None = None) -> dict:
    """The MMLU report (`progress(done, total)` in scored choices)."""
    questions = mmlu.load(data, split, subjects)
    exemplars = mmlu.load(data, "dev", list(questions)) if shots else {}
    advance = _counter(4 * sum(len(q[:limit]) for q in questions.values()), progress)
    result = mmlu.evaluate(loaded.model, loaded.tokenizer, questions, exemplars, shots=shots, limit=limit,
                           batch_size=batch_size, progress=advance)
    return mmlu_report(result, loaded, data=data, split=split, shots=shots, limit=limit, batch_size=batch_size)


def run_glue(loaded: EvalModel, *, task: str, data: str, limit: int | None = None, batch_size: int = 32,
             progress: Callable[[int, int], None] | None = None) -> dict:
    """The GLUE report: a classifier's arg-max class, or a causal LM's answer in the harness's prompted form."""
    rows = glue.load(task, data, limit)
    classifier = loaded.task == "sequence_classification"
    advance = _counter(len(rows) * (1 if classifier else len(glue.TASKS[task].choices)), progress)
    if classifier:
        preds = glue.classify(loaded.model, loaded.tokenizer, task, rows, batch_size=batch_size,
                              max_length=loaded.max_length, progress=advance)
        preds, lls = glue.as_glue_labels(task, preds, loaded.label_names), None
    else:
        preds, lls = glue.choose(loaded.model, loaded.tokenizer, task, rows, batch_size=batch_size, progress=advance)
    return glue_report(task, rows, preds, lls, loaded, data=data, limit=limit, batch_size=batch_size)


def evaluate_run(trainer) -> dict:
    """A recipe's `eval:` section on `trainer`'s model as trained (adapters and strategies included): the
    scores for summary.json; each full report goes to `eval_<name>.json` in the run directory."""
    r = trainer.recipe
    loaded = EvalModel.of(trainer, f"run {trainer.run_dir} (end of training)")
    reports = {}
    if (m := r.eval.mmlu) is not None:
        reports["mmlu"] = run_mmlu(loaded, data=m.data, split=m.split, shots=m.shots, subjects=m.subjects,
                                   limit=m.limit, batch_size=m.batch_size)
    for g in r.eval.glue:
        reports[f"glue_{g.task}"] = run_glue(loaded, task=g.task, data=g.data, limit=g.limit, batch_size=g.batch_size)
    trainer.model.train()
    for name, report in reports.items():
        (trainer.run_dir / f"eval_{name}.json").write_text(json.dumps(report, indent=2))
    return {name: {k: v for k, v in report["results"].items() if k != "subjects"} for name, report in reports.items()}
