"""The README's commands run as written, offline: every file they name is in the checkout, and the eval commands
score runs with the data shipped in recipes/data/ (runs shortened to 2 steps here)."""

import json
import re
import shlex
from pathlib import Path

from typer.testing import CliRunner

from memft.cli import app
from memft.recipe import load
from memft.train.loop import Trainer

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    return [shlex.split(line)[1:] for line in lines if line.startswith("memft ")]


def test_every_path_a_readme_command_names_exists():
    commands = readme_commands()
    assert len(commands) >= 10
    named = {arg for args in commands for arg in args if arg.startswith(("recipes/", "configs/", "docs/"))}
    assert named and all((REPO / p).exists() for p in named), sorted(p for p in named if not (REPO / p).exists())


def test_the_readme_eval_commands_score_shipped_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/... as the README writes them, under a scratch directory
    short = ["train.max_steps=2", "train.eval_every=null", "log.progress=false", "output.plot=false"]
    for recipe in ("lora.yaml", "classify_sst2.yaml"):
        r = load(REPO / "recipes" / recipe, short)
        Trainer(r, run_dir=tmp_path / r.output.dir).setup().train()
    evals = [args for args in readme_commands() if args[0] == "eval"]
    assert {a[1] for a in evals} == {"mmlu", "glue"}
    for args in evals:
        args = [str(REPO / a) if a.startswith("recipes/") else a for a in args]
        out = CliRunner().invoke(app, [*args, "--json", str(tmp_path / f"{args[1]}.json")])
        assert out.exit_code == 0, out.output
        report = json.loads((tmp_path / f"{args[1]}.json").read_text())
        assert report["results"], report


def test_the_recipe_defaults_in_docs_are_the_schemas():
    from memft.recipe import defaults_yaml

    text = (REPO / "docs" / "recipes.md").read_text()
    block = re.search(r"<!-- memft schema --yaml -->\n```yaml\n(.*?)\n```", text, flags=re.S)
    assert block, "docs/recipes.md §1 lost its `memft schema --yaml` block"
    assert block.group(1) == defaults_yaml(), "docs/recipes.md §1 is stale: paste the output of `memft schema --yaml`"
