"""Fuzzing: mutated shipped recipes and data files, as a careless or hostile user would write them.

Each case runs in-process through Typer's runner (`memft validate`, or `memft train --dry-run`, which also
reads the data, loads the tokenizer and builds the model) and must end in exit 0 (the mutation left a valid
recipe) or exit 2 with an `error:` message: never a traceback, never exit 1. The cases are drawn from seeded
generators, so a failure names a case that reproduces; every failure of a stage is reported together.
"""

from __future__ import annotations

import codecs
import copy
import json
import random
import traceback
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from memft.cli import _quiet_libraries, app

_quiet_libraries()  # as `memft` does at start: library log lines would go to the runner's closed streams

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
DATA = REPO / "recipes" / "data"

# Values a careless user (or a script gone wrong) puts anywhere in a recipe.
HOSTILE = [None, "", " ", -1, 0, 1, 3, 2**64, -(2**63), 1e308, float("inf"), float("-inf"), float("nan"), 0.5,
           -0.5, 1.5, "abc", "1e9", "auto", "none", [], [None], [1, 2], {}, {"a": 1}, True, False,
           "/nonexistent/x.jsonl", "../../etc/passwd", "é" * 3, "x" * 3000, "\t", "{recipe}", "runs/{oops}"]
# Fields whose values scale what a dry run builds (a model of hidden_size 2**64); validate still sees them.
HEAVY = ("config_overrides", "upcycle")


def _invoke(args: list[str]):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=True)


def _problem(result) -> str | None:
    """Why a result breaks the promise (exit 0, or exit 2 with a short `error:` message), or None."""
    exc = result.exception
    if exc is not None and not isinstance(exc, SystemExit):
        return "".join(traceback.format_exception(exc))[-1500:]
    out = result.output
    if "Traceback" in out:
        return out[-3000:]
    if result.exit_code == 0:
        return None
    if result.exit_code != 2:
        return f"exit {result.exit_code}: {out[-2000:]}"
    if "Usage:" in out:  # Typer's own usage error
        return None
    if "error:" not in out:  # a dry run prints the resolved recipe before the error
        return f"exit 2 without an `error:` message: {out[-2000:]}"
    message = out[out.index("error:"):]
    if len(message) > 6000:
        return f"an error message of {len(message)} characters: {message[:1000]}"
    return None


# ---------------------------------------------------------------------- recipe mutations


def _paths(tree, prefix=()):
    """Every key path in a recipe tree (mappings and list items)."""
    out = []
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else []
    for k, v in items:
        out.append(prefix + (k,))
        out += _paths(v, prefix + (k,))
    return out


def _parent(tree, path):
    node = tree
    for part in path[:-1]:
        node = node[part]
    return node


def _mutate_tree(tree: dict, rng: random.Random) -> tuple[dict, str]:
    tree = copy.deepcopy(tree)
    paths = _paths(tree)
    path = rng.choice(paths)
    parent, key = _parent(tree, path), path[-1]
    op = rng.choice(["set", "set", "set", "drop", "typo", "extra", "retype"])
    where = ".".join(map(str, path))
    if op == "set":
        value = rng.choice(HOSTILE)
        parent[key] = value
        return tree, f"{where}={value!r:.40}"
    if op == "drop":
        del parent[key]
        return tree, f"drop {where}"
    if op == "typo" and isinstance(parent, dict):
        i = rng.randrange(len(str(key)) + 1)
        new = str(key)[:i] + rng.choice("aez_") + str(key)[i:]
        parent[new] = parent.pop(key)
        return tree, f"rename {where} -> {new}"
    if op == "extra" and isinstance(parent, dict):
        parent[rng.choice(["extra", "lr", "name", "params", "0"])] = rng.choice(HOSTILE)
        return tree, f"extra key beside {where}"
    parent[key] = rng.choice([[parent[key]], {"value": parent[key]}, str(parent[key])])
    return tree, f"retype {where} ({type(parent[key]).__name__})"


