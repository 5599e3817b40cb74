"""memft's expert LoRA / QLoRA against peft's `target_parameters` path on fused MoE experts (issue 16).

For each tiny MoE (the tiny Mixtral of recipes/bench_moe.yaml, and OLMoE- and Qwen2-MoE-shaped built-ins), from
the same initial weights, the same batches in the same order and the same AdamW, it builds:

- `memft`: the model as `memft train` builds it (recipe -> `registry.compose` -> `load_model` ->
  `apply_strategies`), `lora` / `qlora` with the experts adapted (`LoraExperts`; NF4 experts under qlora);
- `peft`: the path memft replaced, peft's `LoraConfig(target_modules=<the same linear layers>,
  target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])` on the plain model; for qlora the
  old code's base: bitsandbytes 4-bit linear layers, experts left in the model's dtype, and
  `prepare_model_for_kbit_training`;
- `frozen`: memft with `target_experts: false`, the reference of issue 16's activation bound.

The peft path starts from memft's adapter values (the exact layout map of `memft.models.peft_interop`), so both
lora paths follow the same trajectory: their losses agree at every step, not only at step 0.

Measured: forward + backward + AdamW step time (the variants take turns step by step in one process; median
over the timed rounds), activation bytes (`SavedTensorMeter`: what autograd saves in one forward, each storage
once, parameters excluded), trainable parameters. Targets: step time <= 1.0x peft's, activation bytes <= 1.1x
frozen experts'. Writes benchmarks/results/lora_moe.json; `python benchmarks/run.py --render` puts it on
docs/benchmarks.md.

Usage:
    python benchmarks/lora_moe.py --threads 1           # all three models, 20 timed rounds (~5 min)
    python benchmarks/lora_moe.py --models tiny-mixtral --rounds 30
    python benchmarks/lora_moe.py --no-write            # print only
    python benchmarks/lora_moe.py --threads 1 --wide    # also tiny-mixtral at 4x the width (per-expert work 16x)
On a shared machine use `--threads 1`: with two threads, other processes on the cores stall every op's
threads and the step times scatter by several x; one thread keeps the ratios steady.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from memft import registry
from memft.data import build as build_data
from memft.data.batching import Batcher
from memft.data.formats import pad_token_id
from memft.models.expert_lora import LoraExperts
from memft.models.load import (
    count_params,
    load_model,
    load_tokenizer,
    model_kwargs,
    resolve_device,
)
from memft.models.nf4_experts import NF4Experts
from memft.models.peft_interop import expert_tensors
from memft.recipe import Recipe, load
from memft.registry import BuildContext
from memft.train.loop import apply_strategies, autocast_context, default_loss
from memft.train.meters import SavedTensorMeter
from memft.train.optim import build_optimizer

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "recipes/bench_moe.yaml"
OUT = ROOT / "benchmarks" / "results" / "lora_moe.json"
MODELS = ("tiny-mixtral", "tiny-olmoe", "tiny-qwen2-moe")
WIDE = ("tiny-mixtral", {"hidden_size": 256, "intermediate_size": 512})
"""`--wide`: a model and config overrides where each expert's matmuls are large enough to dominate its fixed
per-op costs (the tiny models' hidden 64 x intermediate 128 are not)."""
EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
R, ALPHA = 8, 16.0  # LoraParams' defaults, as the `lora` / `qlora` rows of `memft bench`
VARIANTS = [  # (label, strategy, path)
    ("lora memft", "lora", "memft"), ("lora peft", "lora", "peft"), ("lora frozen experts", "lora", "frozen"),
    ("qlora memft", "qlora", "memft"), ("qlora peft", "qlora", "peft"), ("qlora frozen experts", "qlora", "frozen"),
]


@dataclass
class Variant:
    label: str
    strategy: str
    path: str
    recipe: Recipe
    model: nn.Module
    optimizer: torch.optim.Optimizer
    autocast: object
    activation_bytes: int = 0
    losses: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)


