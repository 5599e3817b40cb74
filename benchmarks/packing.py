"""Packed against padded training on the shipped conversations (`recipes/chat.yaml`, issue 18).

Two numbers per `max_length`:

- padding: of the token slots one epoch's micro-batches hold (each batch is as long as its longest row), the share
  that is padding, without packing (one conversation per row) and with `data.pack: true` (whole conversations,
  best-fit into rows of at most `max_length`, attention kept inside each);
- throughput: real tokens per second of training steps, the two variants built once and stepped in turns in one
  process (`--rounds` rounds of one step each, after one untimed step; the order alternates each round), from the
  same weights and the same recipe, so the ratio is the median of the per-round ratios.

Writes benchmarks/results/packing.json; `python benchmarks/run.py --render` puts it on docs/benchmarks.md.

Usage:
    python benchmarks/packing.py --threads 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from memft.data.batching import count_tokens
from memft.recipe import load
from memft.train.loop import Trainer

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "packing.json"
RECIPE = ROOT / "recipes" / "chat.yaml"


def trainer(max_length: int, pack: bool, batch_size: int) -> Trainer:
    r = load(RECIPE, [f"data.max_length={max_length}", f"data.pack={str(pack).lower()}",
                      f"train.batch_size={batch_size}", "data.eval_split=null", "log.progress=false",
                      "output.checkpoints=false", "output.plot=false", "train.warmup_steps=0"])
    return Trainer(r, run_dir="/tmp/memft-packing-bench").setup(for_training=False)


def padding(t: Trainer) -> dict:
    """Slots, real tokens and the padding share of one epoch's micro-batches."""
    slots = real = rows = 0
    for i in range(t.batcher.batches_per_epoch):
        batch = t.batcher.batch(0, i)
        slots += batch["input_ids"].numel()
        real += count_tokens(batch)
        rows += batch["input_ids"].size(0)
    return {"rows": rows, "batches": t.batcher.batches_per_epoch, "slots": slots, "real_tokens": real,
            "tokens_per_row": real / rows, "padding": 1 - real / slots}


def step(t: Trainer, index: int) -> tuple[float, int]:
    """One optimizer step on batch `index` of epoch 0: (seconds, real tokens)."""
    batch = {k: v.to(t.device) for k, v in t.batcher.batch(0, index % t.batcher.batches_per_epoch).items()}
    started = time.perf_counter()
    t.model.train()
    t.optimizer.zero_grad(set_to_none=True)
    out = t._loss(batch)
    (out.loss_sum / max(out.count, 1)).backward()
    t.optimizer.step()
    return time.perf_counter() - started, count_tokens(batch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, nargs="+", default=[384, 1024])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for max_length in args.max_length:
        built = {}
        for pack in (False, True):
            t = trainer(max_length, pack, args.batch_size)
            # the optimizer `setup(for_training=False)` leaves out: plain AdamW on the trainable weights
            t.optimizer = torch.optim.AdamW([p for p in t.model.parameters() if p.requires_grad], lr=1e-4)
            built[pack] = t
        row = {"max_length": max_length, "padded": padding(built[False]), "packed": padding(built[True])}
        rates = {False: [], True: []}
        for pack in (False, True):
            step(built[pack], 0)  # warm-up, untimed
        for r in range(args.rounds):
            for pack in ((False, True) if r % 2 == 0 else (True, False)):
                seconds, tokens = step(built[pack], r + 1)
                rates[pack].append(tokens / seconds)
        ratios = [p / q for p, q in zip(rates[True], rates[False])]
        row.update(tokens_per_s_padded=statistics.median(rates[False]),
                   tokens_per_s_packed=statistics.median(rates[True]), ratio=statistics.median(ratios), ratio_iqr=statistics.quantiles(ratios, n=4)[::2])
        print(json.dumps(row), flush=True)
        results.append(row)
    OUT.write_text(json.dumps({
        "date": datetime.date.today().isoformat(),
        "command": f"python benchmarks/packing.py --threads {args.threads}" if args.threads else
                   "python benchmarks/packing.py",
        "machine": {"processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "recipe": "recipes/chat.yaml", "batch_size": args.batch_size, "rounds": args.rounds, "results": results},
        indent=1))


if __name__ == "__main__":
    main()
