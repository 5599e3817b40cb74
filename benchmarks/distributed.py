"""One process against two ranks on the CPU (issue 19): step time, peak memory and the state each rank stores.

Model: the built-in tiny-llama widened to hidden 768, 6 layers, intermediate 2048, a 32,000-token vocabulary
(91.6M parameters: 6 layers of 7.1M, the embeddings and the untied head 24.6M each), float32, full fine-tuning
with AdamW; the quickstart's GSM8K sample at up to 256 tokens, a global micro-batch of 4 rows (one process: 4 rows;
two ranks: 2 rows each, the same rows), `--steps` steps.
Each configuration is one `memft train` command, run one after the other on the same machine:

- `1 process`: `memft train ...` (all the cores);
- `2 ranks, fsdp` / `2 ranks, ddp`: `memft train ... --nproc 2` (each rank half the cores).

Reported from each run's summary.json: the median step time (the first step left out) and tokens/s of the job, and
per rank its peak RSS and what it stores itself of the weights and the AdamW moments (its shards' bytes). On two
cores the ranks share the machine, so the step time shows the cost of the collectives and of splitting the cores,
not a speed-up; the stored bytes show what sharding saves (FSDP: about half each).
Writes benchmarks/results/distributed.json.

`--loading` measures instead what building the model costs each rank's host memory, with and without
`distributed.load_on_rank0`, on a larger Llama (hidden 1024, 24 layers, intermediate 2816: 373M parameters, 1.49 GB
in float32): each rank's peak RSS once `Trainer.setup()` has loaded (or received) and sharded the model, before any
step. Writes benchmarks/results/distributed_loading.json.

On one GPU, where N ranks cannot show scaling, `--device cuda --configs "1 process" "1 rank, fsdp"` measures what
FSDP itself costs at world size 1 against the plain loop, side by side (add "1 rank, fsdp, bf16 gathers" for
`distributed.param_dtype: bfloat16`; on a CPU without bf16 matmul kernels that one is ~20x slower, so measure it on
the GPU only). Other devices or configurations write benchmarks/results/distributed_<device>.json.

Usage:
    python benchmarks/distributed.py --steps 6
    python benchmarks/distributed.py --loading
    python benchmarks/distributed.py --device cuda --large --configs "1 process" "1 rank, fsdp"
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "distributed.json"
WIDE_LLAMA = ("{hidden_size: 768, num_hidden_layers: 6, intermediate_size: 2048, num_attention_heads: 12, "
              "num_key_value_heads: 12, vocab_size: 32000}")
CONFIGS = {"1 process": (1, None), "2 ranks, fsdp": (2, "fsdp"), "2 ranks, ddp": (2, "ddp"), "1 rank, fsdp": (1, "fsdp"),
           "1 rank, fsdp, bf16 gathers": (1, "fsdp-bf16")}
DEFAULT_CONFIGS = ["1 process", "2 ranks, fsdp", "2 ranks, ddp"]
LARGE_LLAMA = ("{hidden_size: 1024, num_hidden_layers: 24, intermediate_size: 2816, num_attention_heads: 16, "
               "num_key_value_heads: 16, vocab_size: 32000}")
LOADING_OUT = ROOT / "benchmarks" / "results" / "distributed_loading.json"


def run(name: str, steps: int, work: Path, device: str = "cpu", model: str = WIDE_LLAMA) -> dict:
    ranks, mode = CONFIGS[name]
    run_dir = work / name.replace(" ", "_").replace(",", "")
    args = [sys.executable, "-m", "memft", "train", str(ROOT / "recipes" / "quickstart.yaml"),
            "model.name=tiny-llama", f"model.config_overrides={model}", f"model.device={device}",
            "data.max_length=256", f"train.batch_size={4 // ranks}", f"train.max_steps={steps}",
            "train.eval_every=null", "output.checkpoints=false", "output.plot=false", "log.progress=false",
            f"output.dir={run_dir}"]
    if mode is not None:  # under torchrun, even with one rank
        args += [f"distributed.mode={mode.removesuffix('-bf16')}", "--nproc", str(ranks)]
        args += ["distributed.param_dtype=bfloat16"] if mode.endswith("-bf16") else []
    subprocess.run(args, check=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                   stdout=subprocess.DEVNULL)
    summary = json.loads((run_dir / "summary.json").read_text())
    row = {"config": name, "step_time_s": summary["step_time_s"], "tokens_per_s": summary["tokens_per_s"],
           "total_params": summary["total_params"]}
    if mode is None:
        row["ranks"] = [{"rank": 0, "peak_mem_bytes": summary["peak_mem_bytes"]}]
    else:
        row["ranks"] = summary["ranks"]
    return row


def setup_rank(rank0: str, out: Path) -> None:
    """One rank of the `--loading` job: build (or receive) and shard the model, then write this rank's peak RSS."""
    import resource

    from memft import recipe as recipe_mod
    from memft.train.loop import Trainer

    overrides = ["model.name=tiny-llama", f"model.config_overrides={LARGE_LLAMA}", "model.device=cpu",
                 "train.batch_size=1", f"distributed.load_on_rank0={rank0}", f"output.dir={out / 'run'}"]
    trainer = Trainer(recipe_mod.load(str(ROOT / "recipes" / "quickstart.yaml"), overrides))
    trainer.setup(for_training=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    (out / f"rank-{os.environ['RANK']}.json").write_text(json.dumps({"peak_rss_bytes": peak}))


def loading() -> None:
    rows = []
    for rank0 in ("true", "false"):
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            __file__, "--setup-rank", rank0, tmp], check=True, cwd=ROOT,
                           env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
                           stdout=subprocess.DEVNULL)
            peaks = [json.loads((Path(tmp) / f"rank-{r}.json").read_text())["peak_rss_bytes"] for r in (0, 1)]
        rows.append({"load_on_rank0": rank0 == "true", "peak_rss_bytes": peaks})
        print(f"load_on_rank0={rank0}: peak RSS after setup", [f"{p / 2**20:.0f} MiB" for p in peaks])
    LOADING_OUT.write_text(json.dumps({"date": datetime.date.today().isoformat(), "machine":
                                       f"{platform.machine()}, {os.cpu_count()} cores", "ranks": 2,
                                       "model": LARGE_LLAMA, "rows": rows}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--loading", action="store_true", help="measure the host memory of loading instead")
    parser.add_argument("--device", default="cpu", help="`model.device` of every run (cuda: one GPU per rank)")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=DEFAULT_CONFIGS)
    parser.add_argument("--large", action="store_true", help="the 373M-parameter Llama of `--loading` instead")
    parser.add_argument("--setup-rank", nargs=2, metavar=("LOAD_ON_RANK0", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.setup_rank:
        return setup_rank(args.setup_rank[0], Path(args.setup_rank[1]))
    if args.loading:
        return loading()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(name, args.steps, Path(tmp), args.device, LARGE_LLAMA if args.large else WIDE_LLAMA)
                for name in args.configs]
    result = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "load_1min": os.getloadavg()[0], "steps": args.steps, "rows": rows}
    default = args.device == "cpu" and args.configs == DEFAULT_CONFIGS and not args.large
    result["device"] = args.device
    (OUT if default else OUT.with_name(f"distributed_{args.device}.json")).write_text(json.dumps(result, indent=1))
    for row in rows:
        print(row["config"], f"{row['step_time_s']:.2f} s/step", f"{row['tokens_per_s']:.0f} tok/s",
              [(r["rank"], round(r["peak_mem_bytes"] / 2**20), round(r.get("weight_bytes", 0) / 2**20),
                round(r.get("optimizer_state_bytes", 0) / 2**20)) for r in row["ranks"]])


if __name__ == "__main__":
    main()
