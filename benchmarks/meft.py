"""MEFT measurements for docs/strategies/meft.md.

Usage:
    python benchmarks/meft.py memory    # device-resident adapter bytes and bytes moved per step versus M and n_probe
    python benchmarks/meft.py quality   # held-out loss, device bytes and step time: LoRA, MEFT, dense adapter
    python benchmarks/meft.py speed     # step time of LoRA vs MEFT at equal device memory, interleaved

`memory` runs one training step per configuration on stories260K (5 layers, d = 64) with one batch of
the GSM8K sample and reads the strategy's meters (`meft_device_bytes`, `meft_bytes_to_device`,
`meft_bytes_to_host`, `meft_rows_touched`), without and with a `device_rows` cap. Results go to
benchmarks/results/meft_<part>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from lcsb import _step, machine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def one_step(width: int, experts: int, n_probe: int, topk: int = 32, device_rows: int | None = None) -> dict:
    from memft.recipe import load
    from memft.train.loop import Trainer

    cap = "" if device_rows is None else f", device_rows: {device_rows}"
    params = f"{{width: {width}, experts: {experts}, n_probe: {n_probe}, topk: {topk}{cap}}}"
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
            "device_rows": device_rows, "tokens": int(batch["attention_mask"].sum()), "host_adapter_bytes": host, **meters,
            "step_s": row["step_s"]}


def memory() -> dict:
    by_width = [one_step(w, w // 64, 4) for w in (4096, 8192, 16384, 32768, 65536)]   # 64 keys per expert
    by_probe = [one_step(4096, 64, p) for p in (1, 2, 4, 8, 16, 64)]                     # n_probe / E
    capped = [one_step(w, w // 64, 4, device_rows=1024) for w in (4096, 8192, 16384, 32768, 65536)]
    return {"by_width_block_64": by_width, "by_n_probe_of_64": by_probe, "by_width_capped_1024": capped}


def quality(steps: int) -> dict:
    """Held-out loss after `steps` steps on the GSM8K sample, with each variant's device-resident training
    state (LoRA / full: weights that train + grads + 2 AdamW moments, 16 bytes per fp32 parameter; MEFT: its
    `meft_device_bytes` peak) and median step time (variants run one after another)."""
    from memft.recipe import load
    from memft.train.loop import Trainer

    meft = lambda **p: "[{name: meft, params: {" + ", ".join(f"{k}: {v}" for k, v in p.items()) + "}}]"  # noqa: E731
    variants = {
        "lora r=16": "[{name: lora, params: {r: 16, alpha: 32}}]",
        "lora r=64": "[{name: lora, params: {r: 64, alpha: 128}}]",
        "meft M=4096 (64x64, probe 4, top-32)": meft(width=4096, experts=64, n_probe=4),
        "meft M=1024 (64x16, probe 2, top-16)": meft(width=1024, experts=64, n_probe=2, topk=16),
        "meft M=4096 (64x64, probe 2, top-32), cap 256 rows": meft(width=4096, experts=64, n_probe=2, device_rows=256),
        "meft M=4096 (256x16, probe 4, top-32), cap 256 rows": meft(width=4096, experts=256, n_probe=4,
                                                                    device_rows=256),
        "meft M=16384 (256x64, probe 2, top-32), cap 256 rows": meft(width=16384, experts=256, n_probe=2,
                                                                     device_rows=256),
        "meft M=4096 (64x64, probe 4, top-32), cap 1024 rows": meft(width=4096, experts=64, n_probe=4,
                                                                    device_rows=1024),
        "meft M=16384 (256x64, probe 4, top-32), cap 1024 rows": meft(width=16384, experts=256, n_probe=4,
                                                                      device_rows=1024),
        "dense adapter M=4096": meft(width=4096, experts=64, mode="dense"),
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
        steps_logged = [m for m in lines if "meft_device_bytes" in m]
        device = max((m["meft_device_bytes"] for m in steps_logged), default=0) or 16 * summary["trainable_params"]
        out[name] = {"eval_loss_start": lines[0]["eval_loss"], "eval_loss": summary["eval_loss"],
                     "device_training_bytes": device, "step_time_s": summary["step_time_s"],
                     "trainable_params_on_device": summary["trainable_params"]}
        if steps_logged:  # does training concentrate the router's traffic? first vs last 10 steps
            for key in ("meft_device_bytes", "meft_bytes_to_device", "meft_rerouted_probes"):
                if key in steps_logged[0]:
                    out[name][key + "_first10"] = statistics.mean(m[key] for m in steps_logged[:10])
                    out[name][key + "_last10"] = statistics.mean(m[key] for m in steps_logged[-10:])
        print(name, out[name])
    return {"steps": steps, "quality": out}


WIDE = ["model.name=tiny-llama", "model.config_overrides={hidden_size: 512, intermediate_size: 1376, "
        "num_hidden_layers: 4, num_attention_heads: 8, num_key_value_heads: 8}"]
"""A wider model (random init, d = 512) where a token's few adapter rows are a small share of the adapter."""


