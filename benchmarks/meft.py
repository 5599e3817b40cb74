"""MEFT measurements for docs/strategies/meft.md (work in progress: memory and traffic so far).

Usage:
    python benchmarks/meft.py memory    # device-resident adapter bytes and bytes moved per step versus M and n_probe

Runs one training step per configuration on stories260K (5 layers, d = 64) with one batch of the GSM8K
sample, and reads the strategy's meters (`meft_device_bytes`, `meft_bytes_to_device`,
`meft_bytes_to_host`, `meft_rows_touched`). Writes benchmarks/results/meft_memory.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from lcsb import _step, machine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def one_step(width: int, experts: int, n_probe: int, topk: int = 32) -> dict:
    from memft.recipe import load
    from memft.train.loop import Trainer

    params = f"{{width: {width}, experts: {experts}, n_probe: {n_probe}, topk: {topk}}}"
    r = load(ROOT / "recipes" / "meft.yaml", [f"strategies=[{{name: meft, params: {params}}}]", "log.progress=false",
                                              "output.checkpoints=false", "output.plot=false", "data.eval_split=null"])
    t = Trainer(r, run_dir=tempfile.mkdtemp(prefix="meft-bench-")).setup()
    batch = t.batcher.batch(0, 0)
    row = _step(t, 0, batch)
    s = t.strategies[-1]
    s.after_optimizer_step(0)
    meters = s.metrics()
    host = sum(v.numel() * v.element_size() for h in s.hosts for v in h.params.values())
    return {"width": width, "experts": experts, "block": width // experts, "n_probe": n_probe, "topk": topk,
            "tokens": int(batch["attention_mask"].sum()), "host_adapter_bytes": host, **meters,
            "step_s": row["step_s"]}


def memory() -> dict:
    by_width = [one_step(w, w // 64, 4) for w in (4096, 8192, 16384, 32768, 65536)]   # 64 keys per expert
    by_probe = [one_step(4096, 64, p) for p in (1, 2, 4, 8, 16, 64)]                     # n_probe / E
    return {"by_width_block_64": by_width, "by_n_probe_of_64": by_probe}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["memory"])
    ap.parse_args()
    result = {"machine": machine(), **memory()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "meft_memory.json").write_text(json.dumps(result, indent=2))
    for key in ("by_width_block_64", "by_n_probe_of_64"):
        print(key)
        for r in result[key]:
            print(f"  M={r['width']:>6} E={r['experts']:>5} n_probe={r['n_probe']:>3}: host {r['host_adapter_bytes'] / 2**20:8.1f}"
                  f" MiB, device {r['meft_device_bytes'] / 2**20:6.2f} MiB, to device "
                  f"{r['meft_bytes_to_device'] / 2**20:6.2f} MiB, to host {r['meft_bytes_to_host'] / 2**20:6.2f} MiB,"
                  f" rows {r['meft_rows_touched']:>7}, step {r['step_s']:.2f} s")


if __name__ == "__main__":
    main()
