"""TokenTune measurements for docs/strategies/tokentune.md.

1. Activation bytes, peak memory and step time versus the selected fraction (0.1, 0.25, 0.5, 1.0)
   on a 512-token batch of the tiny MoE (`recipes/bench_moe.yaml`), side by side with full fine-tuning.
2. Quality on real data (needs ../shared/data): MiniLM-L6 on SST-2, dev accuracy of full FT,
   TokenTune (16 tokens), LoRA and TokenTune + LoRA at the same number of steps.

Usage: python benchmarks/tokentune.py [--part memory|timing|quality|all] [--steps N] [--quality-steps N]
(`timing` runs the variants interleaved in one process; run it with OMP_NUM_THREADS=1 on a shared machine.)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from memft.bench import run_bench, to_markdown

ROOT = Path(__file__).resolve().parents[1]
FRACTIONS = (0.1, 0.25, 0.5, 1.0)
LORA_LR = "train.lr=5e-4"  # adapters want a larger step than full fine-tuning's 5e-5


def memory(steps: int) -> list[dict]:
    variants = ";".join(["full"] + [f"full,tokentune,strategies.1.params.fraction={f}" for f in FRACTIONS])
    return run_bench(str(ROOT / "recipes" / "bench_moe.yaml"), variants, steps=steps, log=print)


def plot(memory_results: list[dict], timing: dict[str, float], out: Path) -> None:
    """Activation bytes (from `memft bench`) and interleaved step time, as ratios to full fine-tuning."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    full = memory_results[0]["activation_bytes"]
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    ax.plot(FRACTIONS, [r["activation_bytes"] / full for r in memory_results[1:]], marker="o",
            label="activation bytes")
    ax.plot(FRACTIONS, [timing[f"tokentune {f}"] / timing["full"] for f in FRACTIONS], marker="o",
            label="forward + backward time")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("selected fraction of tokens")
    ax.set_ylabel("ratio to full fine-tuning")
    ax.set_title("TokenTune on tiny-mixtral, 4 x 512 tokens")
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)


def interleaved_step_times(rounds: int = 12) -> dict[str, float]:
    """Median step time of each variant, the variants taking turns step by step in one process, so a
    busy machine slows them all alike (a fairer ratio than runs one after another)."""
    import statistics
    import time

    from memft.recipe import load
    from memft.train.loop import Trainer

    variants = {"full": "[{name: full}]"} | {
        f"tokentune {f}": f"[{{name: full}}, {{name: tokentune, params: {{fraction: {f}}}}}]" for f in FRACTIONS}
    trainers = {}
    for label, strategies in variants.items():
        r = load(ROOT / "recipes" / "bench_moe.yaml", [f"strategies={strategies}", "data.eval_split=null"])
        trainers[label] = Trainer(r, run_dir="unused").setup(for_training=False)
    batch = next(iter(trainers.values())).batcher.batch(0, 0)
    times: dict[str, list[float]] = {label: [] for label in trainers}
    for step in range(rounds):
        for label, t in trainers.items():
            b = dict(batch)
            for strategy in t.strategies:
                b = strategy.on_step_start(step, b)
            start = time.perf_counter()
            out = t._loss(b)
            (out.loss_sum / t._count_targets(b)).backward()
            t.model.zero_grad(set_to_none=True)
            times[label].append(time.perf_counter() - start)
    # the first rounds warm up kernels and allocators
    return {label: statistics.median(ts[2:]) for label, ts in times.items()}


def quality(steps: int) -> list[dict]:
    tt = "tokentune,strategies.1.params.tokens=16"
    variants = f"full;full,{tt};lora,{LORA_LR};lora,{tt},{LORA_LR}"
    return run_bench(str(ROOT / "benchmarks" / "recipes" / "minilm_sst2.yaml"), variants, steps=steps,
                     evaluate=True, log=print)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["memory", "timing", "quality", "all"], default="all")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--quality-steps", type=int, default=300)
    args = ap.parse_args()
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    if args.part in ("memory", "all"):
        results = memory(args.steps)
        (out / "tokentune_memory.json").write_text(json.dumps(results, indent=2))
        print(to_markdown(results))
    if args.part in ("timing", "all"):
        medians = interleaved_step_times()
        (out / "tokentune_timing.json").write_text(json.dumps(medians, indent=2))
        for label, seconds in medians.items():
            print(f"| {label} | {seconds * 1000:.0f} ms | {seconds / medians['full']:.2f}x |")
    if (out / "tokentune_memory.json").exists() and (out / "tokentune_timing.json").exists():
        plot(json.loads((out / "tokentune_memory.json").read_text()),
             json.loads((out / "tokentune_timing.json").read_text()), ROOT / "docs" / "img" / "tokentune_fraction.png")
    if args.part in ("quality", "all"):
        results = quality(args.quality_steps)
        (out / "tokentune_quality.json").write_text(json.dumps(results, indent=2))
        print(to_markdown(results))


if __name__ == "__main__":
    main()