def recipe_for(model: str, strategy: str, target_experts: bool, overrides: dict | None = None) -> Recipe:
    params = f"{{r: {R}, alpha: {ALPHA:g}, target_experts: {str(target_experts).lower()}}}"
    config = [f"model.config_overrides={json.dumps(overrides)}"] if overrides else []
    return load(ROOT / RECIPE, [f"model.name={model}", f"strategies=[{{name: {strategy}, params: {params}}}]",
                                "data.eval_split=null", *config])


def build_memft(recipe: Recipe, pad_id: int) -> nn.Module:
    """The model as `Trainer._build_model` builds it."""
    strategies = registry.compose(recipe)
    loaded = load_model(recipe.model, pad_token_id=pad_id, **registry.load_kwargs(strategies, recipe))
    ctx = BuildContext(recipe=recipe, device=resolve_device(recipe.model.device), is_moe=loaded.is_moe, notes=[])
    return apply_strategies(loaded.model, strategies, ctx)


def build_peft(recipe: Recipe, pad_id: int, reference: nn.Module) -> nn.Module:
    """The plain model with peft's `target_parameters` LoRA on the experts and LoRA on the linear layers that
    memft's `reference` adapts (its peft config's `target_modules` / `exclude_modules`); for qlora on the base
    the old strategy trained: bitsandbytes 4-bit linear layers, experts in the model's dtype."""
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    quantization = registry.load_kwargs(registry.compose(recipe), recipe).get("quantization_config")
    model = load_model(recipe.model, pad_token_id=pad_id).model  # memft's initial weights, in the model's dtype
    if quantization is not None:  # the old qlora: transformers' own 4-bit loading, which leaves the experts alone
        model = type(model).from_pretrained(None, config=model.config, state_dict=model.state_dict(),
                                            quantization_config=quantization, device_map={"": str(model.device)},
                                            **model_kwargs(model.config, recipe.model))
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False  # as memft's qlora: one 4-bit layout in train and eval
    linear = reference.peft_config["default"]
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=sorted(linear.target_modules),
                        exclude_modules=linear.exclude_modules, target_parameters=EXPERT_PARAMETERS,
                        task_type=TaskType.CAUSAL_LM)
    return get_peft_model(model, config)


def copy_adapters(src: nn.Module, dst: nn.Module) -> None:
    """Give peft model `dst` the adapter values of memft model `src`: linear adapters by name, expert factors
    through peft 0.21's `target_parameters` layout (`memft.models.peft_interop.expert_tensors`)."""
    values = {n: p for n, p in src.named_parameters() if p.requires_grad and ".lora_" in n}
    for name, module in src.named_modules():
        if isinstance(module, LoraExperts):
            values |= {k.replace(".lora_A.weight", ".lora_A.default.weight")
                       .replace(".lora_B.weight", ".lora_B.default.weight"): v
                       for k, v in expert_tensors(module, name).items()}
    targets = {n: p for n, p in dst.named_parameters() if p.requires_grad}
    if set(targets) != set(values):
        raise RuntimeError(f"adapter names differ: peft only {sorted(set(targets) - set(values))[:4]}, "
                           f"memft only {sorted(set(values) - set(targets))[:4]}")
    with torch.no_grad():
        for n, p in targets.items():
            if p.shape != values[n].shape:
                raise RuntimeError(f"{n}: peft {tuple(p.shape)}, memft {tuple(values[n].shape)}")
            p.copy_(values[n])


def expert_storage(model: nn.Module) -> str:
    """How the routed experts' base weights are stored: `nf4`/`fp4` holders or the fused parameters' dtype."""
    for name, m in model.named_modules():
        if isinstance(m, NF4Experts):
            return m.quant_type
    dtypes = {str(p.dtype).removeprefix("torch.") for n, p in model.named_parameters() if n.endswith("gate_up_proj")}
    return ",".join(sorted(dtypes)) or "?"


