"""Hostile input files and recipes (issue 15's fuzzing pass): each gets one sentence and exit 2, no traceback."""

import codecs
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memft.cli import app
from memft.errors import RecipeError, UserError
from memft.recipe import load

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "recipes" / "data" / "gsm8k_sample.jsonl"


def recipe(tmp_path: Path, body: str | bytes, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(body if isinstance(body, bytes) else body.encode())
    return path


class Result:
    def __init__(self, result):
        self.exit_code = result.exit_code
        self.output = " ".join(result.output.split())  # undo the console's line wrapping


def validate_cli(path: Path, *overrides: str) -> Result:
    result = CliRunner().invoke(app, ["validate", str(path), *overrides])
    assert "Traceback" not in result.output
    return Result(result)


def problems(path: Path, overrides=()) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load(path, overrides)
    return info.value.problems


# ---------------------------------------------------------------------------- 1. recipe encodings

GOOD_RECIPE = f"description: café\nmodel: {{name: stories260K}}\ndata: {{source: {DATA}}}\n"


@pytest.mark.parametrize("bom, encoding", [(codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"),
                                           (codecs.BOM_UTF16_BE, "utf-16-be"), (codecs.BOM_UTF32_LE, "utf-32-le"),
                                           (codecs.BOM_UTF32_BE, "utf-32-be")])
def test_recipe_in_the_encoding_its_bom_announces(tmp_path, bom, encoding):
    r = load(recipe(tmp_path, bom + GOOD_RECIPE.encode(encoding)))
    assert r.description == "café" and r.model.name == "stories260K"


def test_latin1_recipe_names_file_offset_and_iconv(tmp_path):
    path = recipe(tmp_path, GOOD_RECIPE.encode("latin-1"))
    result = validate_cli(path)
    assert result.exit_code == 2
    offset = GOOD_RECIPE.index("é")
    assert f"recipe {path} is not UTF-8 text" in result.output
    assert f"byte offset {offset}" in result.output and "iconv -f latin1 -t utf-8" in result.output


@pytest.mark.parametrize("junk", [bytes(range(256)) * 4, b"\x00" * 64, "model: {}\n".encode("utf-16-le")])
def test_binary_or_bomless_utf16_recipe_is_one_sentence(tmp_path, junk):
    result = validate_cli(recipe(tmp_path, junk))
    assert result.exit_code == 2 and "error:" in result.output and "byte offset" in result.output


def test_read_text_offsets_count_from_the_start_of_the_file(tmp_path):
    from memft.textio import read_text

    path = tmp_path / "f.txt"
    path.write_bytes(codecs.BOM_UTF8 + b"ab\xffc")
    with pytest.raises(UserError, match="byte offset 5 "):
        read_text(path)
    path.write_bytes(codecs.BOM_UTF16_LE + "ab\ud800".encode("utf-16-le", "surrogatepass"))
    with pytest.raises(UserError, match="UTF-16-LE text: .* byte offset 6 "):
        read_text(path)


# ---------------------------------------------------------------------------- 4. duplicate keys


def test_duplicate_keys_at_any_depth_name_the_key_and_both_lines(tmp_path):
    path = recipe(tmp_path, "model:\n  name: tiny-llama\ntrain:\n  lr: 1.0e-3\n  lr: 2.0e-3\n"
                            "model:\n  name: stories260K\n")
    found = problems(path)
    assert "`train.lr`: key given twice, at lines 4 and 5" in found[0]
    assert "`model`: key given twice, at lines 1 and 6" in found[1]
    assert len(found) == 2
    assert validate_cli(path).exit_code == 2


# ---------------------------------------------------------------------------- 5. empty recipes


@pytest.mark.parametrize("text", ["", "# only a comment\n", "null\n", "~\n", "{}\n"])
def test_empty_recipe_is_refused(tmp_path, text):
    result = validate_cli(recipe(tmp_path, text))
    assert result.exit_code == 2 and "the recipe is empty" in result.output


def test_empty_recipe_filled_by_overrides_is_fine(tmp_path):
    assert load(recipe(tmp_path, ""), [f"data.source={DATA}"]).data.source == str(DATA)


# ---------------------------------------------------------------------------- 6. what validate checks


def one_problem(tmp_path, override: str) -> str:
    found = problems(recipe(tmp_path, GOOD_RECIPE), [override])
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize("value", ["0", "1", "-0.5", "1.5", ".nan", "true", "''"])
def test_eval_split_fraction_must_be_between_0_and_1(tmp_path, value):
    found = one_problem(tmp_path, f"data.eval_split={value}")
    assert found.startswith("`data.eval_split`:"), found


def test_eval_split_name_and_fraction_still_work(tmp_path):
    assert load(recipe(tmp_path, GOOD_RECIPE), ["data.eval_split=0.2"]).data.eval_split == 0.2
    assert load(recipe(tmp_path, GOOD_RECIPE), ["data.eval_split=dev"]).data.eval_split == "dev"


def test_model_name_that_cannot_be_loaded(tmp_path):
    assert one_problem(tmp_path, "model.name=''").startswith("`model.name`: must not be empty")
    missing = one_problem(tmp_path, f"model.name={tmp_path}/nowhere")
    assert missing.startswith("`model.name`: no such local model") and "nowhere" in missing
    assert one_problem(tmp_path, "model.name=missing.json").startswith("`model.name`: no such local model")
    assert "no config.json" in one_problem(tmp_path, f"model.name={tmp_path}")
    (tmp_path / "weights.bin").write_bytes(b"0")
    assert "not a config .json" in one_problem(tmp_path, f"model.name={tmp_path}/weights.bin")
    # built-ins, with or without .json, and hub ids are not local paths
    assert load(recipe(tmp_path, GOOD_RECIPE), ["model.name=tiny-llama.json"]).model.name == "tiny-llama.json"


def test_data_source_empty_or_a_directory(tmp_path):
    assert "must not be empty" in one_problem(tmp_path, "data.source=''")
    assert "is a directory" in one_problem(tmp_path, f"data.source={tmp_path}")
    assert "file not found" in one_problem(tmp_path, f"data.source={tmp_path}/none.jsonl")


@pytest.mark.parametrize("override", ["train.lr=.inf", "train.lr=.nan", "train.weight_decay=.inf",
                                      "train.max_grad_norm=.inf", "train.epochs=.inf",
                                      "train.router_aux_loss_coef=.nan", "train.betas=[0.9, .nan]",
                                      "train.betas=[1.0, 0.999]", "train.betas=[-0.1, 0.999]"])
def test_floats_must_be_finite_and_betas_in_0_1(tmp_path, override):
    found = one_problem(tmp_path, override)
    assert found.startswith(f"`{override.split('=')[0]}"), found


@pytest.mark.parametrize("value", ["''", "'   '"])
def test_output_dir_must_not_be_blank(tmp_path, value):
    assert "working directory" in one_problem(tmp_path, f"output.dir={value}")


@pytest.mark.parametrize("field", ["train.seed", "model.seed"])
@pytest.mark.parametrize("value", [-1, 2**32, 2**64])
def test_seeds_fit_numpy(tmp_path, field, value):
    assert one_problem(tmp_path, f"{field}={value}").startswith(f"`{field}`:")
    assert load(recipe(tmp_path, GOOD_RECIPE), [f"{field}={2**32 - 1}"])


# ---------------------------------------------------------------------------- 2-3. data file encodings


def data_file(tmp_path: Path, name: str, body: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(body)
    return path


ROWS = [{"sentence": "café au lait", "label": 1}, {"sentence": "naïve", "label": 0}]
CSV = "sentence,label\ncafé au lait,1\nnaïve,0\n"
TSV = CSV.replace(",", "\t")
JSONL = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS)


@pytest.mark.parametrize("name, text", [("d.csv", CSV), ("d.tsv", TSV), ("d.jsonl", JSONL),
                                        ("d.json", json.dumps(ROWS, ensure_ascii=False))])
@pytest.mark.parametrize("bom, encoding", [(b"", "utf-8"), (codecs.BOM_UTF8, "utf-8"),
                                           (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be")])
def test_data_files_in_the_encoding_their_bom_announces(tmp_path, name, text, bom, encoding):
    from memft.data.sources import read_file

    assert read_file(data_file(tmp_path, name, bom + text.encode(encoding))) == ROWS


@pytest.mark.parametrize("name, text", [("d.csv", CSV), ("d.tsv", TSV), ("d.jsonl", JSONL)])
def test_latin1_data_file_names_file_offset_and_iconv(tmp_path, name, text):
    from memft.data.sources import read_file

    path = data_file(tmp_path, name, text.encode("latin-1"))
    with pytest.raises(UserError) as info:
        read_file(path)
    message = str(info.value)
    assert f"data file {path} is not UTF-8 text" in message
    assert f"byte offset {text.index('é')}" in message and "iconv -f latin1 -t utf-8" in message


@pytest.mark.parametrize("name", ["d.csv", "d.jsonl", "d.json"])
def test_binary_data_file_is_one_sentence(tmp_path, name):
    from memft.data.sources import read_file

    for junk in (bytes(range(256)), b"\x00\x01\x02" * 10, CSV.encode("utf-16-le")):
        with pytest.raises(UserError, match="byte offset"):
            read_file(data_file(tmp_path, name, junk))


def test_mrpc_dev_tsv_with_its_bom_trains(tmp_path):
    from memft.data.sources import read_file

    mrpc = data_file(tmp_path, "dev.tsv", codecs.BOM_UTF8 + b"Quality\t#1 String\t#2 String\n1\ta b\tc d\n")
    assert read_file(mrpc) == [{"Quality": 1, "#1 String": "a b", "#2 String": "c d"}]


def test_a_bad_file_through_the_cli_exits_2(tmp_path):
    path = data_file(tmp_path, "d.jsonl", JSONL.encode("latin-1"))
    result = CliRunner().invoke(app, ["train", str(recipe(tmp_path, GOOD_RECIPE)), f"data.source={path}",
                                      "--dry-run"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "is not UTF-8 text" in " ".join(result.output.split())


# ---------------------------------------------------------------------------- 8. malformed JSON lines


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    from memft.data.sources import read_file

    path = data_file(tmp_path, "d.jsonl", (JSONL + "\n" + '{"sentence": "x", "label": 1\n').encode())
    with pytest.raises(UserError, match=rf"^{path}, line 4: not valid JSON \("):
        read_file(path)
    path.write_text(JSONL + "[1, 2]\n")
    with pytest.raises(UserError, match=rf"^{path}, line 3: a JSON array where a row was expected"):
        read_file(path)
    path = data_file(tmp_path, "d.json", b'[{"a": 1},\n {"a": 2]')
    with pytest.raises(UserError, match=rf"^{path}: not valid JSON at line 2, column"):
        read_file(path)


def test_json_shapes_datasets_also_reads(tmp_path):
    from memft.data.sources import read_file

    columns = data_file(tmp_path, "c.json", json.dumps({"sentence": ["a", "b"], "label": [1, 0]}).encode())
    assert read_file(columns) == [{"sentence": "a", "label": 1}, {"sentence": "b", "label": 0}]
    lines_as_json = data_file(tmp_path, "l.json", JSONL.encode())
    assert read_file(lines_as_json) == ROWS
    ragged = data_file(tmp_path, "r.jsonl", b'{"a": 1}\n{"b": 2}\n')  # missing cells are null, as in datasets
    assert read_file(ragged) == [{"a": 1, "b": None}, {"a": None, "b": 2}]
    with pytest.raises(UserError, match="found a JSON string"):
        read_file(data_file(tmp_path, "s.json", b'"text"'))


def test_mmlu_csv_with_a_bom_and_latin1(tmp_path):
    from memft.eval import mmlu

    path = data_file(tmp_path, "anatomy_dev.csv", codecs.BOM_UTF8 + b"What?,a,b,c,d,A\n")
    assert mmlu.read_csv(path)[0].question == "What?"
    path.write_bytes("Caf\u00e9?,a,b,c,d,A\n".encode("latin-1"))
    with pytest.raises(UserError, match="MMLU file .* is not UTF-8 text: .* byte offset 3 "):
        mmlu.read_csv(path)


# ---------------------------------------------------------------------------- found by tests/test_fuzz.py


def test_a_cell_longer_than_csvs_default_limit_is_read(tmp_path):
    from memft.data.sources import read_file

    long = "word " * 40_000  # 200 KB: over csv's default field limit of 128 KiB
    rows = read_file(data_file(tmp_path, "d.tsv", f"sentence\tlabel\n{long}\t1\nshort\t0\n".encode()))
    assert rows == [{"sentence": long, "label": 1}, {"sentence": "short", "label": 0}]


def test_a_broken_csv_row_names_the_file_and_line(tmp_path):
    from memft.data.sources import read_file

    path = data_file(tmp_path, "d.csv", b'sentence,label\n"ok",1\n"a\x00b",0\n')
    with pytest.raises(UserError, match=r"(line 3: not a valid CSV row|NUL)"):
        read_file(path)


@pytest.mark.parametrize("name", [{"lora": 1}, ["lora"], 3])
def test_a_strategy_name_that_is_not_a_string_is_one_problem(tmp_path, name):
    path = recipe(tmp_path, json.dumps({"strategies": [{"name": name}]}))
    assert any("strategies.0.name" in p for p in problems(path))


def test_memft_recipes_lists_a_recipe_it_cannot_decode(tmp_path, monkeypatch):
    import memft.paths

    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "latin.yaml").write_bytes("description: caf\u00e9\n".encode("latin-1"))
    (recipes / "list.yaml").write_text("- a\n- b\n")
    monkeypatch.setattr(memft.paths, "RECIPES_DIR", recipes)
    result = CliRunner().invoke(app, ["recipes"])
    assert result.exit_code == 0 and "Traceback" not in result.output
    assert "latin.yaml" in result.output and "list.yaml" in result.output


@pytest.mark.parametrize("body", [b"{not json", "{\"model_type\": \"llama\"}".encode("utf-16-le"), b"[1, 2]"])
def test_a_damaged_config_json_is_one_sentence(tmp_path, body):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_bytes(body)
    result = CliRunner().invoke(app, ["eval", "mmlu", "--model", str(tmp_path / "m"), "--data", str(tmp_path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "config.json" in " ".join(result.output.split())


def test_a_damaged_recipe_yaml_in_a_run_directory_is_one_sentence(tmp_path):
    run = tmp_path / "run"
    tiny = ["data.max_samples=8", "data.max_length=128", "data.eval_split=null", "train.max_steps=1",
            "train.batch_size=2", "log.progress=false", "output.plot=false"]
    assert CliRunner().invoke(app, ["train", "recipes/lora.yaml", "-o", str(run), *tiny]).exit_code == 0
    for body in ("model: [unclosed\n", "- just\n- a list\n", "model: {name: 3, nme: x}\n"):
        (run / "recipe.yaml").write_text(body)
        for args in (["eval", "mmlu", "--model", str(run), "--data", str(tmp_path)],
                     ["export", str(run), str(tmp_path / "out")]):
            result = CliRunner().invoke(app, args)
            assert result.exit_code == 2 and "Traceback" not in result.output, (args, result.output)
            assert "recipe.yaml" in " ".join(result.output.split())
