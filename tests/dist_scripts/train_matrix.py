"""Train several recipes one after another in one torchrun job (tests/test_distributed.py): the process group and
the imports are paid once. argv[1]: a JSON list of {"recipe", "overrides", "dir"}; each run goes through `Trainer`
as `memft train` drives it."""

import json
import sys

from memft import recipe as recipe_mod
from memft.train.loop import Trainer

for case in json.loads(sys.argv[1]):
    trainer = Trainer(recipe_mod.load(case["recipe"], case["overrides"]), run_dir=case["dir"])
    trainer.setup()
    trainer.train()