def _mutate_text(text: str, rng: random.Random) -> tuple[bytes, str]:
    lines = text.splitlines(keepends=True)
    op = rng.choice(["truncate", "dup_line", "del_line", "indent", "tab", "latin1", "utf16", "bom", "junk",
                     "empty", "comments", "null", "list", "nul"])
    i = rng.randrange(len(lines))
    if op == "truncate":
        return text.encode()[: rng.randrange(len(text.encode()))], op
    if op == "dup_line":
        return "".join(lines[: i + 1] + [lines[i]] + lines[i + 1:]).encode(), f"{op} {i + 1}"
    if op == "del_line":
        return "".join(lines[:i] + lines[i + 1:]).encode(), f"{op} {i + 1}"
    if op == "indent":
        lines[i] = rng.choice(["  ", " ", ""]) + lines[i].lstrip(" ") if rng.random() < 0.5 else "   " + lines[i]
        return "".join(lines).encode(), f"{op} {i + 1}"
    if op == "tab":
        lines[i] = "\t" + lines[i]
        return "".join(lines).encode(), f"{op} {i + 1}"
    if op == "latin1":
        return ("description: \"caf\u00e9 na\u00efve\"\n" + text).encode("latin-1", "replace"), op
    if op == "utf16":
        return codecs.BOM_UTF16_LE + text.encode("utf-16-le"), op
    if op == "bom":
        return codecs.BOM_UTF8 + text.encode(), op
    if op == "junk":
        raw = bytearray(text.encode())
        pos = rng.randrange(len(raw))
        raw[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16)))
        return bytes(raw), f"{op} at byte {pos}"
    if op == "empty":
        return b"", op
    if op == "comments":
        return b"# nothing here\n# at all\n", op
    if op == "null":
        return b"null\n", op
    if op == "list":
        return b"- model: stories260K\n", op
    return text.encode().replace(b":", b":\x00", 1), op


def _recipe_dir(tmp_path: Path) -> Path:
    """A folder where copied recipes find their `data/...` files, as beside the shipped ones."""
    (tmp_path / "data").symlink_to(DATA, target_is_directory=True)
    return tmp_path


def test_mutated_recipes_validate_or_exit_2(tmp_path):
    where = _recipe_dir(tmp_path)
    rng = random.Random(15)
    failures, outcomes = [], {0: 0, 2: 0}
    for case in range(260):
        source = rng.choice(RECIPES)
        text = source.read_text()
        if case % 3 == 2:
            raw, what = _mutate_text(text, rng)
        else:
            tree, what = _mutate_tree(yaml.safe_load(text), rng)
            raw = yaml.safe_dump(tree, sort_keys=False, allow_unicode=True).encode()
        file = where / f"case{case}.yaml"
        file.write_bytes(raw)
        result = _invoke(["validate", file])
        if (why := _problem(result)) is not None:
            failures.append(f"case {case} ({source.name}: {what}): {why}")
        outcomes[result.exit_code] = outcomes.get(result.exit_code, 0) + 1
    assert not failures, f"{len(failures)} of 260 cases broke the promise:\n\n" + "\n\n".join(failures)
    assert outcomes[2] > 100, outcomes  # the mutations really are hostile: most must be refused


def test_mutated_recipes_dry_run_or_exit_2(tmp_path):
    """Mutations that pass `validate` go on to `train --dry-run`: data, tokenizer and model are built."""
    where = _recipe_dir(tmp_path)
    rng = random.Random(16)
    light = [p for p in RECIPES if "stories260K" in p.read_text() and "meft" not in p.name]
    failures, ran = [], 0
    for case in range(400):
        if ran == 36:
            break
        source = rng.choice(light)
        tree = yaml.safe_load(source.read_text())
        tree.setdefault("data", {})["max_samples"] = 24
        tree["data"]["max_length"] = 64
        mutated, what = _mutate_tree(tree, rng)
        if any(part in HEAVY for part in what.split(" ")[-1].split(".")):
            continue
        file = where / f"dry{case}.yaml"
        file.write_text(yaml.safe_dump(mutated, sort_keys=False, allow_unicode=True))
        if _invoke(["validate", file]).exit_code != 0:
            continue
        ran += 1
        result = _invoke(["train", file, "--dry-run", "-o", tmp_path / f"run{case}"])
        if (why := _problem(result)) is not None:
            failures.append(f"case {case} ({source.name}: {what}): {why}")
    assert ran == 36, f"only {ran} mutated recipes passed validate"
    assert not failures, f"{len(failures)} of {ran} dry runs broke the promise:\n\n" + "\n\n".join(failures)


