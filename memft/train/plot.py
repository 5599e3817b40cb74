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


def plot_metrics(metrics_jsonl: Path, out_png: Path, title: str = "") -> Path:
    """Draw training loss (top) and peak memory in MiB (bottom) against the optimizer step.

    Args:
        metrics_jsonl: one JSON object per line; lines with `loss` give the training curve, lines with
            `eval_loss` are drawn as points on the same panel, `peak_mem_bytes` gives the memory panel.
            Every line has `step`.
        out_png: where to write the PNG (parent directories are created).
        title: figure title, e.g. the recipe name and strategy.

    Returns:
        `out_png`.
    """
    rows = _read_jsonl(Path(metrics_jsonl))

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None and "step" in r]
        return [s for s, _ in pts], [v for _, v in pts]

    fig = Figure(figsize=(7, 6), dpi=100)
    FigureCanvasAgg(fig)
    loss_ax, mem_ax = fig.subplots(2, 1, sharex=True)

    steps, loss = series("loss")
    loss_ax.plot(steps, loss, label="train loss", color="tab:blue", linewidth=1.2)
    eval_steps, eval_loss = series("eval_loss")
    if eval_steps:
        loss_ax.plot(eval_steps, eval_loss, "o", label="eval loss", color="tab:orange")
    loss_ax.set_ylabel("loss")
    loss_ax.grid(alpha=0.3)
    if steps or eval_steps:
        loss_ax.legend(loc="upper right")

    mem_steps, mem_bytes = series("peak_mem_bytes")
    mem_ax.plot(mem_steps, [b / _BYTES_PER_MIB for b in mem_bytes], color="tab:red", linewidth=1.2)
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
