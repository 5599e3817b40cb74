"""RevFFN measurements for docs/strategies/revffn.md.

Usage:
    python benchmarks/revffn.py drift      # held-out loss of stories260K (dense and upcycled to 4 experts) before
                                           # and after conversion, per coupling
    python benchmarks/revffn.py rebuild    # per-layer reconstruction error in float32 and bf16, routing flips
    python benchmarks/revffn.py recovery   # distillation: held-out loss versus tokens, tokens to within 5%
                                           # (--recovery-steps ADDITIVE MOMENTUM, --models, --tag)
    python benchmarks/revffn.py --plot benchmarks/results/revffn_recovery*.json   # docs/img/revffn_recovery.png
    python benchmarks/revffn.py speed      # activation bytes versus depth; step time versus checkpointing
    python benchmarks/revffn.py all
    python benchmarks/revffn.py markdown   # the tables of docs/strategies/revffn.md, from the results files

Each part writes benchmarks/results/revffn_<part><tag>.json.
The held-out text is `recipes/data/stories260k_samples.jsonl` (stories the model sampled itself), on which
the original model's loss is low; the numbers go into docs/strategies/revffn.md by hand.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from lcsb import _activation_bytes, _step, machine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
IMG = ROOT / "docs" / "img"
RECIPE = ROOT / "recipes" / "revffn.yaml"
MODELS = {"stories260K": [], "stories260K-moe": ["model.upcycle={experts: 4, top_k: 2}"]}
COUPLINGS = {"additive": ["strategies.1.params.coupling=additive"],
             **{f"momentum-{g}": ["strategies.1.params.coupling=momentum", f"strategies.1.params.gamma={g}"]
                for g in (0.25, 0.5, 0.75)}}
QUIET = ["log.progress=false", "output.plot=false", "output.checkpoints=false", "train.eval_batches=null",
         "strategies.1.params.recovery.steps=0", "strategies.1.params.track_reconstruction_every=0"]
# 8 layers of hidden 256: the layers, not the 512-word head, dominate the step
WIDE = ["model.name=tiny-llama", "model.config_overrides={hidden_size: 256, intermediate_size: 688, "
        "num_attention_heads: 8, num_key_value_heads: 4, num_hidden_layers: %d}",
        "train.batch_size=4", "train.schedule=constant", "train.warmup_steps=0", "train.lr=1e-4"]


def trainer(overrides: list[str], run_dir: Path | None = None, for_training: bool = False):
    from memft.recipe import load
    from memft.train.loop import Trainer

    run_dir = run_dir or Path(tempfile.mkdtemp(prefix="revffn-bench-"))
    return Trainer(load(RECIPE, [*QUIET, *overrides]), run_dir=run_dir).setup(for_training=for_training)


def save(part: str, result: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"revffn_{part}.json").write_text(json.dumps({"machine": machine(), **result}, indent=2))
    print(json.dumps(result, indent=2))


# ---------------------------------------------------------------------- conversion drift


def drift() -> dict:
    out = {}
    for model, extra in MODELS.items():
        row = {"original": trainer([*extra, "strategies=[{name: full}]"]).evaluate()["eval_loss"]}
        for name, coupling in COUPLINGS.items():
            row[name] = trainer([*extra, *coupling]).evaluate()["eval_loss"]
        out[model] = row
    return {"eval_loss": out}


# ---------------------------------------------------------------------- reconstruction error


def rebuild() -> dict:
    out = {}
    cases = {**MODELS, "tiny-llama-16 (random init)": ["model.name=tiny-llama",
                                                        "model.config_overrides={num_hidden_layers: 16}"]}
    for model, extra in cases.items():
        for dtype in ("float32", "bfloat16"):
            no_buffers = "strategies.1.params.buffer_every=0"
            for name, coupling in [("additive", [*COUPLINGS["additive"], no_buffers]),
                                   ("momentum-0.5", [*COUPLINGS["momentum-0.5"], no_buffers]),
                                   ("momentum-0.5, buffer_every auto", COUPLINGS["momentum-0.5"])]:
                t = trainer([*extra, *coupling, f"model.dtype={dtype}"], for_training=True)
                stack = t.strategies[-1].stack
                batch = t.batcher.batch(0, 0)
                stack.track_reconstruction = True
                t.model.train()
                out_ = t._loss(batch)
                (out_.loss_sum / out_.count).backward()
                out[f"{model} | {dtype} | {name}"] = {
                    "per_layer": stack.reconstruction_error, "max": max(stack.reconstruction_error),
                    "buffer_every": stack.buffer_every,
                    "routing_flips": stack.flips, "routed_tokens": int(batch["attention_mask"].sum()) * sum(
                        1 for tap in stack.taps if tap is not None)}
    return {"relative_error": out}


# ---------------------------------------------------------------------- recovery


def recovery_data() -> list[str]:
    """Distil on 4,000 fresh stories (another seed; 600 overfit within a few hundred steps) and evaluate on the
    600 shipped ones, which no run trains on."""
    from make_stories import write_stories

    train = ROOT / "benchmarks" / ".cache" / "stories260k_4000_seed1.jsonl"
    if not train.exists():
        write_stories(train, 4000, seed=1)
    return [f"data.source={train}", f"data.eval_split={ROOT / 'recipes' / 'data' / 'stories260k_samples.jsonl'}",
            "train.eval_batches=25"]


def recovery(steps: dict[str, int], models: list[str]) -> dict:
    """Distil each converted model for `steps[coupling]` steps (0: skip), evaluating 20 times on the way."""
    out = {}
    data = recovery_data()
    for model in models:
        extra = MODELS[model]
        original = trainer([*extra, *data, "strategies=[{name: full}]"]).evaluate()["eval_loss"]
        out[model] = {"original": original, "target": 1.05 * original, "runs": {}}
        for name, n in [(name, n) for name, n in steps.items() if n]:
            run_dir = Path(tempfile.mkdtemp(prefix="revffn-recovery-"))
            t = trainer([*extra, *data, *COUPLINGS[name], f"train.max_steps={n}", f"train.eval_every={n // 20}",
                         f"strategies.1.params.recovery.steps={n}", "log.every=1"], run_dir, for_training=True)
            t.train()
            tokens, curve = 0.0, []
            for line in (run_dir / "metrics.jsonl").read_text().splitlines():
                m = json.loads(line)
                tokens += m.get("tokens_per_s", 0) * m.get("step_time_s", 0)
                if "eval_loss" in m:
                    curve.append({"step": m["step"], "tokens": round(tokens), "eval_loss": m["eval_loss"]})
            reached = next((c for c in curve if c["eval_loss"] <= 1.05 * original), None)
            out[model]["runs"][name] = {"curve": curve, "tokens_to_within_5pct": reached and reached["tokens"],
                                        "steps_to_within_5pct": reached and reached["step"]}
    return {"steps": steps, "recovery": out}


def plot_recovery(results: list[dict], path: Path) -> None:
    """One panel per model; the runs of several results files (e.g. a short and a long one) together."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    merged: dict = {}
    for result in results:
        for model, r in result.items():
            merged.setdefault(model, {**r, "runs": {}})["runs"].update(
                {f"{name} ({run['curve'][-1]['step']} steps)": run for name, run in r["runs"].items()})
    fig = Figure(figsize=(10, 3.6))
    for k, (model, r) in enumerate(merged.items()):
        ax = fig.add_subplot(1, len(merged), k + 1)
        for name, run in r["runs"].items():
            ax.plot([c["tokens"] / 1e3 for c in run["curve"]], [c["eval_loss"] for c in run["curve"]], marker=".",
                    label=f"{name}, converted: {run['curve'][0]['eval_loss']:.2f}")
        ax.axhline(r["original"], color="black", lw=0.8, label="original model")
        ax.axhline(r["target"], color="gray", lw=0.8, ls="--", label="original + 5%")
        ax.set(title=f"{model}: distillation recovery", xlabel="training tokens (thousands)", ylabel="held-out loss",
               ylim=(r["original"] - 0.1, r["original"] + 0.8))
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------------- memory and speed


