"""bf16 weights against float32 training on the pretrained stories260K (issue 17): the loss curves, same steps.

Three runs of `recipes/quickstart.yaml` (full fine-tuning), the same data, seed and schedule:

- `float32`: float32 weights, torch's AdamW;
- `bf16`: bf16 weights and moments, torch's AdamW (round to nearest: updates under half a bf16 step are lost);
- `bf16_stochastic_rounding`: bf16 weights and moments, `train.precision: bf16_stochastic_rounding`.

Reported: each run's train loss, the mean of its last `--tail` steps relative to float32's, the largest
relative gap at any step (after smoothing over `--tail` steps), and the held-out loss at the end. Target: within
2% of float32. Writes benchmarks/results/precision.json.

Usage:
    python benchmarks/precision.py --threads 1            # 150 steps each (~4 min on 2 cores)
    python benchmarks/precision.py --steps 300 --no-write
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import tempfile
from pathlib import Path

import torch

from memft.recipe import load
from memft.train.loop import Trainer

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "precision.json"
RUNS = {
    "float32": [],
    "bf16": ["model.dtype=bfloat16"],
    "bf16_stochastic_rounding": ["model.dtype=bfloat16", "train.precision=bf16_stochastic_rounding"],
}


def train(overrides: list[str], run_dir: Path) -> tuple[list[float], float]:
    trainer = Trainer(load(ROOT / "recipes" / "quickstart.yaml", overrides), run_dir=run_dir).setup()
    summary = trainer.train()
    lines = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [m["loss"] for m in lines if "loss" in m], summary["eval_loss"]


def smooth(xs: list[float], n: int) -> list[float]:
    return [statistics.fmean(xs[max(0, i - n + 1):i + 1]) for i in range(len(xs))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--tail", type=int, default=10, help="steps averaged at the end and for smoothing")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    common = ["data.max_samples=400", "data.max_length=256", "train.batch_size=8", "log.progress=false",
              "output.plot=false", "data.eval_split=0.1", "train.eval_batches=4", "train.eval_every=null",
              f"train.max_steps={args.steps}", "train.lr=3e-3", "train.warmup_steps=0", "output.checkpoints=false"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in RUNS.items():
            losses, eval_loss = train([*common, *extra], Path(tmp) / name)
            results[name] = {"losses": losses, "eval_loss": eval_loss}
    reference = results["float32"]
    ref_smooth = smooth(reference["losses"], args.tail)
    for name, r in results.items():
        tail = statistics.fmean(r["losses"][-args.tail:]) / statistics.fmean(reference["losses"][-args.tail:]) - 1
        gaps = [abs(a / b - 1) for a, b in zip(smooth(r["losses"], args.tail), ref_smooth)]
        r |= {"tail_vs_float32": tail, "max_smoothed_gap": max(gaps),
              "eval_vs_float32": r["eval_loss"] / reference["eval_loss"] - 1}
        print(f"{name:26} last {args.tail} steps {tail:+.2%} vs float32, largest smoothed gap {max(gaps):.2%}, "
              f"held-out loss {r['eval_loss']:.4f} ({r['eval_vs_float32']:+.2%})", flush=True)
    if not args.no_write:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps({
            "date": datetime.date.today().isoformat(), "command": "python benchmarks/precision.py " +
            " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (None, False)),
            "machine": {"platform": platform.platform(), "torch": torch.__version__,
                        "threads": torch.get_num_threads()},
            "steps": args.steps, "tail": args.tail, "results": results}, indent=2))
        print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
