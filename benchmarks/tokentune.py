"""TokenTune measurements for docs/strategies/tokentune.md.

1. Activation bytes, peak memory and step time versus the selected fraction (0.1, 0.25, 0.5, 1.0)
   on a 512-token batch of the tiny MoE (`recipes/bench_moe.yaml`), side by side with full fine-tuning.
2. Quality on real data (needs ../shared/data): MiniLM-L6 on SST-2, dev accuracy of full FT,
   TokenTune (16 tokens), LoRA and TokenTune + LoRA at the same number of steps.

Usage: python benchmarks/tokentune.py [--part memory|quality|all] [--steps N] [--quality-steps N]
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
    results = run_bench(str(ROOT / "recipes" / "bench_moe.yaml"), variants, steps=steps, log=print)
    plot(results, ROOT / "docs" / "img" / "tokentune_fraction.png")
    return results


def plot(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    full = results[0]
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    for key, label in (("activation_bytes", "activation bytes"), ("step_time_s", "step time")):
        ax.plot(FRACTIONS, [r[key] / full[key] for r in results[1:]], marker="o", label=label)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("selected fraction of tokens")
    ax.set_ylabel("ratio to full fine-tuning")
    ax.set_title("TokenTune on tiny-mixtral, 4 x 512 tokens")
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)


def quality(steps: int) -> list[dict]:
    tt = "tokentune,strategies.1.params.tokens=16"
    variants = f"full;full,{tt};lora,{LORA_LR};lora,{tt},{LORA_LR}"
    return run_bench(str(ROOT / "benchmarks" / "recipes" / "minilm_sst2.yaml"), variants, steps=steps,
                     evaluate=True, log=print)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["memory", "quality", "all"], default="all")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--quality-steps", type=int, default=300)
    args = ap.parse_args()
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    if args.part in ("memory", "all"):
        results = memory(args.steps)
        (out / "tokentune_memory.json").write_text(json.dumps(results, indent=2))
        print(to_markdown(results))
    if args.part in ("quality", "all"):
        results = quality(args.quality_steps)
        (out / "tokentune_quality.json").write_text(json.dumps(results, indent=2))
        print(to_markdown(results))


if __name__ == "__main__":
    main()
