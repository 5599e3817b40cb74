"""The recipe schema and the strategy registry: every error class, reported together, with paths and lines."""

from pathlib import Path

import pytest

from memft import registry
from memft.errors import RecipeError
from memft.recipe import load, parse_override, schema_rows, validate

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def problems(tmp_path, text, overrides=()) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load(write(tmp_path, text), overrides)
    return info.value.problems


def test_every_builtin_recipe_is_valid():
    recipes = sorted((REPO / "recipes").glob("*.yaml"))
    assert len(recipes) >= 5
    for path in recipes:
        r = load(path)
        assert r.description, f"{path.name} needs a description for `memft recipes`"
        assert Path(r.data.source).exists(), f"{path.name}: data resolved to {r.data.source}"


def test_defaults_and_overrides_parse_as_yaml(tmp_path):
    r = load(write(tmp_path, "strategies: [{name: lora}]\n"),
             ["train.lr=1e-4", "strategies.0.params.r=16", "train.max_grad_norm=null", "data.eval_split=0.1"])
    assert r.train.lr == 1e-4 and isinstance(r.train.lr, float)
    assert r.strategies[0].params == {"r": 16}
    assert r.train.max_grad_norm is None
    assert r.data.eval_split == 0.1
    assert r.output.dir == "runs/r"  # {recipe} is the file's stem
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])


def test_all_errors_at_once_with_path_value_line_and_suggestion(tmp_path):
    text = (
        "model:\n"
        "  name: stories260K\n"
        "  dtyp: float32\n"            # line 3: unknown key, close to `dtype`
        "train:\n"
        "  lr: -1\n"                   # line 5: must be > 0
        "  batch_size: many\n"         # line 6: not an int
        "strategies:\n"
        "  - name: lora\n"
        "    params: {r: 0, lora_rnak: 4}\n"  # line 9: strategy params errors
    )
    found = problems(tmp_path, text)
    joined = "\n".join(found)
    assert "`model.dtyp`: unknown key; did you mean `dtype`?  [line 3]" in joined
    assert "`train.lr`" in joined and "greater than 0" in joined and "(got -1)" in joined and "[line 5]" in joined
    assert "`train.batch_size`" in joined and "'many'" in joined and "[line 6]" in joined
    # strategy params are validated by the strategy's own model, with the full path
    assert "`strategies.0.params.r`" in joined and "[line 9]" in joined
    assert "`strategies.0.params.lora_rnak`: unknown key; did you mean `r`?" in joined or \
        "`strategies.0.params.lora_rnak`: unknown key" in joined
    assert len(found) >= 5


def test_unknown_strategy_gets_did_you_mean(tmp_path):
    found = problems(tmp_path, "strategies:\n  - name: lorra\n")
    assert found == ["`strategies.0.name`: unknown strategy 'lorra'; did you mean `lora`?  [line 2]"]


def test_impossible_combinations_are_user_errors(tmp_path):
    found = problems(tmp_path, "strategies: [{name: full}, {name: lora}]\n")
    assert any("`full` and `lora` cannot be combined" in p for p in found)
    found = problems(tmp_path, "strategies: [{name: lora}, {name: qlora}]\n")
    assert any("cannot be combined" in p for p in found)
    found = problems(tmp_path, "strategies: [{name: lora}, {name: lora}]\n")
    assert any("listed twice" in p for p in found)
    found = problems(tmp_path, "model: {dtype: float64}\nstrategies: [{name: qlora}]\n")
    assert any("float64" in p and "qlora" in p for p in found)
    found = problems(tmp_path, "data: {format: classification}\n")
    assert any("sequence_classification" in p for p in found)


def test_nothing_to_train_is_refused(tmp_path):
    assert any("nothing would train" in p for p in problems(tmp_path, "strategies: []\n"))


def test_missing_data_file_is_reported(tmp_path):
    found = problems(tmp_path, "data:\n  source: nowhere/train.jsonl\n")
    assert found == ["`data.source`: file not found (got 'nowhere/train.jsonl')  [line 2]"]


def test_yaml_syntax_and_shape_errors(tmp_path):
    found = problems(tmp_path, "model: {name: x\ntrain: [")
    assert len(found) == 1 and "not valid YAML at line" in found[0]
    assert "must be a mapping" in problems(tmp_path, "- 1\n- 2\n")[0]


def test_bad_override_syntax(tmp_path):
    with pytest.raises(RecipeError, match="key.path=value"):
        load(write(tmp_path, "{}\n"), ["train.lr"])
    with pytest.raises(RecipeError, match="not an item of a list"):
        load(write(tmp_path, "strategies: [{name: full}]\n"), ["strategies.3.params.r=4"])


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="no such recipe file"):
        load(tmp_path / "absent.yaml")


def test_builtin_recipe_by_name():
    assert load("quickstart").model.name == "stories260K"


def test_registry_refuses_duplicate_names():
    class Fake(registry.Strategy):
        name = "full"

    with pytest.raises(KeyError, match="already a strategy called 'full'"):
        registry.register(Fake)


def test_compose_orders_strategies():
    r = validate({"strategies": [{"name": "lora", "params": {"r": 4}}]})
    [s] = registry.compose(r)
    assert s.name == "lora" and s.params.r == 4


def test_schema_lists_every_field_with_help():
    rows = {path: (typ, default, help_) for path, typ, default, help_ in schema_rows()}
    for path in ("model.name", "data.format", "train.lr", "train.gradient_checkpointing", "output.resume",
                 "log.every", "strategies"):
        assert path in rows
        assert rows[path][2], f"{path} has no help text"
    assert rows["train.lr"][1] == "0.0002"


def test_conflicts_are_found_in_either_order(tmp_path):
    for pair in ("[{name: lora}, {name: full}]", "[{name: qlora}, {name: full}]", "[{name: qlora}, {name: lora}]"):
        found = problems(tmp_path, f"strategies: {pair}\n")
        assert sum("cannot be combined" in p for p in found) == 1, (pair, found)


def test_bad_regular_expressions_are_reported_with_their_field(tmp_path):
    found = problems(tmp_path, "strategies:\n  - name: full\n    params: {freeze: ['(']}\n")
    assert len(found) == 1 and "`strategies.0.params.freeze`" in found[0] and "not a regular expression" in found[0]


def test_cuda_attention_kernels_are_named_and_refused_where_they_cannot_run(monkeypatch):
    import importlib.util

    from memft.errors import RecipeError, UserError
    from memft.train.loop import Trainer

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))
    with pytest.raises(RecipeError, match="`flash_attention_2` needs the `flash-attn` package"):
        load(REPO / "recipes" / "quickstart.yaml", ["model.attn_implementation=flash_attention_2"])
    r = load(REPO / "recipes" / "quickstart.yaml", ["model.attn_implementation=flex_attention", "model.device=cpu"])
    with pytest.raises(UserError, match="runs on CUDA only"):
        Trainer(r, run_dir="unused").setup(for_training=False)
    from memft.profile import predict

    flex, plain = predict.profile(r, "cuda"), predict.profile(load(REPO / "recipes" / "quickstart.yaml"), "cuda")
    assert flex.peak == plain.peak and any("fitted with `sdpa`" in n for n in flex.notes)