# ---------------------------------------------------------------------- data mutations

DATA_RECIPES = {  # (recipe text, data file, extension)
    "instruction": ("model: {name: stories260K}\ndata: {source: SOURCE, format: instruction, max_length: 64}\n",
                    DATA / "gsm8k_sample.jsonl"),
    "text": ("model: {name: stories260K}\ndata: {source: SOURCE, format: text, max_length: 64}\n",
             DATA / "stories260k_samples.jsonl"),
    "classification": ("model: {name: stories260K, task: sequence_classification}\n"
                       "data: {source: SOURCE, format: classification, text_field: sentence, max_length: 64}\n",
                       DATA / "tiny_sst2.tsv"),
}


def _rows(file: Path, n: int) -> list:
    if file.suffix == ".jsonl":
        return [json.loads(line) for line in file.read_text().splitlines()[:n]]
    return file.read_text().splitlines()[:n]


def _mutate_rows(rows: list, suffix: str, rng: random.Random) -> tuple[bytes, str]:
    rows = copy.deepcopy(rows)
    jsonl = suffix == ".jsonl"
    ops = ["torn", "bad_line", "latin1", "utf16", "bom", "empty", "blank", "junk", "long", "header_only",
           "ragged", "binary"] + (["type", "type", "null_column", "missing"] if jsonl else ["dup_header"])
    op = rng.choice(ops)
    i = rng.randrange(1, len(rows))

    def text(rs) -> str:
        return "".join((json.dumps(r, ensure_ascii=False) if jsonl else r) + "\n" for r in rs)

    if op == "type":
        column = rng.choice(list(rows[i]))
        rows[i][column] = rng.choice([7, 2.5, [1, "a"], {"x": "y"}, None, True])
        return text(rows).encode(), f"{op} row {i + 1} {column}={rows[i][column]!r}"
    if op == "null_column":
        column = rng.choice(list(rows[0]))
        for r in rows:
            r[column] = None
        return text(rows).encode(), f"{op} {column}"
    if op == "missing":
        rows[i].pop(rng.choice(list(rows[i])))
        return text(rows).encode(), f"{op} row {i + 1}"
    body = text(rows)
    if op == "torn":
        return body.encode()[: -rng.randrange(2, 30)], op
    if op == "bad_line":
        lines = body.splitlines(keepends=True)
        lines[i] = lines[i][: len(lines[i]) // 2] + "\n"
        return "".join(lines).encode(), f"{op} {i + 1}"
    if op == "latin1":
        return ("caf\u00e9 " + body if not jsonl else body.replace("e", "\u00e9", 3)).encode("latin-1", "replace"), op
    if op == "utf16":
        return codecs.BOM_UTF16_LE + body.encode("utf-16-le"), op
    if op == "bom":
        return codecs.BOM_UTF8 + body.encode(), op
    if op == "empty":
        return b"", op
    if op == "blank":
        return b"\n\n  \n", op
    if op == "junk":
        raw = bytearray(body.encode())
        pos = rng.randrange(len(raw))
        raw[pos:pos] = bytes(rng.randrange(128, 256) for _ in range(4))
        return bytes(raw), f"{op} at byte {pos}"
    if op == "long":
        long = "word " * 200_000
        extra = json.dumps({k: long for k in rows[0]}) if jsonl else "\t".join([long, "1"])
        return (body + extra + "\n").encode(), op
    if op == "header_only":
        return (body.splitlines()[0] + "\n").encode(), op
    if op == "ragged":
        lines = body.splitlines(keepends=True)
        lines[i] = lines[i].rstrip("\n") + ("\tx\n" if not jsonl else ", 3]\n")
        return "".join(lines).encode(), f"{op} {i + 1}"
    if op == "dup_header":
        lines = body.splitlines(keepends=True)
        lines[0] = "sentence\tsentence\n"
        return "".join(lines).encode(), op
    return bytes(rng.randrange(256) for _ in range(300)), op


@pytest.mark.parametrize("kind", sorted(DATA_RECIPES))
def test_mutated_data_dry_run_or_exit_2(tmp_path, kind):
    template, source = DATA_RECIPES[kind]
    rows = _rows(source, 24)
    rng = random.Random(f"data-{kind}")
    failures = []
    for case in range(14):
        raw, what = _mutate_rows(rows, source.suffix, rng)
        data = tmp_path / f"case{case}{source.suffix}"
        data.write_bytes(raw)
        recipe = tmp_path / f"case{case}.yaml"
        recipe.write_text(template.replace("SOURCE", str(data)))
        result = _invoke(["train", recipe, "--dry-run", "-o", tmp_path / f"run{case}"])
        if (why := _problem(result)) is not None:
            failures.append(f"case {case} ({source.name}: {what}): {why}")
    assert not failures, f"{len(failures)} of 14 cases broke the promise:\n\n" + "\n\n".join(failures)


# ---------------------------------------------------------------------- hostile command lines


def _command_lines(tmp: Path) -> list[list]:
    """Arguments a careless user passes to the other commands: missing, wrong-kind and nonsense paths and values."""
    (tmp / "file.txt").write_text("x")
    (tmp / "empty").mkdir()
    lora = REPO / "recipes" / "lora.yaml"
    junk = [tmp / "nope", tmp / "file.txt", tmp / "empty"]
    lines = [["eval", "mmlu", "--model", p] for p in junk]
    lines += [["eval", "mmlu", "--model", "stories260K", "--data", p] for p in junk]
    lines += [["eval", "glue", "--task", "sst2", "--model", "stories260K", "--data", p] for p in junk]
    lines += [["eval", "glue", "--task", "nosuch", "--model", "stories260K", "--data", tmp],
              ["eval", "mmlu", "--model", "stories260K", "--shots", "9"],
              ["eval", "mmlu", "--model", "stories260K", "--device", "tpu"],
              ["eval", "mmlu", "--model", "stories260K", "--json", tmp / "file.txt" / "x.json"]]
    lines += [["export", p, tmp / f"out{i}"] for i, p in enumerate(junk)]
    lines += [["profile", lora, "model.name=tiny-llama", *extra] for extra in
              (["--gpu-memory", "lots"], ["--gpu-memory", "-5GiB"], ["--device", "tpu"], ["--json", tmp / "empty"],
               ["train.batch_size=100000000"], ["model.name=nosuch/model"])]
    lines += [["bench", lora, "--variants", v] for v in ("", ";;", "nosuch", "lora,train.lr=abc")]
    lines += [["train", lora, *extra] for extra in
              (["noequals"], ["=3"], ["strategies.5.params.r=3"], ["train.lr.x=3"], ["-o", tmp / "file.txt"],
               ["--dry-run", "model.tokenizer=" + str(tmp / "empty")], ["--dry-run", f"data.eval_split={tmp}/file.txt"],
               ["--dry-run", "data.source=nosuch/dataset"])]
    return lines + [["validate", p] for p in junk]


def test_hostile_command_lines_exit_0_or_2(tmp_path):
    failures = []
    for args in _command_lines(tmp_path):
        result = _invoke(args)
        if (why := _problem(result)) is not None:
            failures.append(f"memft {' '.join(map(str, args))}: {why}")
    assert not failures, f"{len(failures)} command lines broke the promise:\n\n" + "\n\n".join(failures)
