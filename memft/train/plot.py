"""The loss / memory plot every run writes next to its metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

# Figure + the Agg canvas directly, not pyplot: no GUI backend is ever selected, and no global
# pyplot state is touched (safe in a headless server, a test, or a process that already uses pyplot).
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_BYTES_PER_MIB = 1024**2


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line:
            rows.append(json.loads(line))
    return rows


def plot_series(rows: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """The curves the plot draws, by label: `(steps, values)` each, from metrics.jsonl's lines.

    A line whose `revffn_phase` is `distill` logged a distillation KL as its `loss` (RevFFN's recovery
    stage), not a cross-entropy: it goes to "distillation KL", apart from "train loss" and "eval loss".
    """

    def series(key: str, keep=lambda row: True) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None and "step" in r and keep(r)]
        return [s for s, _ in pts], [v for _, v in pts]

    def distilled(row: dict) -> bool:
        return row.get("revffn_phase") == "distill"

    mem_steps, mem_bytes = series("peak_mem_bytes")
    return {
        "train loss": series("loss", lambda r: not distilled(r)),
        "eval loss": series("eval_loss"),
        "distillation KL": series("loss", distilled),
        "eval accuracy": series("eval_accuracy"),
        "peak memory (MiB)": (mem_steps, [b / _BYTES_PER_MIB for b in mem_bytes]),
    }


MEMORY_ZOOM = 0.05
"""The memory axis spans at least this share of its largest value, so a change under that (the allocator's
jitter, a first-step warm-up) is drawn as the near-flat line it is, not auto-zoomed into a climb."""


def memory_limits(mib: list[float]) -> tuple[float, float] | None:
    """The memory panel's y range: from 0 when the values are near, else matplotlib's own (None)."""
    if not mib:
        return None
    low, high = min(mib), max(mib)
    if high - low >= MEMORY_ZOOM * high:
        return None
    return 0.0, high * 1.05 if high > 0 else 1.0


def plot_metrics(metrics_jsonl: Path, out_png: Path, title: str = "") -> Path:
    """Draw training loss (top; a classifier's eval accuracy on a second axis) and peak memory in MiB (bottom,
    from 0 when it barely moves) against the optimizer step; a run that distilled first (RevFFN's recovery) gets a
    panel of its own for the KL above them.

    Args:
        metrics_jsonl: one JSON object per line; lines with `loss` give the training curve, lines with
            `eval_loss` are drawn as points on the same panel, `peak_mem_bytes` gives the memory panel.
            Every line has `step`. See `plot_series` for the distillation lines.
        out_png: where to write the PNG (parent directories are created).
        title: figure title, e.g. the recipe name and strategy.

    Returns:
        `out_png`.
    """
    curves = plot_series(_read_jsonl(Path(metrics_jsonl)))
    kl_steps, kl = curves["distillation KL"]

    fig = Figure(figsize=(7, 8 if kl_steps else 6), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(3 if kl_steps else 2, 1, sharex=True)
    loss_ax, mem_ax = axes[-2:]

    if kl_steps:  # a KL is not on the cross-entropy's scale: its own axis
        kl_ax = axes[0]
        kl_ax.plot(kl_steps, kl, label="distillation KL", color="tab:green", linewidth=1.2)
        kl_ax.set_ylabel("distillation KL")
        kl_ax.grid(alpha=0.3)
        kl_ax.legend(loc="upper right")

    steps, loss = curves["train loss"]
    loss_ax.plot(steps, loss, label="train loss", color="tab:blue", linewidth=1.2)
    eval_steps, eval_loss = curves["eval loss"]
    if eval_steps:
        loss_ax.plot(eval_steps, eval_loss, "o", label="eval loss", color="tab:orange")
    loss_ax.set_ylabel("cross-entropy" if kl_steps else "loss")
    loss_ax.grid(alpha=0.3)
    acc_steps, acc = curves["eval accuracy"]
    if acc_steps:  # classification: accuracy on its own 0-1 axis beside the loss
        acc_ax = loss_ax.twinx()
        acc_ax.plot(acc_steps, acc, "s--", label="eval accuracy", color="tab:purple", linewidth=1.0)
        acc_ax.set_ylabel("eval accuracy")
        acc_ax.set_ylim(0, 1)
        acc_ax.legend(loc="lower right")
    if steps or eval_steps:
        loss_ax.legend(loc="upper right")

    mem_steps, mib = curves["peak memory (MiB)"]
    mem_ax.plot(mem_steps, mib, color="tab:red", linewidth=1.2)
    if (limits := memory_limits(mib)) is not None:
        mem_ax.set_ylim(*limits)
    mem_ax.set_ylabel("peak memory (MiB)")
    mem_ax.set_xlabel("step")
    mem_ax.grid(alpha=0.3)

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, format="png")
    return out_png