def speed(rounds: int) -> dict:
    """Median step time (forward, backward, the loop's optimizer and MEFT's CPU AdamW) of LoRA and MEFT pairs
    of about equal device training state, on the same batch, steps interleaved in one process."""
    from memft.recipe import load
    from memft.train.loop import Trainer

    pairs = {
        "stories260K": ([], {"lora r=16": "[{name: lora, params: {r: 16}}]",
                             "lora r=32": "[{name: lora, params: {r: 32}}]",
                             "meft M=16384 cap 256": "[{name: meft, params: {width: 16384, experts: 256, n_probe: 2, "
                                                     "device_rows: 256}}]",
                             "meft M=4096 uncapped": "[{name: meft, params: {width: 4096, experts: 64, n_probe: 4}}]"}),
        "llama d=512 x 4 layers": (WIDE, {
            "lora r=16": "[{name: lora, params: {r: 16}}]",
            "lora r=64": "[{name: lora, params: {r: 64}}]",
            "meft M=65536 cap 256": "[{name: meft, params: {width: 65536, experts: 1024, n_probe: 2, "
                                    "device_rows: 256}}]",
            "meft M=16384 uncapped": "[{name: meft, params: {width: 16384, experts: 256, n_probe: 2}}]"}),
    }
    out = {}
    for model, (overrides, variants) in pairs.items():
        trainers = {}
        for name, strategies in variants.items():
            r = load(ROOT / "recipes" / "meft.yaml", [*overrides, f"strategies={strategies}", "log.progress=false",
                                                      "output.checkpoints=false", "output.plot=false"])
            trainers[name] = Trainer(r, run_dir=tempfile.mkdtemp(prefix="meft-speed-")).setup()
        batch = next(iter(trainers.values())).batcher.batch(0, 0)
        times = {name: [] for name in trainers}
        device = {}
        for k in range(rounds + 1):
            for name, t in trainers.items():
                started = time.perf_counter()
                _step(t, k, batch)
                for s in t.strategies:
                    s.after_optimizer_step(k)
                if k:  # the first round warms up
                    times[name].append(time.perf_counter() - started)
                meters = {}
                for s in t.strategies:
                    meters.update(s.metrics())
                trainable = sum(p.numel() * p.element_size() for p in t.model.parameters() if p.requires_grad)
                device[name] = meters.get("meft_device_bytes") or 4 * trainable  # weights, grads, 2 moments
        base = statistics.median(times["lora r=16"])
        out[model] = {name: {"step_s": statistics.median(v), "vs_lora": statistics.median(v) / base,
                             "device_training_bytes": device[name]} for name, v in times.items()}
        print(model, json.dumps(out[model], indent=1))
    return {"rounds": rounds, "tokens_per_batch": int(batch["attention_mask"].sum()), "speed": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["memory", "quality", "speed"])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    if args.part == "speed":
        RESULTS.mkdir(parents=True, exist_ok=True)
        result = {"machine": machine(), **speed(args.rounds)}
        (RESULTS / "meft_speed.json").write_text(json.dumps(result, indent=2))
        return
    if args.part == "quality":
        RESULTS.mkdir(parents=True, exist_ok=True)
        result = {"machine": machine(), **quality(args.steps)}
        (RESULTS / "meft_quality.json").write_text(json.dumps(result, indent=2))
        return
    result = {"machine": machine(), **memory()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "meft_memory.json").write_text(json.dumps(result, indent=2))
    for key in ("by_width_block_64", "by_n_probe_of_64", "by_width_capped_1024"):
        print(key)
        for r in result[key]:
            print(f"  M={r['width']:>6} E={r['experts']:>5} n_probe={r['n_probe']:>3}: host {r['host_adapter_bytes'] / 2**20:8.1f}"
                  f" MiB, device {r['meft_device_bytes'] / 2**20:6.2f} MiB, to device "
                  f"{r['meft_bytes_to_device'] / 2**20:6.2f} MiB, to host {r['meft_bytes_to_host'] / 2**20:6.2f} MiB,"
                  f" rows {r['meft_rows_touched']:>7}, step {r['step_s']:.2f} s")


if __name__ == "__main__":
    main()