def speed(rounds: int) -> dict:
    variants = {"full": ["strategies=[{name: full}]"],
                "full + checkpointing": ["strategies=[{name: full}]", "train.gradient_checkpointing=true"],
                "revffn additive": COUPLINGS["additive"],
                "revffn momentum-0.5": COUPLINGS["momentum-0.5"]}
    wide = lambda layers: [WIDE[0], WIDE[1] % layers, *WIDE[2:]]  # noqa: E731
    depth = {}
    for name, extra in variants.items():
        depth[name] = {}
        for layers in (4, 8, 16):
            t = trainer([*wide(layers), *extra], for_training=True)
            depth[name][layers] = _activation_bytes(t, 0, t.batcher.batch(0, 0))
            if "revffn" in name:
                depth[name][f"buffer_every at {layers} layers"] = t.strategies[-1].stack.buffer_every
    built = {name: trainer([*wide(8), *extra], for_training=True) for name, extra in variants.items()}
    batch = next(iter(built.values())).batcher.batch(0, 0)  # the same batch every step
    times = {name: [] for name in built}
    for step in range(rounds + 2):  # two warm-up rounds, then interleaved A, B, C, D, A, B, ...
        for name, t in built.items():
            row = _step(t, step, batch)
            if step >= 2:
                times[name].append(row["step_s"])
    step_s = {name: statistics.median(v) for name, v in times.items()}
    ckpt = "full + checkpointing"
    return {"tokens_per_batch": int(batch["attention_mask"].sum()), "activation_bytes_by_layers": depth,
            "median_step_s_8_layers": step_s, "rounds": rounds,
            "ratio_to_checkpointing_8_layers": {n: {"activation_bytes": depth[n][8] / depth[ckpt][8],
                                                    "step_time": step_s[n] / step_s[ckpt]} for n in variants},
            "ratio_16_to_4_layers": {n: depth[n][16] / depth[n][4] for n in variants}}


