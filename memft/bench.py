"""`memft bench`: variants of one recipe, side by side in one invocation, as ratios to the first.

Each variant is trained in its own subprocess (`memft train ... -o DIR`) so that its peak memory
(CUDA max allocated, or the process's peak RSS on the CPU) is its own; every variant sees the same
model, data, batch and seed. Results are read back from each run's `summary.json`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

from memft import registry
from memft.errors import RunFailed, UserError
from memft.outputs import check_writable_file, write_text
from memft.recipe import load

METRICS = [  # (summary key, column title, higher is better)
    ("activation_bytes", "activation bytes", False),
    ("peak_mem_bytes", "peak memory", False),
    ("tokens_per_s", "tokens/s", True),
    ("step_time_s", "step time", False),
    ("final_loss", "final loss", False),
    ("eval_loss", "eval loss", False),
    ("eval_accuracy", "eval accuracy", True),
    ("meft_device_bytes_peak", "MEFT device bytes", False),
    ("meft_bytes_to_device", "MEFT to device / step", False),
]
CHECKPOINTING = {"gradient_checkpointing", "gc"}


def parse_variants(spec: str, base_strategies: list[dict]) -> list[tuple[str, list[str]]]:
    """`"full;lora,strategies.0.params.r=16;full,gradient_checkpointing"` -> [(label, overrides)].

    A strategy named in a variant keeps the params the recipe gives it, if the recipe lists it.
    """
    known = registry.available()
    from_recipe = {s["name"]: s.get("params") or {} for s in base_strategies}
    variants = []
    for raw in [v.strip() for v in spec.split(";") if v.strip()]:
        strategies, overrides = [], []
        for item in [i.strip() for i in raw.split(",") if i.strip()]:
            if "=" in item:
                overrides.append(item)
            elif item in CHECKPOINTING:
                overrides.append("train.gradient_checkpointing=true")
            elif item in known:
                strategies.append({"name": item, "params": from_recipe.get(item, {})})
            else:
                raise UserError(f"variant `{raw}`: `{item}` is neither a strategy ({', '.join(known)}), "
                                "`gradient_checkpointing`, nor a `key=value` override")
        if strategies:
            overrides.insert(0, "strategies=" + json.dumps(strategies))
        variants.append((raw, overrides))
    if not variants:
        raise UserError("`--variants` is empty; e.g. --variants \"full;lora;full,gradient_checkpointing\"")
    return variants


def run_bench(recipe: str, variants: str, *, steps: int, overrides: list[str] = (), evaluate: bool = False,
              json_out: Path | None = None, log: Callable[[str], None] = print) -> list[dict]:
    """Run every variant for `steps` optimizer steps in its own process; return their summaries.

    `evaluate` keeps the recipe's held-out data and scores it at the end (`eval_loss`, `eval_accuracy`).
    """
    base = load(recipe, overrides)  # fails early, with every recipe error, before any variant runs
    if json_out:
        check_writable_file(json_out, "`--json`")
    parsed = parse_variants(variants, [s.model_dump() for s in base.strategies])
    common = [f"train.max_steps={steps}", "train.eval_every=null", "output.checkpoints=false",
              "output.plot=false", "log.progress=false", "output.resume=never"]
    if not evaluate:
        common.append("data.eval_split=null")
    for label, extra in parsed:  # validate every variant before spending time on the first
        load(recipe, [*overrides, *common, *extra])
    results = []
    with tempfile.TemporaryDirectory(prefix="memft-bench-") as tmp:
        for i, (label, extra) in enumerate(parsed):
            out = Path(tmp) / f"variant-{i}"
            cmd = [sys.executable, "-m", "memft.cli", "train", str(recipe), *overrides, *common, *extra,
                   "--output-dir", str(out)]
            log(f"[{i + 1}/{len(parsed)}] {label}")
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
            if proc.returncode != 0:
                raise RunFailed(f"variant `{label}` failed (exit {proc.returncode}):\n{proc.stderr.strip()[-3000:]}")
            summary = json.loads((out / "summary.json").read_text())
            results.append({"variant": label, **summary})
    if json_out:
        write_text(json_out, json.dumps(results, indent=2), "`--json`")
    return results


def columns(results: list[dict]) -> list[tuple[str, str, bool]]:
    """The metrics at least one variant reported (evaluation ones only with `--eval`)."""
    return [m for m in METRICS if any(r.get(m[0]) is not None for r in results)]


def ratios(results: list[dict]) -> list[dict]:
    """Each metric divided by the first variant's (None where either is missing or zero)."""
    first = results[0]
    out = []
    for r in results:
        row = {"variant": r["variant"]}
        for key, _, _ in METRICS:
            a, b = r.get(key), first.get(key)
            row[key] = (a / b) if a is not None and b else None
        out.append(row)
    return out


def format_table(results: list[dict]):
    """A rich table: each metric's value and its ratio to the first variant."""
    from rich.table import Table

    from memft.cli import _fmt_bytes

    table = Table(title=f"memft bench ({results[0]['device']}, {results[0]['model']}); ratio to `{results[0]['variant']}`",
                  title_justify="left")
    table.add_column("variant", overflow="fold")  # a label is the command-line variant: shown whole, never cut
    shown_metrics = columns(results)
    for _, title, _ in shown_metrics:
        table.add_column(title, justify="right")
    for r, q in zip(results, ratios(results)):
        cells = []
        for key, _, _ in shown_metrics:
            v = r.get(key)
            if v is None:
                cells.append("-")
                continue
            shown = _fmt_bytes(v) if "bytes" in key else (f"{v:,.0f}" if key == "tokens_per_s" else f"{v:.4g}")
            cells.append(f"{shown} ({q[key]:.2f}x)" if q[key] is not None else shown)
        table.add_row(r["variant"], *cells)
    return table


def to_markdown(results: list[dict]) -> str:
    """The same table as GitHub markdown, for docs/benchmarks.md."""
    shown_metrics = columns(results)
    head = "| variant | " + " | ".join(t for _, t, _ in shown_metrics) + " |"
    lines = [head, "|" + "---|" * (len(shown_metrics) + 1)]
    for r, q in zip(results, ratios(results)):
        cells = []
        for key, _, _ in shown_metrics:
            v = r.get(key)
            cells.append("-" if v is None else (f"{q[key]:.2f}x" if q[key] is not None else f"{v:.4g}"))
        lines.append(f"| `{r['variant']}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)
