"""Train several recipes one after another in one torchrun job (tests/test_distributed.py): the process group and
the imports are paid once. argv[1]: a JSON list of {"recipe", "overrides", "dir"}; each run goes through `Trainer`
as `memft train` drives it. Each rank also writes `loads-rank-R.json` into the run dir: how many times it read the
model's weights (`load_model`), to show that only rank 0 does when it sends the others their shards."""

import json
import os
import sys
from pathlib import Path

from memft import recipe as recipe_mod
from memft.train import loop
from memft.train.loop import Trainer

loads = []
real_load_model = loop.load_model


def counting_load_model(*args, **kwargs):
    loads.append(1)
    return real_load_model(*args, **kwargs)


loop.load_model = counting_load_model
for case in json.loads(sys.argv[1]):
    loads.clear()
    trainer = Trainer(recipe_mod.load(case["recipe"], case["overrides"]), run_dir=case["dir"])
    trainer.setup()
    trainer.train()
    rank = os.environ["RANK"]
    (Path(case["dir"]) / f"loads-rank-{rank}.json").write_text(json.dumps({"load_model_calls": len(loads)}))