# ---------------------------------------------------------------------- tables for the docs


def markdown() -> str:
    """The tables of docs/strategies/revffn.md, from the results files."""
    load = lambda part: json.loads((RESULTS / f"revffn_{part}.json").read_text())  # noqa: E731
    out = []
    d = load("drift")["eval_loss"]
    names = list(next(iter(d.values())))
    out += ["| model | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    out += [f"| {m} | " + " | ".join(f"{row[n]:.3f}" for n in names) + " |" for m, row in d.items()]
    r = load("rebuild")["relative_error"]
    out += ["", "| model | dtype | coupling | buffer_every | max error | per layer (input of layer 0 first) | flips |",
            "|---|---|---|---|---|---|---|"]
    for key, v in r.items():
        model, dtype, name = key.split(" | ")
        flips = f"{v['routing_flips']} / {v['routed_tokens']}" if v["routed_tokens"] else "-"
        per_layer = " ".join(f"{e:.0e}" for e in v["per_layer"])
        out.append(f"| {model} | {dtype} | {name} | {v.get('buffer_every', 0)} | {v['max']:.1e} | {per_layer} | "
                   f"{flips} |")
    for tag in ("", "_long"):
        if not (RESULTS / f"revffn_recovery{tag}.json").exists():
            continue
        rec = load(f"recovery{tag}")["recovery"]
        out += ["", "| model | coupling | steps | original | converted | after recovery | tokens to within 5% |",
                "|---|---|---|---|---|---|---|"]
        for model, m in rec.items():
            for name, run in m["runs"].items():
                c = run["curve"]
                reached = f"{run['tokens_to_within_5pct']:,} ({run['steps_to_within_5pct']} steps)" if run[
                    "tokens_to_within_5pct"] else f"not within {c[-1]['tokens']:,}"
                out.append(f"| {model} | {name} | {c[-1]['step']} | {m['original']:.3f} | {c[0]['eval_loss']:.3f} | "
                           f"{c[-1]['eval_loss']:.3f} | {reached} |")
    sp = load("speed")
    depth = sp["activation_bytes_by_layers"]
    out += ["", "| variant | 4 layers | 8 layers | 16 layers | 16 / 4 | at 8 layers vs checkpointing | step time vs "
            "checkpointing (8 layers) |", "|---|---|---|---|---|---|---|"]
    for name, row in depth.items():
        ratio = sp["ratio_to_checkpointing_8_layers"][name]
        mib = lambda b: f"{b / 2**20:.2f} MiB"  # noqa: E731
        out.append(f"| {name} | {mib(row['4'])} | {mib(row['8'])} | {mib(row['16'])} | "
                   f"{sp['ratio_16_to_4_layers'][name]:.2f}x | {ratio['activation_bytes']:.2f}x | "
                   f"{ratio['step_time']:.2f}x |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["drift", "rebuild", "recovery", "speed", "all", "markdown"])
    ap.add_argument("--recovery-steps", type=int, nargs=2, default=[800, 300], metavar=("ADDITIVE", "MOMENTUM"))
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--tag", default="", help="suffix of the results file, e.g. `_long`")
    ap.add_argument("--plot", nargs="*", metavar="JSON", help="draw docs/img/revffn_recovery.png from recovery results")
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    if args.plot:
        plot_recovery([json.loads(Path(f).read_text())["recovery"] for f in args.plot], IMG / "revffn_recovery.png")
        return
    if args.part == "markdown":
        print(markdown())
        return
    torch.manual_seed(0)
    parts = ["drift", "rebuild", "recovery", "speed"] if args.part == "all" else [args.part]
    for part in parts:
        result = {"drift": drift, "rebuild": rebuild, "recovery": lambda: recovery(dict(zip(("additive", "momentum-0.5"), args.recovery_steps)), args.models),
                  "speed": lambda: speed(args.rounds)}[part]()
        save(part + args.tag, result)


if __name__ == "__main__":
    main()
