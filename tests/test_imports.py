"""`memft validate`, `recipes`, `schema` and `--help` answer in about a second: they never import torch or the
libraries built on it (importing those alone takes seconds on a small machine). Each strategy registers its name,
params and checks without them and imports them where it applies itself to a model.

The commands run in a fresh interpreter (this one has imported torch already), in-process there, one after the other,
so the first command that brings a heavy library in is the one named."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ["torch", "transformers", "peft", "bitsandbytes", "datasets"]

# (arguments, exit code): every shipped recipe, strategy combinations valid and invalid, the listing commands
COMBINATIONS = [
    ("[{name: lora}, {name: tokentune}]", 0),
    ("[{name: qlora}, {name: lcsb}, {name: meft}]", 0),
    ("[{name: full}, {name: revffn, params: {recovery: {steps: 2}}}]", 0),
    ("[{name: qlora}, {name: meft, params: {key_init: ffn}}]", 2),  # QLora.check
    ("[{name: full}, {name: revffn}, {name: tokentune}, {name: lcsb}]", 2),  # conflicts
    ("[{name: meft, params: {width: 10, experts: 3}}, {name: lcsb, params: {groups: 0}}]", 2),  # params
]
CASES = ([(["validate", str(path.relative_to(REPO))], 0) for path in sorted((REPO / "recipes").glob("*.yaml"))]
         + [(["validate", "recipes/lora.yaml", f"strategies={c}"], code) for c, code in COMBINATIONS]
         + [(["recipes"], 0), (["schema"], 0), (["schema", "--yaml"], 0), (["--help"], 0), (["validate", "--help"], 0)])

SCRIPT = """
import contextlib, io, json, sys

from memft.cli import _quiet_libraries, app

cases, heavy = json.loads(sys.argv[1]), json.loads(sys.argv[2])
_quiet_libraries()  # as `memft` does at start
results = []
for args in cases:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = app(args, standalone_mode=False)
    results.append([args, code or 0, sorted(m for m in heavy if m in sys.modules)])
print(json.dumps(results))
"""


def test_validate_recipes_schema_and_help_import_no_heavy_library():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps([args for args, _ in CASES]), json.dumps(HEAVY)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.splitlines()[-1])
    assert [code for _, code, _ in results] == [code for _, code in CASES]
    imported = [(args, modules) for args, _, modules in results if modules]
    assert not imported, f"`memft {' '.join(imported[0][0])}` imported {', '.join(imported[0][1])}"
