"""MiniLM-L6 (real, pretrained) fine-tuned on GLUE SST-2 and CoLA with each strategy, scored by `memft eval glue`.

Usage: python benchmarks/glue_minilm.py [--steps 300]

Each (task, strategy) trains benchmarks/recipes/minilm_sst2.yaml's settings on the task's train TSV from
../shared/data/glue, then `memft eval glue` scores the run on the task's dev TSV (SST-2: accuracy; CoLA:
Matthews correlation). Results go to benchmarks/results/glue_minilm.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from lcsb import machine

ROOT = Path(__file__).resolve().parents[1]
GLUE = ROOT.parent / "shared" / "data" / "glue"
TASKS = {  # task: overrides that point the SST-2 recipe at the task's files
    "sst2": [f"data.source={GLUE / 'SST-2' / 'train.tsv'}", "data.eval_split=null"],
    "cola": [f"data.source={GLUE / 'CoLA' / 'train.tsv'}", "data.eval_split=null", "data.text_field='3'",
             "data.label_field='1'", "data.header='no'"],
}
STRATEGIES = {
    "full": "[{name: full}]",
    "lora (r 16)": "[{name: lora, params: {r: 16, alpha: 32}}]",
    "full + tokentune 25%": "[{name: full}, {name: tokentune, params: {fraction: 0.25}}]",
    "full + lcsb (3 groups)": "[{name: full}, {name: lcsb, params: {groups: 3}}]",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    from memft.eval import models as eval_models
    from memft.eval.run import run_glue
    from memft.recipe import load
    from memft.train.loop import Trainer

    rows = []
    for task, data in TASKS.items():
        for label, strategies in STRATEGIES.items():
            with tempfile.TemporaryDirectory() as run:
                recipe = load(ROOT / "benchmarks" / "recipes" / "minilm_sst2.yaml", [
                    *data, f"strategies={strategies}", f"train.max_steps={args.steps}", "log.progress=false",
                    "output.plot=false", f"output.dir={run}", "output.save_every=null", "output.keep_last=1"])
                started = time.perf_counter()
                summary = Trainer(recipe, run_dir=run).setup().train()
                seconds = time.perf_counter() - started
                report = run_glue(eval_models.load(run), task=task, data=str(GLUE))
            rows.append({"task": task, "strategies": label, "steps": args.steps, "train_s": seconds,
                         "activation_bytes": summary["activation_bytes"], "final_loss": summary["final_loss"],
                         **report["results"]})
            print(f"{task} {label:24} {report['results']} ({seconds:.0f} s training)", flush=True)
            out = ROOT / "benchmarks" / "results" / "glue_minilm.json"
            out.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
