"""MMLU few-shot, as lm-evaluation-harness's default `mmlu` task scores it (lm_eval 0.4.10+).

Each question is preceded by "The following are multiple choice questions (with answers) about
<subject>.\\n\\n" and the subject's first `shots` dev examples, each "<question>\\nA. ..\\nB. ..\\nC. ..\\nD. ..
\\nAnswer: <letter>" followed by "\\n\\n"; the question itself ends at "Answer:". The continuations " A" ..
" D" are scored by summed log-likelihood (`memft.eval.loglik`), the prediction is the first maximum, and
accuracy is reported per subject, per category and as the size-weighted (micro) average, as the harness's
groups aggregate. Note the harness's own default is 0-shot; `memft eval mmlu` defaults to the usual 5.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from memft.errors import UserError
from memft.eval import loglik
from memft.textio import open_text

LETTERS = "ABCD"
CATEGORY = {  # the harness's tags (tasks/mmlu/default/mmlu_<subject>.yaml)
    "abstract_algebra": "stem", "anatomy": "stem", "astronomy": "stem", "business_ethics": "other",
    "clinical_knowledge": "other", "college_biology": "stem", "college_chemistry": "stem",
    "college_computer_science": "stem", "college_mathematics": "stem", "college_medicine": "other",
    "college_physics": "stem", "computer_security": "stem", "conceptual_physics": "stem",
    "econometrics": "social_sciences", "electrical_engineering": "stem", "elementary_mathematics": "stem",
    "formal_logic": "humanities", "global_facts": "other", "high_school_biology": "stem",
    "high_school_chemistry": "stem", "high_school_computer_science": "stem",
    "high_school_european_history": "humanities", "high_school_geography": "social_sciences",
    "high_school_government_and_politics": "social_sciences", "high_school_macroeconomics": "social_sciences",
    "high_school_mathematics": "stem", "high_school_microeconomics": "social_sciences",
    "high_school_physics": "stem", "high_school_psychology": "social_sciences", "high_school_statistics": "stem",
    "high_school_us_history": "humanities", "high_school_world_history": "humanities", "human_aging": "other",
    "human_sexuality": "social_sciences", "international_law": "humanities", "jurisprudence": "humanities",
    "logical_fallacies": "humanities", "machine_learning": "stem", "management": "other", "marketing": "other",
    "medical_genetics": "other", "miscellaneous": "other", "moral_disputes": "humanities",
    "moral_scenarios": "humanities", "nutrition": "other", "philosophy": "humanities", "prehistory": "humanities",
    "professional_accounting": "other", "professional_law": "humanities", "professional_medicine": "other",
    "professional_psychology": "social_sciences", "public_relations": "social_sciences",
    "security_studies": "social_sciences", "sociology": "social_sciences", "us_foreign_policy": "social_sciences",
    "virology": "other", "world_religions": "humanities",
}


@dataclass(frozen=True)
class Question:
    question: str
    choices: tuple[str, str, str, str]
    answer: int
    """Index of the right choice (0 = A)."""


def read_csv(path: Path) -> list[Question]:
    """One subject's split from the original data: no header, columns question, A, B, C, D, answer letter.
    Read with the csv module, so cells such as `None` or `0.50` stay text (pandas would change them)."""
    with open_text(path, "MMLU file") as f:
        rows = [r for r in csv.reader(f) if r]
    bad = next((i for i, r in enumerate(rows) if len(r) != 6 or r[5].strip() not in LETTERS), None)
    if bad is not None:
        raise UserError(f"{path}, row {bad + 1}: expected 6 columns (question, A, B, C, D, answer letter)")
    return [Question(r[0], (r[1], r[2], r[3], r[4]), LETTERS.index(r[5].strip())) for r in rows]


def load(source: str | Path, split: str, subjects: list[str] | None = None) -> dict[str, list[Question]]:
    """`split` (`dev`, `val`/`validation`, `test`) of each subject: from a folder holding the original
    per-subject CSVs (`<dir>/<split>/<subject>_<split>.csv`), or `hub` for `cais/mmlu` with `datasets`."""
    wanted = subjects or sorted(CATEGORY)
    unknown = [s for s in wanted if s not in CATEGORY]
    if unknown:
        raise UserError(f"unknown MMLU subject(s) {', '.join(unknown)}; the 57 subjects are e.g. "
                        f"{', '.join(sorted(CATEGORY)[:4])}, ... (see `memft eval mmlu --help`)")
    if str(source) == "hub":
        return {s: _from_hub(s, split) for s in wanted}
    folder = Path(source)
    short = "val" if split == "validation" else split
    files = {s: folder / short / f"{s}_{short}.csv" for s in wanted}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if len(missing) == len(files):
        raise UserError(f"no MMLU {split} files under {folder} (expected {folder}/{short}/<subject>_{short}.csv, "
                        "the layout of the original data.tar)")
    if missing and subjects:
        raise UserError(f"missing MMLU files: {', '.join(missing[:3])}")
    return {s: read_csv(p) for s, p in files.items() if p.is_file()}


def _from_hub(subject: str, split: str) -> list[Question]:
    from memft.data.sources import read_hub

    rows = read_hub("cais/mmlu", subject, "validation" if split == "val" else split,
                    local_hint="pass `--data DIR` with the original per-subject CSVs")
    return [Question(r["question"], tuple(r["choices"]), int(r["answer"])) for r in rows]


def describe(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def format_question(q: Question) -> str:
    lines = [q.question.strip(), *(f"{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices))]
    return "\n".join(lines) + "\nAnswer:"


def context(subject: str, exemplars: list[Question], q: Question) -> str:
    """The harness's prompt: description, the exemplars with their answers, then the question."""
    shots = "".join(f"{format_question(e)} {LETTERS[e.answer]}\n\n" for e in exemplars)
    return describe(subject) + shots + format_question(q)


