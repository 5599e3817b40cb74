"""MEFT measurements for docs/strategies/meft.md (work in progress: memory and traffic so far).

Usage:
    python benchmarks/meft.py memory    # device-resident adapter bytes and bytes moved per step versus M and n_probe
    python benchmarks/meft.py quality   # held-out loss, device bytes and step time: LoRA, MEFT, dense adapter

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


def quality(steps: int) -> dict:
    """Held-out loss after `steps` steps on the GSM8K sample, with each variant's device-resident training
    state (LoRA / full: weights that train + grads + 2 AdamW moments, 16 bytes per fp32 parameter; MEFT: its
    `meft_device_bytes` peak) and median step time (variants run one after another)."""
    from memft.recipe import load
    from memft.train.loop import Trainer

    variants = {
        "lora r=16": "[{name: lora, params: {r: 16, alpha: 32}}]",
        "meft M=4096 (64x64, probe 4, top-32)": "[{name: meft, params: {width: 4096, experts: 64, n_probe: 4}}]",
        "meft M=1024 (64x16, probe 2, top-16)": "[{name: meft, params: {width: 1024, experts: 64, n_probe: 2, "
                                                "topk: 16}}]",
        "dense adapter M=4096": "[{name: meft, params: {width: 4096, experts: 64, mode: dense}}]",
    }
    out = {}
    for name, strategies in variants.items():
        run_dir = Path(tempfile.mkdtemp(prefix="meft-quality-"))
        r = load(ROOT / "recipes" / "meft.yaml", [f"strategies={strategies}", "log.progress=false", "output.plot=false",
                                                  "output.checkpoints=false", f"train.max_steps={steps}",
                                                  f"train.eval_every={steps}", "log.every=1"]
                 + (["train.lr=5e-3"] if "lora" in name else []))
        t = Trainer(r, run_dir=run_dir).setup()
        summary = t.train()
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        device = max((m.get("meft_device_bytes", 0) for m in lines), default=0) or 16 * summary["trainable_params"]
        out[name] = {"eval_loss_start": lines[0]["eval_loss"], "eval_loss": summary["eval_loss"],
                     "device_training_bytes": device, "step_time_s": summary["step_time_s"],
                     "trainable_params_on_device": summary["trainable_params"]}
        print(name, out[name])
    return {"steps": steps, "quality": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["memory", "quality"])
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    if args.part == "quality":
        RESULTS.mkdir(parents=True, exist_ok=True)
        result = {"machine": machine(), **quality(args.steps)}
        (RESULTS / "meft_quality.json").write_text(json.dumps(result, indent=2))
        return
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
