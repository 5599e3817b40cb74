"""The host AdamW step inside backward, synchronous against overlapped (issue 17): with `train.optimizer_state:
host` and `train.optimizer_in_backward: true`, each parameter's CPU AdamW step either runs in its gradient hook
(backward waits for it) or on `StepInBackward`'s worker thread while backward goes on (the default).

Model: the built-in tiny-llama widened to hidden 768, 6 layers, intermediate 2048, a 32,000-token vocabulary
(81M parameters, untied head), random init (seed 0), in `--dtype` (float32 by default); batches of 2 x 256 random
tokens. One model and one optimizer in this process; the two modes alternate (`--rounds` rounds of `--steps` steps
of each, the order flipped every round), switched by the optimizer's private `overlap_host_step`, so both see the
same machine load: on a shared machine that load drifts within seconds, hence rounds of one step by default. A step
is forward, backward and `optimizer.step()` (which waits for the worker).

Reported for each `--threads` value in turn (the same model): each mode's median step time, the median over rounds
of (synchronous / overlapped) round time, the 1-minute load average (other processes' share of the cores), and
the time spent in the host steps themselves (`HostAdamW._step_on_host`, summed per step: on the worker thread when
overlapped, where it competes with backward for the same cores). The first step warms up and is not counted.
Writes benchmarks/results/host_overlap.json.

Usage:
    python benchmarks/host_overlap.py --threads 2 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "host_overlap.json"
WIDE_LLAMA = {"hidden_size": 768, "num_hidden_layers": 6, "intermediate_size": 2048, "num_attention_heads": 12,
              "num_key_value_heads": 12, "vocab_size": 32000}
BATCH = (2, 256)
MODES = {"synchronous": False, "overlapped": True}  # label: `overlap_host_step`


def build(dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    from memft.recipe import TrainConfig
    from memft.train.optim import build_optimizer

    config = AutoConfig.from_pretrained(ROOT / "configs" / "tiny-llama.json", **WIDE_LLAMA)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    cfg = TrainConfig(lr=1e-4, max_grad_norm=None, optimizer_state="host", optimizer_in_backward=True)
    return model, build_optimizer([{"params": list(model.parameters())}], cfg, torch.device("cpu"))


def time_host_steps() -> list[float]:
    """Wrap `HostAdamW._step_on_host` to add each call's seconds to the returned one-element list."""
    from memft.train.optim import HostAdamW

    spent, inner = [0.0], HostAdamW._step_on_host

    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(self, *args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - start

    HostAdamW._step_on_host = timed
    return spent


def one_step(model, optimizer, ids: torch.Tensor) -> None:
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()  # waits for the worker's host steps


def compare(model, optimizer, ids: torch.Tensor, spent: list[float], rounds: int, steps: int) -> dict:
    """Both modes, alternating; each mode's step times and host-step times, and the per-round ratios."""
    one_step(model, optimizer, ids)  # warm-up: allocations, the moments' first touch, the worker thread
    times, host, ratios = {m: [] for m in MODES}, {m: [] for m in MODES}, []
    for r in range(rounds):
        took = {}
        for mode in (list(MODES) if r % 2 == 0 else list(MODES)[::-1]):
            optimizer.overlap_host_step = MODES[mode]
            start = time.perf_counter()
            for _ in range(steps):
                spent[0], begun = 0.0, time.perf_counter()
                one_step(model, optimizer, ids)
                times[mode].append(time.perf_counter() - begun)
                host[mode].append(spent[0])
            took[mode] = time.perf_counter() - start
        ratios.append(took["synchronous"] / took["overlapped"])
        print(f"  round {r}: " + ", ".join(f"{m} {t / steps:.2f} s/step" for m, t in took.items())
              + f", ratio {ratios[-1]:.3f}", flush=True)
    out = {m: {"step_time_s": statistics.median(times[m]), "step_times_s": times[m],
               "host_step_s": statistics.median(host[m]), "host_steps_s": host[m]} for m in MODES}
    return {**out, "round_ratios": ratios, "sync_over_overlapped": statistics.median(ratios)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()],
                    help="torch.set_num_threads for each comparison in turn (default: torch's)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=1, help="steps per mode per round")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    model, optimizer = build(getattr(torch, args.dtype))
    params = sum(p.numel() for p in model.parameters())
    spent = time_host_steps()
    ids = torch.randint(0, WIDE_LLAMA["vocab_size"], BATCH, generator=torch.Generator().manual_seed(1))
    results = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"{params / 1e6:.1f}M parameters, {args.dtype}, {threads} threads", flush=True)
        load = os.getloadavg()[0]
        res = compare(model, optimizer, ids, spent, args.rounds, args.steps)
        results[str(threads)] = {**res, "load_average_1min": [load, os.getloadavg()[0]]}
        for m in MODES:
            print(f"  {m:12} step {res[m]['step_time_s']:.2f} s (host AdamW {res[m]['host_step_s']:.2f} s of it"
                  f"{', on the worker' if MODES[m] else ''})")
        print(f"  synchronous / overlapped: {res['sync_over_overlapped']:.3f} (median of {args.rounds} rounds; "
              f"1-minute load average {load:.1f} before)", flush=True)
    if not args.no_write:
        OUT.write_text(json.dumps({
            "date": datetime.date.today().isoformat(),
            "command": "python benchmarks/host_overlap.py " + " ".join(sys.argv[1:]),
            "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                        "torch": torch.__version__},
            "model": {**WIDE_LLAMA, "params": params, "dtype": args.dtype}, "batch": list(BATCH),
            "steps_per_round": args.steps, "by_threads": results}, indent=2))
        print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
