"""Full fine-tuning's predicted peak for every shipped causal-LM config, before issue 17 and now (`memft profile`).

For each config in configs/hub (BERT-large is an encoder: left out), at 1 x 2,048 tokens on CUDA, with gradient
checkpointing (the best activation setting of both trees; RevFFN's MoE rows are in docs/strategies/full.md):

- `before`: the float32 quickstart recipe in a checkout of the commit before issue 17 (`--before TREE`, e.g.
  `git worktree add /tmp/before 7e971a8`), and that tree's best: bf16 weights + 8-bit AdamW;
- `now`: the same float32 recipe on this tree (the chunked loss is the default), and the new best: bf16 weights,
  float32 masters and AdamW moments in host memory, the step inside backward (`optimizer_state: host`,
  `optimizer_in_backward`; clipping off, as it requires).

Writes benchmarks/results/full_budget_configs.json and prints a markdown table for docs/strategies/full.md.

Usage:
    git worktree add /tmp/before 7e971a8
    python benchmarks/full_budget_configs.py --before /tmp/before
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "full_budget_configs.json"
MODELS = ["meta-llama/Meta-Llama-3-8B", "Qwen/Qwen2.5-7B", "mistralai/Mistral-7B-v0.1", "allenai/OLMoE-1B-7B-0924",
          "Qwen/Qwen1.5-MoE-A2.7B", "deepseek-ai/deepseek-moe-16b-base", "Qwen/Qwen3-30B-A3B",
          "mistralai/Mixtral-8x7B-v0.1"]
COMMON = ["data.max_length=2048", "train.batch_size=1", "train.gradient_checkpointing=true"]
VARIANTS = {  # label: (tree, overrides)
    "before, float32": ("before", []),
    "before, bf16 + 8-bit AdamW": ("before", ["model.dtype=bfloat16", "train.optimizer=adamw_8bit"]),
    "now, float32": ("here", []),
    "now, bf16 + host state + step in backward": ("here", ["model.dtype=bfloat16", "train.optimizer_state=host",
                                                           "train.optimizer_in_backward=true",
                                                           "train.max_grad_norm=null"]),
}


def predicted(tree: Path, model: str, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "p.json"
        cmd = [sys.executable, "-m", "memft.cli", "profile", str(tree / "recipes" / "quickstart.yaml"),
               f"model.name={model}", *COMMON, *overrides, "--device", "cuda", "--json", str(out)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(tree)}
        run = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
        if run.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{run.stderr[-2000:]}")
        p = json.loads(out.read_text())
        return {"peak": p["peak"], "host": sum((p.get("host") or {}).values())}


def gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=Path, required=True, help="a checkout of the commit before issue 17")
    args = ap.parse_args()
    trees = {"before": args.before.resolve(), "here": ROOT}
    rows = {}
    for model in MODELS:
        rows[model] = {label: predicted(trees[tree], model, o) for label, (tree, o) in VARIANTS.items()}
        print(model, {k: gib(v["peak"]) for k, v in rows[model].items()}, flush=True)
    OUT.write_text(json.dumps({"date": datetime.date.today().isoformat(), "common": COMMON,
                               "variants": {k: list(v) for k, v in VARIANTS.items()}, "rows": rows}, indent=1))
    print("\n| model | " + " | ".join(VARIANTS) + " | host memory (now, best) |")
    print("|---|" + "---|" * (len(VARIANTS) + 1))
    for model, r in rows.items():
        best = r["now, bf16 + host state + step in backward"]
        peaks = " | ".join(gib(v["peak"]) for v in r.values())
        print(f"| {model.split('/')[-1]} | {peaks} | {gib(best['host'])} |")


if __name__ == "__main__":
    main()