def source_state() -> dict:
    """The commit measured and memft files changed on top of it (the lead reruns this after other changes land)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout

    # porcelain lines are "XY path": the status columns may start with a space, so no strip() before slicing
    return {"commit": git("rev-parse", "--short", "HEAD").strip(),
            "modified": [line[3:] for line in git("status", "--porcelain", "memft").splitlines() if line.strip()]}


def step(v: Variant, batch: dict, meter: bool = False) -> float:
    """One forward + backward + AdamW step; returns its wall time. `meter`: count the activation bytes."""
    v.model.train()
    start = time.perf_counter()
    with SavedTensorMeter(v.model) if meter else torch.enable_grad() as m, v.autocast:
        out = default_loss(v.model, batch, "causal_lm")
    loss = out.loss_sum / out.count
    loss.backward()
    v.optimizer.step()
    v.optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - start
    if meter:
        v.activation_bytes = m.bytes
    v.losses.append(loss.item())
    return elapsed


def bench_model(name: str, rounds: int, warmup: int, overrides: dict | None = None, log=print) -> dict:
    base = recipe_for(name, "lora", True, overrides)
    tokenizer = load_tokenizer(base.model)
    pad_id = pad_token_id(tokenizer)
    data = build_data(base.data, tokenizer, seed=base.train.seed)
    batcher = Batcher(data.train, base.train.batch_size, pad_id, shuffle=base.data.shuffle, seed=base.train.seed)
    batches = [batcher.batch(0, i % len(batcher)) for i in range(1 + warmup + rounds)]

    variants: list[Variant] = []
    memft_models: dict[str, nn.Module] = {}
    for label, strategy, path in VARIANTS:
        recipe = recipe_for(name, strategy, path != "frozen", overrides)
        try:
            if path == "peft":
                model = build_peft(recipe, pad_id, memft_models[strategy])
                copy_adapters(memft_models[strategy], model)
            else:
                model = build_memft(recipe, pad_id)
        except Exception as exc:
            raise RuntimeError(f"building `{label}`: {type(exc).__name__}: {exc}") from exc
        if path == "memft":
            memft_models[strategy] = model
        device = resolve_device(recipe.model.device)
        trainable = [p for p in model.parameters() if p.requires_grad]
        variants.append(Variant(label, strategy, path, recipe, model, build_optimizer([{"params": trainable}],
                                recipe.train, device), autocast_context(recipe, device)))
    if overrides:
        name = f"{name} ({', '.join(f'{k} {v}' for k, v in overrides.items())})"
    log(f"{name}: {len(batches[0]['input_ids'])} x {batches[0]['input_ids'].shape[1]} tokens, "
        f"{warmup} warm-up + {rounds} timed rounds of {len(variants)} variants")

    for v in variants:  # step 0: activation bytes (the meter's hooks cost time, so it is not timed)
        step(v, batches[0], meter=True)
    for i, batch in enumerate(batches[1:]):  # the variants take turns, so a busy machine slows them all alike
        for v in (variants if i % 2 == 0 else variants[::-1]):
            elapsed = step(v, batch)
            if i >= warmup:
                v.times.append(elapsed)

    by = {(v.strategy, v.path): v for v in variants}
    rows = {}
    for v in variants:
        rows[v.label] = {
            "strategy": v.strategy, "path": v.path,
            "step_time_s": statistics.median(v.times),
            "step_time_iqr_s": _iqr(v.times),
            "activation_bytes": v.activation_bytes,
            "trainable_params": count_params(v.model)["trainable_params"],
            "experts_stored_as": expert_storage(v.model),
            "step0_loss": v.losses[0],
            "losses": v.losses,
            "step_times_s": v.times,
        }
    checks, ratios = {}, {}
    for s in ("lora", "qlora"):
        memft, peft, frozen = by[(s, "memft")], by[(s, "peft")], by[(s, "frozen")]
        ratios[s] = {
            # per-round ratios (the two ran back to back), then their median: steadier than a ratio of medians
            "step_time_memft_over_peft": statistics.median(a / b for a, b in zip(memft.times, peft.times)),
            "step_time_memft_over_frozen": statistics.median(a / b for a, b in zip(memft.times, frozen.times)),
            "step_time_peft_over_frozen": statistics.median(a / b for a, b in zip(peft.times, frozen.times)),
            "activation_memft_over_frozen": memft.activation_bytes / frozen.activation_bytes,
            "activation_peft_over_frozen": peft.activation_bytes / frozen.activation_bytes,
            "activation_memft_over_peft": memft.activation_bytes / peft.activation_bytes,
        }
        checks[s] = {
            "step0_loss_memft_minus_peft": memft.losses[0] - peft.losses[0],
            "step0_loss_memft_minus_frozen": memft.losses[0] - frozen.losses[0],
            "max_rel_loss_diff_memft_peft": max(abs(a - b) / abs(b) for a, b in zip(memft.losses, peft.losses)),
            "same_trainable_params": rows[memft.label]["trainable_params"] == rows[peft.label]["trainable_params"],
        }
    return {"model": name, "batch": list(batches[0]["input_ids"].shape), "rounds": rounds, "warmup": warmup,
            "variants": rows, "ratios": ratios, "checks": checks}


def _iqr(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    q = statistics.quantiles(xs, n=4)
    return q[2] - q[0]


def report(result: dict) -> str:
    lines = [f"{result['model']} ({result['batch'][0]} x {result['batch'][1]} tokens)",
             f"  {'variant':22} {'step ms':>8} {'act MiB':>8} {'trainable':>10} {'step-0 loss':>12}"]
    for label, row in result["variants"].items():
        lines.append(f"  {label:22} {1e3 * row['step_time_s']:8.1f} {row['activation_bytes'] / 2**20:8.2f} "
                     f"{row['trainable_params']:10,} {row['step0_loss']:12.6f}")
    for s, q in result["ratios"].items():
        c = result["checks"][s]
        lines.append(f"  {s}: time memft/peft {q['step_time_memft_over_peft']:.3f}x, memft/frozen "
                     f"{q['step_time_memft_over_frozen']:.3f}x; activations memft/frozen "
                     f"{q['activation_memft_over_frozen']:.3f}x, peft/frozen {q['activation_peft_over_frozen']:.3f}x; "
                     f"loss memft-peft step 0 {c['step0_loss_memft_minus_peft']:+.2e}, "
                     f"max rel {c['max_rel_loss_diff_memft_peft']:.1e}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated built-ins (default: {MODELS})")
    ap.add_argument("--rounds", type=int, default=20, help="timed rounds (each variant one step per round)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed rounds after the metered step 0")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--wide", action="store_true", help=f"also {WIDE[0]} with {WIDE[1]}")
    ap.add_argument("--no-write", action="store_true", help=f"do not write {OUT.relative_to(ROOT)}")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    runs = [(m.strip(), None) for m in args.models.split(",") if m.strip()] + ([WIDE] if args.wide else [])
    for name, overrides in runs:
        try:
            results.append(bench_model(name, args.rounds, args.warmup, overrides))
        except Exception as exc:  # noqa: BLE001 - one model failing to build is a result too; the others still run
            results.append({"model": name, "error": str(exc).splitlines()[0][:300]})
            print(f"{name}: FAILED: {results[-1]['error']}", flush=True)
            continue
        print(report(results[-1]), flush=True)
    if not args.no_write:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps({
            "date": datetime.date.today().isoformat(),
            "command": "python benchmarks/lora_moe.py " + " ".join(sys.argv[1:]),
            "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                        "python": platform.python_version(), "torch": torch.__version__,
                        "threads": torch.get_num_threads()},
            "source": source_state(), "recipe": RECIPE, "r": R, "alpha": ALPHA, "results": results}, indent=2))
        print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