@dataclass
class Result:
    records: list[dict] = field(default_factory=list)
    """One per question: subject, index, gold, pred, the four log-likelihoods."""

    def accuracy(self, keep: Callable[[dict], bool] = lambda r: True) -> tuple[float, int]:
        chosen = [r for r in self.records if keep(r)]
        return (sum(r["pred"] == r["gold"] for r in chosen) / len(chosen) if chosen else float("nan")), len(chosen)

    def summary(self) -> dict:
        """Accuracy per subject, per category and overall (micro: every question weighs the same)."""
        subjects = sorted({r["subject"] for r in self.records})
        return {
            "mmlu": self.accuracy()[0], "questions": len(self.records),
            "categories": {c: {"acc": a, "questions": n} for c in sorted(set(CATEGORY.values()))
                           for a, n in [self.accuracy(lambda r, c=c: CATEGORY[r["subject"]] == c)] if n},
            "subjects": {s: {"acc": a, "questions": n} for s in subjects
                         for a, n in [self.accuracy(lambda r, s=s: r["subject"] == s)]},
        }


def evaluate(model, tokenizer, questions: dict[str, list[Question]], exemplars: dict[str, list[Question]], *,
             shots: int = 5, limit: int | None = None, batch_size: int = 16, max_length: int | None = None,
             progress: Callable[[int], None] | None = None) -> Result:
    """Score `questions` (by subject) with each subject's first `shots` `exemplars`; `limit`: the first N
    questions of each subject."""
    requests, meta = [], []
    for subject, qs in questions.items():
        shown = exemplars.get(subject, [])[:shots]
        if len(shown) < shots:
            raise UserError(f"{subject}: {shots} shots asked for but the few-shot split has {len(shown)} examples")
        for i, q in enumerate(qs[:limit]):
            ctx = context(subject, shown, q)
            requests += [(ctx, f" {letter}") for letter in LETTERS]
            meta.append((subject, i, q.answer))
    scores = loglik.score(model, tokenizer, requests, batch_size=batch_size, max_length=max_length, progress=progress)
    result = Result()
    for k, (subject, i, gold) in enumerate(meta):
        lls = [s.loglikelihood for s in scores[4 * k:4 * k + 4]]
        result.records.append({"subject": subject, "index": i, "gold": gold, "pred": lls.index(max(lls)),
                               "loglikelihoods": lls})
    return result
