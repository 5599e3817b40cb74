"""Full fine-tuning's whole memory budget on the CPU (issue 17): `full` as it ran before issue 17 against `full`
with the new settings, on a Llama large enough that the interpreter does not dominate.

Model: the built-in tiny-llama widened to hidden 1024, 16 layers, intermediate 2816, a 32,000-token vocabulary
(221M parameters, untied head), random init, saved once as a bf16 safetensors checkpoint that every variant loads
as a user's hub checkpoint (float32 variants upcast it while loading); batches of 4 x 512 packed tokens of
`recipes/bench_moe.yaml`'s data. Each variant runs in its own process (so its peak RSS is its own) for `--steps`
optimizer steps, with `MALLOC_MMAP_THRESHOLD_=65536`: glibc then maps every large block and unmaps it when freed,
so RSS follows what is alive (with its default, growing threshold a freed block stays counted):

- `before` (`--before TREE`: a checkout of the commit before issue 17, e.g. `git worktree add /tmp/before
  7e971a8`): float32 weights, AdamW, the full float32 logits loss, as `memft train` ran then;
- `full`: the same recipe on this tree (the chunked loss and the fused CPU AdamW are now the defaults);
- `full, bf16 + stochastic rounding + step in backward`: `model.dtype=bfloat16`, `train.precision=
  bf16_stochastic_rounding`, `train.optimizer_in_backward=true` (clipping off, as it requires);
- the same with `train.gradient_checkpointing=true`.

(`train.optimizer_state: host` is not among them: on the CPU the host is the same memory, where its float32 masters
only add bytes.)

Reported per variant: peak RSS of the process (`ru_maxrss`) and above the process after imports (the run's own
share), activation bytes (what autograd saved in one step, `summary.json`), and the median step time. Targets:
peak at most 0.35x of `before`, step time at most 1.15x. Writes benchmarks/results/full_budget.json.

Usage:
    git worktree add /tmp/before 7e971a8
    python benchmarks/full_budget.py --threads 2 --before /tmp/before
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "full_budget.json"
WIDE_LLAMA = {"hidden_size": 1024, "num_hidden_layers": 16, "intermediate_size": 2816, "num_attention_heads": 16,
              "num_key_value_heads": 16, "vocab_size": 32000}
COMMON = ["model.tokenizer=stories260K", "strategies=[{name: full}]", "data.max_length=512", "train.batch_size=4",
          "data.eval_split=null", "log.progress=false",
          "output.plot=false", "output.checkpoints=false", "train.warmup_steps=0", "train.lr=1e-4"]
NEW = ["model.dtype=bfloat16", "train.precision=bf16_stochastic_rounding", "train.optimizer_in_backward=true",
       "train.max_grad_norm=null"]
VARIANTS = {  # label: (tree, overrides)
    "before": ("before", []),
    "full": ("here", []),
    "full, bf16 + stochastic rounding + step in backward": ("here", NEW),
    "the same + gradient checkpointing": ("here", [*NEW, "train.gradient_checkpointing=true"]),
}


def write_checkpoint(directory: Path) -> None:
    """The wide Llama, random init (seed 0), as a bf16 safetensors checkpoint in `directory`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(ROOT / "configs" / "tiny-llama.json", **WIDE_LLAMA)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(directory)


def child(overrides: list[str], steps: int, threads: int | None) -> dict:
    """One variant in this process: train `steps` steps and read back the meters."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    import memft
    from memft.recipe import load
    from memft.train.loop import Trainer

    rss_kib = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # noqa: E731 - KiB on Linux
    baseline = rss_kib()
    with tempfile.TemporaryDirectory() as tmp:
        recipe = load(ROOT / "recipes" / "bench_moe.yaml", [*COMMON, f"train.max_steps={steps}", *overrides])
        trainer = Trainer(recipe, run_dir=Path(tmp) / "run").setup()
        summary = trainer.train()
        lines = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    times = [m["step_time_s"] for m in lines if "step_time_s" in m][1:]  # the first step warms up
    return {"peak_rss_bytes": rss_kib() * 1024, "baseline_rss_bytes": baseline * 1024,
            "activation_bytes": summary["activation_bytes"], "step_time_s": statistics.median(times),
            "step_times_s": times, "params": summary["total_params"], "memft": str(Path(memft.__file__).parent),
            "losses": [m["loss"] for m in lines if "loss" in m]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--before", type=Path, default=None, help="a checkout of the commit before issue 17")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(json.loads(args.child), args.steps, args.threads)))
        return
    results = {}
    checkpoint = Path(tempfile.mkdtemp(prefix="memft-full-budget-"))
    write_checkpoint(checkpoint)
    try:
        run_variants(args, checkpoint, results)
    finally:
        shutil.rmtree(checkpoint)
    report(args, results)


def run_variants(args, checkpoint: Path, results: dict) -> None:
    for label, (tree, overrides) in VARIANTS.items():
        if tree == "before" and args.before is None:
            continue
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
        if tree == "before":  # the old memft package first on the path; this script's own code is the same
            env["PYTHONPATH"] = str(args.before.resolve())
        cmd = [sys.executable, __file__, "--child", json.dumps([f"model.name={checkpoint}", *overrides]),
               "--steps", str(args.steps),
               *(["--threads", str(args.threads)] if args.threads else [])]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=args.before if tree == "before"
                              else ROOT)
        if done.returncode:
            raise SystemExit(f"{label}: failed:\n{done.stderr[-3000:]}")
        results[label] = json.loads(done.stdout.strip().splitlines()[-1])
        r = results[label]
        own = (r["peak_rss_bytes"] - r["baseline_rss_bytes"]) / 2**30
        print(f"{label:52} peak RSS {r['peak_rss_bytes'] / 2**30:6.2f} GiB (+{own:5.2f} "
              f"above imports), activations {r['activation_bytes'] / 2**20:8.1f} MiB, step {r['step_time_s']:6.2f} s",
              flush=True)


def report(args, results: dict) -> None:
    ref = results.get("before") or results["full"]
    for r in results.values():
        r["peak_vs_before"] = r["peak_rss_bytes"] / ref["peak_rss_bytes"]
        r["own_peak_vs_before"] = ((r["peak_rss_bytes"] - r["baseline_rss_bytes"])
                                   / (ref["peak_rss_bytes"] - ref["baseline_rss_bytes"]))
        r["step_time_vs_before"] = r["step_time_s"] / ref["step_time_s"]
    for label, r in results.items():
        print(f"{label:52} peak {r['peak_vs_before']:.2f}x ({r['own_peak_vs_before']:.2f}x above imports), "
              f"step time {r['step_time_vs_before']:.2f}x")
    if not args.no_write:
        OUT.write_text(json.dumps({
            "date": datetime.date.today().isoformat(),
            "command": "python benchmarks/full_budget.py " + " ".join(sys.argv[1:]),
            "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
            "model": WIDE_LLAMA, "batch": [4, 512], "results": results}, indent=2))
        print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
