"""`memft eval mmlu` versus lm-evaluation-harness, side by side in one process, on the same model and data.

Usage: python benchmarks/eval_speed.py [--model stories260K] [--subjects 8] [--shots 5] [--repeats 2]

All score the first `--subjects` subjects of ../shared/data/mmlu (val split, dev shots) with the same
in-memory model, in turn, `--repeats` times (the best time of each is kept): `memft eval`'s scorer with
and without reusing the shared few-shot prefix, the harness's `HFLM.loglikelihood` on the same requests,
and the harness's whole `simple_evaluate` (its task building included). Model loading is outside all of
them. The per-question predictions are compared too. Results go to benchmarks/results/eval_speed.json.
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
    from memft.models.load import load_model, load_tokenizer
    from memft.recipe import ModelConfig

    cfg = ModelConfig(name=args.model)
    model, tok = load_model(cfg).model.eval(), load_tokenizer(cfg)
    subjects = sorted(mmlu.CATEGORY)[:args.subjects]
    test_eval_mmlu.SUBJECTS = subjects
    questions, exemplars = mmlu.load(DATA, "val", subjects), mmlu.load(DATA, "dev", subjects)
    n = sum(len(v) for v in questions.values())
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from memft.eval import loglik

    requests = [(mmlu.context(s, exemplars[s][:args.shots], q), f" {c}") for s, qs in questions.items() for q in qs
                for c in mmlu.LETTERS]
    instances = [Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)]
    hflm = HFLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size, device="cpu")
    timed = {  # the same requests through each scorer; the harness's full run adds its task machinery
        "memft": lambda: mmlu.evaluate(model, tok, questions, exemplars, shots=args.shots, batch_size=args.batch_size),
        "memft, no prefix reuse": lambda: loglik.score(model, tok, requests, batch_size=args.batch_size,
                                                       reuse_prefix=False),
        "harness HFLM.loglikelihood": lambda: hflm.loglikelihood(instances, disable_tqdm=True),
        "harness simple_evaluate": lambda: test_eval_mmlu.harness_scores(model, tok, DATA, args.shots, limit=None),
    }
    times, outputs = {k: [] for k in timed}, {}
    for _ in range(args.repeats):
        for name, run in timed.items():
            started = time.perf_counter()
            outputs[name] = run()
            times[name].append(time.perf_counter() - started)
    ours, (lls, accs) = outputs["memft"], outputs["harness simple_evaluate"]
    same = all(r["pred"] == lls[r["subject"]][r["index"]].index(max(lls[r["subject"]][r["index"]]))
               for r in ours.records)
    result = {"machine": machine(), "model": args.model, "subjects": subjects, "questions": n, "shots": args.shots,
              "lm_eval": __import__("lm_eval").__version__,
              "batch_size": args.batch_size, "seconds": times, "same_predictions": same,
              "memft_acc": ours.summary()["mmlu"], "harness_acc": {s: accs[s] for s in subjects},
              "torch_threads": torch.get_num_threads()}
    out = ROOT / "benchmarks" / "results" / "eval_speed.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"{n} questions, {args.shots}-shot, {args.model}, same predictions: {same}")
    for name, values in times.items():
        print(f"  {name:28} best {min(values):6.2f} s  {n / min(values):6.1f} questions/s")


if __name__ == "__main__":
    main()
