"""`memft profile` measurements for docs/profile.md.

Usage:
    python benchmarks/profile_memory.py accuracy   # predicted vs measured, every strategy, tiny dense and MoE models
    python benchmarks/profile_memory.py popular    # predicted peak of the shipped popular models under each strategy
    python benchmarks/profile_memory.py plot       # docs/img/profile_popular.png from the `popular` results
    python benchmarks/profile_memory.py gpu        # predicted peak vs torch.cuda.max_memory_allocated (needs a GPU)
    python benchmarks/profile_memory.py tables     # the markdown tables of docs/profile.md, from the stored results

Results go to benchmarks/results/profile_<part>.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

from lcsb import machine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

ACCURACY = [  # (model, strategies, extra overrides)
    ("tiny-llama", "[{name: full}]", []),
    ("tiny-llama", "[{name: full}]", ["train.gradient_checkpointing=true"]),
    ("tiny-llama", "[{name: lora}]", []),
    ("tiny-llama", "[{name: qlora}]", []),
    ("tiny-llama", "[{name: full}]", ["train.optimizer=adamw_8bit"]),
    ("tiny-llama", "[{name: full}, {name: tokentune, params: {fraction: 0.25}}]", []),
    ("tiny-llama", "[{name: lora}, {name: lcsb, params: {groups: 4}}]", []),
    ("tiny-llama", "[{name: full}, {name: revffn}]", []),
    ("tiny-llama", "[{name: meft, params: {width: 1024, experts: 16}}]", []),
    ("tiny-llama", "[{name: full}]", ["train.autocast=bf16"]),
    ("tiny-mixtral", "[{name: full}]", []),
    ("tiny-mixtral", "[{name: lora}]", ["train.gradient_checkpointing=true"]),
    ("tiny-mixtral", "[{name: qlora}]", []),
    ("tiny-mixtral", "[{name: lora}, {name: lcsb, params: {groups: 2}}]", []),
    ("tiny-mixtral", "[{name: full}, {name: revffn}]", []),
    ("tiny-qwen2-moe", "[{name: lora}]", ["model.dtype=bfloat16"]),
    ("tiny-olmoe", "[{name: full}, {name: tokentune, params: {fraction: 0.25}}]", []),
]

POPULAR_STRATEGIES = {
    "full": ("[{name: full}]", []),
    "full + checkpointing": ("[{name: full}]", ["train.gradient_checkpointing=true"]),
    "full + 8-bit AdamW + checkpointing": ("[{name: full}]", ["train.gradient_checkpointing=true",
                                                              "train.optimizer=adamw_8bit"]),
    "lora": ("[{name: lora}]", []),
    "lora + checkpointing": ("[{name: lora}]", ["train.gradient_checkpointing=true"]),
    "qlora + checkpointing": ("[{name: qlora}]", ["train.gradient_checkpointing=true"]),
}


GPU = [  # (shipped config, layers kept, strategies, extra overrides): real widths, a few layers
    ("mistralai/Mistral-7B-v0.1", 4, "[{name: full}]", []),
    ("mistralai/Mistral-7B-v0.1", 4, "[{name: full}]", ["train.gradient_checkpointing=true"]),
    ("mistralai/Mistral-7B-v0.1", 4, "[{name: full}, {name: tokentune, params: {fraction: 0.25}}]", []),
    ("mistralai/Mistral-7B-v0.1", 4, "[{name: full}]", ["train.optimizer=adamw_8bit"]),
    ("mistralai/Mistral-7B-v0.1", 4, "[{name: lora}]", ["model.dtype=bfloat16", "data.max_length=2048"]),
    ("mistralai/Mistral-7B-v0.1", 4, "[{name: qlora}]", ["data.max_length=2048"]),
    ("mistralai/Mistral-7B-v0.1", 4, "[{name: lora}, {name: lcsb, params: {groups: 4}}]",
     ["model.dtype=bfloat16", "data.max_length=2048"]),
    ("mistralai/Mistral-7B-v0.1", 4, "[{name: meft, params: {width: 16384, experts: 256, device_rows: 4096}}]",
     ["model.dtype=bfloat16"]),
    ("allenai/OLMoE-1B-7B-0924", 2, "[{name: full}]", []),
    ("allenai/OLMoE-1B-7B-0924", 2, "[{name: full}, {name: revffn}]", []),
    ("allenai/OLMoE-1B-7B-0924", 2, "[{name: lora}]", ["model.dtype=bfloat16"]),
    ("allenai/OLMoE-1B-7B-0924", 2, "[{name: lora, params: {target_experts: false}}]", ["model.dtype=bfloat16"]),
]


def gpu(batch: int, seq: int, out: Path) -> None:
    """Predicted peak (for `cuda`) against one real step's `torch.cuda.max_memory_allocated`, on shipped configs
    cut to a few layers (random init). Saved after each case."""
    import torch

    from memft.profile import predict
    from memft.recipe import load

    torch.backends.cuda.matmul.allow_tf32 = False
    saved = {"machine": {**machine(), "gpu": torch.cuda.get_device_name()}, "rows": []}
    for name, layers, strategies, extra in GPU:
        r = load(ROOT / "recipes" / "lora.yaml", [
            f"model.name={ROOT / 'configs' / 'hub' / name}.json", "model.tokenizer=stories260K",
            f"model.config_overrides={{num_hidden_layers: {layers}}}",
            f"strategies={strategies}", f"train.batch_size={batch}", f"data.max_length={seq}", *extra])
        started = time.perf_counter()
        try:
            p = predict.profile(r, "cuda")
            seconds = time.perf_counter() - started
            torch.cuda.empty_cache()
            m = predict.measure(r)
        except Exception as exc:  # noqa: BLE001 - one failing case must not cost the others' GPU time
            saved["rows"].append({"model": name, "strategies": strategies, "extra": extra, "error": repr(exc)})
            print(f"{name} {strategies} {extra}: {exc!r}", flush=True)
            continue
        finally:  # the last case's tensors must not count in this one's peak
            gc.collect()
            torch.cuda.empty_cache()
        row = {"model": name, "layers": layers, "strategies": strategies, "extra": extra, "profile_s": seconds,
               "predicted": p.to_json(), "measured": m, "peak_ratio": p.peak / m["cuda_peak_bytes"],
               "activation_ratio": p.activations / m["activation_bytes"]}
        saved["rows"].append(row)
        out.write_text(json.dumps(saved, indent=2))
        print(f"{name.split('/')[1]:22} {strategies[:50]:50} {' '.join(extra):40} peak {p.peak / 2**30:6.2f} / "
              f"{m['cuda_peak_bytes'] / 2**30:6.2f} GiB = {row['peak_ratio']:.3f}, act {row['activation_ratio']:.3f} "
              f"({seconds:.1f} s)", flush=True)


def accuracy(batch: int, seq: int) -> list[dict]:
    from memft.profile import predict
    from memft.recipe import load

    rows = []
    for model, strategies, extra in ACCURACY:
        r = load(ROOT / "recipes" / "lora.yaml", [f"model.name={model}", f"strategies={strategies}",
                                                  f"train.batch_size={batch}", f"data.max_length={seq}", *extra])
        started = time.perf_counter()
        p = predict.profile(r, "cpu")
        seconds = time.perf_counter() - started
        m = predict.measure(r)
        row = {"model": model, "strategies": strategies, "extra": extra, "profile_s": seconds,
               "fit_residual": p.fit_residual, "predicted": p.to_json(), "measured": m,
               "activation_ratio": p.activations / m["activation_bytes"]}
        rows.append(row)
        print(f"{model:15} {strategies[:60]:60} {' '.join(extra):35} act {row['activation_ratio']:.3f} "
              f"weights {p.weight_bytes == m['weight_bytes']} grads {p.gradients == m['gradient_bytes']} "
              f"opt {p.optimizer_state == m['optimizer_bytes']} ({seconds:.1f} s)", flush=True)
    return rows


def popular(seq: int) -> None:
    """Profiles every shipped model under each variant; results are saved after each one (a rerun skips
    what is there)."""
    from memft.profile import predict
    from memft.recipe import load

    out = RESULTS / "profile_popular.json"
    saved = json.loads(out.read_text()) if out.exists() else {"machine": machine(), "rows": []}
    done = {(r["model"], r["variant"]) for r in saved["rows"]}
    for name in predict.list_shipped():
        bert = "bert" in name
        base = ROOT / "recipes" / ("classify_sst2.yaml" if bert else "lora.yaml")
        for label, (strategies, extra) in POPULAR_STRATEGIES.items():
            if (name, label) in done:
                continue
            r = load(base, [f"model.name={name}", "model.dtype=bfloat16", f"strategies={strategies}",
                            "train.batch_size=1", f"data.max_length={512 if bert else seq}", *extra])
            started = time.perf_counter()
            p = predict.profile(r, "cuda")
            saved["rows"].append({"model": name, "variant": label, "seconds": time.perf_counter() - started,
                                  **p.to_json()})
            out.write_text(json.dumps(saved, indent=2))
            print(f"{name:40} {label:38} peak {p.peak / 2**30:7.1f} GiB (weights {p.weight_bytes / 2**30:.1f}, "
                  f"activations {p.activations / 2**30:.1f}; {saved['rows'][-1]['seconds']:.1f} s)", flush=True)


def plot() -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    rows = json.loads((RESULTS / "profile_popular.json").read_text())["rows"]
    models = sorted({r["model"] for r in rows})
    variants = list(POPULAR_STRATEGIES)
    fig = Figure(figsize=(11, 5))
    ax = fig.add_subplot()
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        peaks = [next((r["peak"] / 2**30 for r in rows if r["model"] == m and r["variant"] == v), 0) for m in models]
        ax.bar([j + i * width for j in range(len(models))], peaks, width, label=v)
    ax.set_yscale("log")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(models))], [m.split("/")[1] for m in models],
                  rotation=25, ha="right", fontsize=8)
    for gib in (24, 80):
        ax.axhline(gib, color="gray", lw=0.8, ls="--")
        ax.text(len(models) - 0.5, gib * 1.05, f"{gib} GiB", fontsize=7, color="gray")
    ax.set_ylabel("predicted peak (GiB, log scale)")
    ax.set_title("memft profile: one sequence of 2,048 tokens (BERT: 512), bf16 weights, CUDA autocast")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    out = ROOT / "docs" / "img" / "profile_popular.png"
    fig.savefig(out, dpi=100)
    print(out)


def _label(strategies: str, extra: list[str]) -> str:
    names = ", ".join(part.split("}")[0].replace("{name: ", "").replace("params: {", "")
                      for part in strategies.strip("[]").split("{name: ")[1:])
    shown = [e.replace("train.", "").replace("model.", "").replace("data.", "") for e in extra]
    return " ".join([names, *shown]).replace(",  ", ", ").strip()


def tables() -> None:
    """docs/profile.md's tables, from benchmarks/results/profile_{accuracy,gpu,popular}.json."""
    mib, gib = 2**20, 2**30
    acc = json.loads((RESULTS / "profile_accuracy.json").read_text())
    print(f"accuracy: {acc['machine']}\n")
    print("| model | strategies | predicted activations (MiB) | measured (MiB) | ratio | weights, grads, optimizer "
          "| fit error on twins | profile time |\n|---|---|---|---|---|---|---|---|")
    for r in acc["rows"]:
        p, m = r["predicted"], r["measured"]
        same = " ".join("=" if p[a] == m[b] else "≠" for a, b in (("weight_bytes", "weight_bytes"),
                        ("gradients", "gradient_bytes"), ("optimizer_state", "optimizer_bytes")))
        print(f"| {r['model']} | {_label(r['strategies'], r['extra'])} | {p['activations'] / mib:.2f} | "
              f"{m['activation_bytes'] / mib:.2f} | {r['activation_ratio']:.3f} | {same} | {r['fit_residual']:.0e} | "
              f"{r['profile_s']:.1f} s |")
    gpu = json.loads((RESULTS / "profile_gpu.json").read_text())
    print(f"\ngpu: {gpu['machine']}\n")
    print("| model (layers) | strategies | predicted peak (GiB) | measured peak (GiB) | ratio | activations: predicted "
          "/ measured (GiB) |\n|---|---|---|---|---|---|")
    for r in gpu["rows"]:
        p, m = r["predicted"], r["measured"]
        print(f"| {r['model'].split('/')[1]} ({r['layers']}) | {_label(r['strategies'], r['extra'])} | "
              f"{p['peak'] / gib:.2f} | {m['cuda_peak_bytes'] / gib:.2f} | {r['peak_ratio']:.3f} | "
              f"{p['activations'] / gib:.2f} / {m['activation_bytes'] / gib:.2f} |")
    pop = json.loads((RESULTS / "profile_popular.json").read_text())
    print(f"\npopular: {pop['machine']}\n")
    variants = list(POPULAR_STRATEGIES)
    print("| model | parameters | " + " | ".join(variants) + " | profile time (max) |\n|" + "---|" * (len(variants) + 3))
    for model in sorted({r["model"] for r in pop["rows"]}):
        rows = {r["variant"]: r for r in pop["rows"] if r["model"] == model}
        first = next(iter(rows.values()))
        print(f"| {model} | {first['params'] / 1e9:.2f}B | "
              + " | ".join(f"{rows[v]['peak'] / gib:.1f}" if v in rows else "-" for v in variants)
              + f" | {max(r['seconds'] for r in rows.values()):.1f} s |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["accuracy", "popular", "plot", "gpu", "tables"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS / "profile_gpu.json")
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.part == "plot":
        plot()
        return
    if args.part == "tables":
        tables()
        return
    if args.part == "gpu":
        gpu(args.batch, args.seq or 1024, args.out)
        return
    if args.part == "popular":
        popular(args.seq or 2048)
        return
    rows = accuracy(args.batch, args.seq or 256)
    (RESULTS / "profile_accuracy.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
