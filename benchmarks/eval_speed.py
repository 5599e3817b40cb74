"""`memft eval mmlu` versus lm-evaluation-harness, side by side in one process, on the same model and data.

Usage: python benchmarks/eval_speed.py [--model stories260K] [--subjects 8] [--shots 5] [--repeats 2]

Both score the first `--subjects` subjects of ../shared/data/mmlu (val split, dev shots) with the same
in-memory model; the runs alternate (memft, harness, memft, harness, ...) and the best of each is kept.
Setup (imports, model loading, the harness's task building) is outside the timed part of both. The
per-question predictions are compared too. Results go to benchmarks/results/eval_speed.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from lcsb import machine

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "mmlu"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="stories260K")
    ap.add_argument("--subjects", type=int, default=8)
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    import sys

    sys.path.insert(0, str(ROOT / "tests"))  # the harness, fed the same CSVs: tests/test_eval_mmlu.py
    import test_eval_mmlu

    from memft.eval import mmlu
    from memft.models import load_model, load_tokenizer
    from memft.recipe import ModelConfig

    cfg = ModelConfig(name=args.model)
    model, tok = load_model(cfg).model.eval(), load_tokenizer(cfg)
    subjects = sorted(mmlu.CATEGORY)[:args.subjects]
    test_eval_mmlu.SUBJECTS = subjects
    questions, exemplars = mmlu.load(DATA, "val", subjects), mmlu.load(DATA, "dev", subjects)
    n = sum(len(v) for v in questions.values())
    times = {"memft": [], "harness": []}
    for _ in range(args.repeats):
        started = time.perf_counter()
        ours = mmlu.evaluate(model, tok, questions, exemplars, shots=args.shots, batch_size=args.batch_size)
        times["memft"].append(time.perf_counter() - started)
        started = time.perf_counter()
        lls, accs = test_eval_mmlu.harness_scores(model, tok, DATA, args.shots, limit=None)
        times["harness"].append(time.perf_counter() - started)
    same = all(r["pred"] == lls[r["subject"]][r["index"]].index(max(lls[r["subject"]][r["index"]]))
               for r in ours.records)
    result = {"machine": machine(), "model": args.model, "subjects": subjects, "questions": n, "shots": args.shots,
              "batch_size": args.batch_size, "seconds": times, "same_predictions": same,
              "memft_acc": ours.summary()["mmlu"], "harness_acc": {s: accs[s] for s in subjects},
              "torch_threads": torch.get_num_threads()}
    out = ROOT / "benchmarks" / "results" / "eval_speed.json"
    out.write_text(json.dumps(result, indent=2))
    best = {k: min(v) for k, v in times.items()}
    print(f"{n} questions, {args.shots}-shot, {args.model}: memft {best['memft']:.1f} s ({n / best['memft']:.1f} q/s), "
          f"harness {best['harness']:.1f} s ({n / best['harness']:.1f} q/s, setup of its tasks included); "
          f"same predictions: {same}")


if __name__ == "__main__":
    main()
