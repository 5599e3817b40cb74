"""LCSB side by side with plain backprop: time of forward / backward / optimizer, activation bytes, and quality.

Usage:
    python benchmarks/lcsb.py speed     # deep tiny Llama, 512-token batches; writes benchmarks/results/lcsb_speed.json
    python benchmarks/lcsb.py quality   # stories260K GSM8K held-out loss, QLoRA learning rates, MiniLM SST-2
                                        # dev accuracy (SST-2 needs ../shared/data); writes .../lcsb_quality.json
    python benchmarks/lcsb.py surrogate # cosine between each group's LCSB gradient and the true gradient

`speed` builds every variant in one process and interleaves their steps (A, B, A, B, ...), so that a change in the
machine's load hits all variants alike; it reports medians over the timed steps. The numbers go into
docs/strategies/lcsb.md by hand, with the command and machine beside them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
IMG = ROOT / "docs" / "img"
SHARED = ROOT.parent / "shared" / "data"

# 16 layers of hidden 256: deep enough that the layers, not the 512-word head, dominate the step
DEEP_MODEL = ["model.name=tiny-llama",
              "model.config_overrides={num_hidden_layers: 16, hidden_size: 256, intermediate_size: 512, "
              "num_attention_heads: 8, num_key_value_heads: 4}",
              "data.format=text", "data.text_field=answer", "data.pack=stream", "data.max_length=256",
              "train.batch_size=2", "data.eval_split=null", "train.warmup_steps=0", "train.schedule=constant",
              "train.lr=1e-3"]
# the real GLUE SST-2 instead of the recipe's bundled sample: all 872 dev sentences are scored
SST2 = [f"data.source={SHARED / 'glue' / 'SST-2' / 'train.tsv'}",
        f"data.eval_split={SHARED / 'glue' / 'SST-2' / 'dev.tsv'}"]
PAIRS = {  # base strategy -> its recipe block
    "lora": "{name: lora, params: {r: 16, alpha: 32}}",
    "qlora": "{name: qlora, params: {r: 16, alpha: 32}}",
    "full": "{name: full}",
}


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "date": datetime.date.today().isoformat(),
            "load_average_1min": os.getloadavg()[0]}


def trainer(strategies: str, overrides: list[str], run_dir: Path):
    from memft.recipe import load
    from memft.train.loop import Trainer

    r = load(ROOT / "recipes" / "lcsb_lora.yaml", [f"strategies={strategies}", "log.progress=false",
                                                   "output.plot=false", "output.checkpoints=false", *overrides])
    return Trainer(r, run_dir=run_dir).setup()


# ---------------------------------------------------------------------- speed


def _step(t, step: int, batch: dict) -> dict:
    """One optimizer step as the loop runs it (strategies' loss hooks included), timed in three parts (seconds)."""
    for s in t.strategies:
        batch = s.on_step_start(step, batch)
    t.model.train()
    t0 = time.perf_counter()
    out = t._loss(batch)
    loss = out.loss_sum / out.count
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    for s in t.strategies:
        s.after_backward(step)
    torch.nn.utils.clip_grad_norm_([p for p in t.model.parameters() if p.grad is not None], 1.0)
    t.optimizer.step()
    t.optimizer.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    return {"forward_s": t1 - t0, "backward_s": t2 - t1, "optimizer_s": t3 - t2, "step_s": t3 - t0}


def _activation_bytes(t, step: int, batch: dict) -> int:
    from memft.train.meters import SavedTensorMeter

    for s in t.strategies:
        batch = s.on_step_start(step, batch)
    t.model.train()
    with SavedTensorMeter(t.model) as meter:
        out = t._loss(batch)
    del out
    return meter.bytes


def speed(bases: list[str], groups: int, rounds: int) -> dict:
    """Interleaved timing of `base` vs `base + lcsb(groups)` for each base; medians over `rounds * groups` steps."""
    from memft.models.blocks import layer_stack

    tmp = Path(tempfile.mkdtemp(prefix="lcsb-speed-"))
    variants = {}
    for base in bases:
        variants[base] = trainer(f"[{PAIRS[base]}]", DEEP_MODEL, tmp / base)
        variants[f"{base}+lcsb"] = trainer(f"[{PAIRS[base]}, {{name: lcsb, params: {{groups: {groups}}}}}]",
                                           DEEP_MODEL, tmp / f"{base}-lcsb")
    any_t = next(iter(variants.values()))
    batch = any_t.batcher.batch(0, 0)  # the same batch every step: the time is the method's, not the data's
    tokens = int(batch["attention_mask"].sum())
    result = {"machine": machine(), "tokens_per_batch": tokens, "groups": groups, "variants": {}}
    for name, t in variants.items():
        result["variants"][name] = {
            "activation_bytes_per_step": [_activation_bytes(t, g, batch) for g in range(groups)],
            "layers": len(layer_stack(t.model)),
            "trainable_params": t.params["trainable_params"],
        }
    times = {name: [] for name in variants}
    for step in range(groups):  # warm-up: one visit of every group
        for name, t in variants.items():
            _step(t, step, batch)
    for step in range(groups, groups * (rounds + 1)):
        for name, t in variants.items():
            times[name].append(_step(t, step, batch))
    for name, rows in times.items():
        v = result["variants"][name]
        for key in rows[0]:
            v[f"median_{key}"] = statistics.median(r[key] for r in rows)
        v["activation_bytes"] = statistics.median(v["activation_bytes_per_step"])
        v["steps_timed"] = len(rows)
    for base in bases:
        a, b = result["variants"][base], result["variants"][f"{base}+lcsb"]
        result["variants"][f"{base}+lcsb"]["ratio_to_plain"] = {
            k: b[k] / a[k] for k in ("median_forward_s", "median_backward_s", "median_optimizer_s", "median_step_s",
                                     "activation_bytes")}
    result["machine"]["load_average_1min_after"] = os.getloadavg()[0]
    return result


def speed_markdown(result: dict) -> str:
    lines = ["| variant | forward | backward | optimizer | step | activation bytes |", "|---|---|---|---|---|---|"]
    for name, v in result["variants"].items():
        q = v.get("ratio_to_plain")
        cell = (lambda k, fmt: f"{fmt(v[k])}" + (f" ({q[k]:.2f}x)" if q else ""))
        ms = lambda s: f"{s * 1e3:.1f} ms"  # noqa: E731
        lines.append(f"| `{name}` | {cell('median_forward_s', ms)} | {cell('median_backward_s', ms)} | "
                     f"{cell('median_optimizer_s', ms)} | {cell('median_step_s', ms)} | "
                     f"{cell('activation_bytes', lambda b: f'{b / 2**20:.1f} MiB')} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------- surrogate


SURROGATE_MODELS = {  # label -> overrides (LoRA r=16 on every linear layer, one batch of the recipe's data)
    "stories260K (5 layers, pretrained)": [],
    "tiny-llama 16 x 256 (random init)": DEEP_MODEL[:2],
    "MiniLM-L6 (6 layers, pretrained, post-LN)": [
        "model.name=all-MiniLM-L6-v2", "model.task=sequence_classification", "data.format=classification",
        "data.source=recipes/data/tiny_sst2.tsv", "data.text_field=sentence", "data.label_field=label",
        "data.max_length=64"],
}


def surrogate(groups: int) -> dict:
    """How close is the selected group's LCSB gradient to the true one? Cosine and norm ratio, per group.

    LoRA's B is filled with small random values first (at init it is zero, which would leave A without gradient).
    """
    from memft.train.loop import default_loss

    def grads(t, step):
        batch = t.batcher.batch(0, 0)
        for s in t.strategies:
            batch = s.on_step_start(step, batch)
        t.model.eval()  # no dropout: both runs see the same function
        out = default_loss(t.model, batch, t.recipe.model.task)
        (out.loss_sum / out.count).backward()
        return {n: p.grad for n, p in t.model.named_parameters() if p.grad is not None}

    def randomize(t):
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for n, p in sorted(t.model.named_parameters()):
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)

    tmp = Path(tempfile.mkdtemp(prefix="lcsb-surrogate-"))
    lora = "{name: lora, params: {r: 16, alpha: 32}}"
    rows = []
    for label, overrides in SURROGATE_MODELS.items():
        plain = trainer(f"[{lora}]", [*overrides, "data.eval_split=null"], tmp / "plain")
        randomize(plain)
        true = grads(plain, 0)
        for g in range(groups):
            t = trainer(f"[{lora}, {{name: lcsb, params: {{groups: {groups}}}}}]",
                        [*overrides, "data.eval_split=null"], tmp / f"lcsb{g}")
            randomize(t)
            got = grads(t, g)
            layer_part = [n for n in got if ".layers." in n or ".layer." in n]
            a = torch.cat([got[n].flatten() for n in layer_part])
            b = torch.cat([true[n].flatten() for n in layer_part])
            rows.append({"model": label, "group": g, "layers": t.strategies[-1].layer_groups[g],
                         "cosine": float(a @ b / (a.norm() * b.norm())), "norm_ratio": float(a.norm() / b.norm())})
            print(rows[-1])
    return {"machine": machine(), "groups": groups, "rows": rows}


# ---------------------------------------------------------------------- quality


def _train(strategies: str, overrides: list[str], recipe: str = "lcsb_lora.yaml") -> dict:
    """Train in this process; returns the summary plus the eval-loss curve (or the failure)."""
    from memft.errors import RunFailed
    from memft.recipe import load
    from memft.train.loop import Trainer

    run_dir = Path(tempfile.mkdtemp(prefix="lcsb-quality-"))
    r = load(ROOT / "recipes" / recipe, [f"strategies={strategies}", "log.progress=false", "output.plot=false",
                                         "output.checkpoints=false", *overrides])
    started = time.perf_counter()
    try:
        summary = Trainer(r, run_dir=run_dir).setup().train()
    except RunFailed as exc:
        summary = {"failed": str(exc).split(";")[0]}
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary["eval_curve"] = [(m["step"], m["eval_loss"]) for m in lines if "eval_loss" in m]
    summary["train_loss_curve"] = [(m["step"], m["loss"]) for m in lines if "loss" in m]
    summary["wall_s"] = time.perf_counter() - started
    return summary


def _row(label: str, s: dict, log) -> dict:
    keep = {k: s.get(k) for k in ("final_loss", "eval_loss", "eval_accuracy", "steps", "wall_s", "failed",
                                  "eval_curve", "train_loss_curve")}
    msg = f"{label}: " + (f"FAILED {s['failed']}" if "failed" in s else
                          f"eval_loss {s['eval_loss']:.4f}" + (f", eval_accuracy {s['eval_accuracy']:.4f}"
                                                              if s.get("eval_accuracy") is not None else ""))
    log(f"{msg}  ({s['wall_s']:.0f} s)")
    return {"label": label, **keep}


def quality(steps: int, seeds: list[int], sst2_steps: int, sst2_samples: int, log=print) -> dict:
    result = {"machine": machine(), "stories260K": [], "qlora_lr": [], "sst2": []}
    lora, qlora, full = PAIRS["lora"], PAIRS["qlora"], PAIRS["full"]
    common = [f"train.max_steps={steps}", "train.eval_every=50", "train.eval_batches=null", "data.eval_split=0.1"]
    runs = [("lora", f"[{lora}]"), ("lora+lcsb", f"[{lora}, {{name: lcsb}}]"),
            ("lora+lcsb strided", f"[{lora}, {{name: lcsb, params: {{partition: strided}}}}]"),
            ("lora+lcsb random", f"[{lora}, {{name: lcsb, params: {{schedule: random}}}}]"),
            ("lora+lcsb no momentum", f"[{lora}, {{name: lcsb, params: {{momentum_updates: false}}}}]"),
            ("full", f"[{full}]"), ("full+lcsb", f"[{full}, {{name: lcsb}}]")]
    for seed in seeds:
        for label, strategies in runs:
            if seed != seeds[0] and label not in ("lora", "lora+lcsb"):
                continue  # ablations on the first seed only
            lr = ["train.lr=3e-3"] if label.startswith("full") else []
            s = _train(strategies, [*common, f"train.seed={seed}", *lr])
            result["stories260K"].append({"seed": seed, **_row(f"stories260K {label} seed {seed}", s, log)})
    # the paper's 4-bit observation: does LCSB keep QLoRA stable where plain backprop is not? (no clipping)
    for lr in (5e-3, 5e-2):
        for label, strategies in [("qlora", f"[{qlora}]"), ("qlora+lcsb", f"[{qlora}, {{name: lcsb}}]")]:
            s = _train(strategies, [*common, f"train.lr={lr}", "train.max_grad_norm=null"])
            result["qlora_lr"].append({"lr": lr, **_row(f"{label} lr {lr:g} (no clipping)", s, log)})
    if (SHARED / "glue" / "SST-2" / "train.tsv").is_file():
        for seed in seeds:
            for label, strategies in [("lora", "[{name: lora, params: {r: 8, alpha: 16}}]"),
                                      ("lora+lcsb", "[{name: lora, params: {r: 8, alpha: 16}}, "
                                                    "{name: lcsb, params: {groups: 3}}]")]:
                s = _train(strategies, [*SST2, f"train.max_steps={sst2_steps}", f"data.max_samples={sst2_samples}",
                                        f"train.seed={seed}"], recipe="lcsb_minilm_sst2.yaml")
                result["sst2"].append({"seed": seed, **_row(f"MiniLM SST-2 {label} seed {seed}", s, log)})
    else:
        log("SST-2 skipped: ../shared/data/glue/SST-2 is not present")
    result["machine"]["load_average_1min_after"] = os.getloadavg()[0]
    return result


def plot_quality(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    ax, bx = fig.subplots(1, 2)
    for row in result["stories260K"]:
        if row["seed"] == result["stories260K"][0]["seed"] and row.get("eval_curve"):
            steps, losses = zip(*row["eval_curve"])
            ax.plot(steps, losses, label=row["label"].removeprefix("stories260K ").rsplit(" seed", 1)[0])
    ax.set(title="stories260K, GSM8K sample: held-out loss", xlabel="optimizer step", ylabel="eval loss")
    ax.legend(fontsize=7)
    for row in result["qlora_lr"]:
        if row.get("train_loss_curve"):
            steps, losses = zip(*[(s, min(v, 20.0) if math.isfinite(v) else 20.0) for s, v in row["train_loss_curve"]])
            bx.plot(steps, losses, label=row["label"], lw=0.8)
    bx.set(title="QLoRA (4-bit NF4) without clipping: train loss", xlabel="optimizer step", ylabel="loss (cut at 20)")
    bx.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["speed", "quality", "surrogate"])
    ap.add_argument("--bases", default="lora,qlora,full", help="speed: base strategies to pair with lcsb")
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5, help="speed: timed visits of every group")
    ap.add_argument("--steps", type=int, default=200, help="quality: stories260K steps")
    ap.add_argument("--seeds", default="0,1", help="quality: training seeds for the LoRA vs LoRA+LCSB pairs")
    ap.add_argument("--sst2-steps", type=int, default=250)
    ap.add_argument("--sst2-samples", type=int, default=8000)
    ap.add_argument("--tag", default="", help="suffix for the result file names")
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    if args.what == "speed":
        result = speed(args.bases.split(","), args.groups, args.rounds)
        result["command"] = command
        (RESULTS / f"lcsb_speed{args.tag}.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result["machine"]))
        print(speed_markdown(result))
    elif args.what == "surrogate":
        result = surrogate(args.groups)
        result["command"] = command
        (RESULTS / f"lcsb_surrogate{args.tag}.json").write_text(json.dumps(result, indent=2))
    else:
        result = quality(args.steps, [int(s) for s in args.seeds.split(",")], args.sst2_steps, args.sst2_samples)
        result["command"] = command
        (RESULTS / f"lcsb_quality{args.tag}.json").write_text(json.dumps(result, indent=2))
        IMG.mkdir(parents=True, exist_ok=True)
        plot_quality(result, IMG / f"lcsb_quality{args.tag}.png")


if __name__ == "__main__":
    main()
