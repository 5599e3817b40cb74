"""`memft profile --gpu-memory`: the advice is as exact as profiling each change alone, complete and scriptable."""

import dataclasses
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memft.cli import app
from memft.profile import advice, predict
from memft.recipe import load

REPO = Path(__file__).resolve().parents[1]
BASE = ["model.name=tiny-llama", "strategies=[{name: full}]", "train.batch_size=2", "data.max_length=96"]


def load_with(extra):
    return load(REPO / "recipes" / "lora.yaml", extra)


def forecast(extra):
    return predict.profile(load_with(extra), "cpu")


def from_scratch(extra):
    predict._FITS.clear()  # nothing reused from another change's prediction
    predict._SKELETONS.clear()
    return forecast(extra)


def rows(ranked):
    return [(c.label, c.overrides, c.note, q.to_json()) for c, q in ranked]


@pytest.mark.parametrize("extra", [(), ("model.name=tiny-mixtral", "strategies=[{name: lora, params: {r: 8}}]")])
def test_cached_advice_equals_predicting_each_change_from_scratch(extra):
    # a MoE model too: building its skeleton changes its config, which the fits are keyed by
    overrides = [*BASE, *extra]
    r = load_with(overrides)
    base = from_scratch(overrides)
    cached = advice.rank(r, overrides, 1, forecast, base=base)
    assert len(cached) >= 5
    assert rows(cached) == rows(advice.rank(r, overrides, 1, from_scratch, base=base))
    if extra:
        return
    budget = cached[0][1].peak - 1  # no single change fits: the combination too must not depend on the caches
    combined = advice.combine(load_with, overrides, budget, forecast, cached)
    assert combined is not None
    assert rows([combined]) == rows([advice.combine(load_with, overrides, budget, from_scratch, cached)])


def test_variants_of_the_batch_or_the_optimizer_fit_and_build_nothing_new():
    forecast(BASE)
    fits, skeletons = len(predict._FITS), len(predict._SKELETONS)
    for extra in (["train.optimizer=adamw_8bit"], ["train.batch_size=1", "train.grad_accum=2"]):
        forecast([*BASE, *extra])
    assert (len(predict._FITS), len(predict._SKELETONS)) == (fits, skeletons)


def test_float32_recipes_are_offered_bf16_weights():
    changes = {c.label: c for c in advice.candidates(load_with(BASE))}
    bf16 = changes["bf16 weights"]
    assert bf16.overrides == ["model.dtype=bfloat16"] and bf16.cost.startswith("bf16 weights")
    assert "small ones are lost" in bf16.cost  # full fine-tuning: the trained weights themselves are bf16
    lora = advice.candidates(load_with([*BASE, "strategies=[{name: lora}]"]))
    assert next(c.cost for c in lora if c.label == "bf16 weights") == "bf16 weights"
    assert "bf16 weights" not in {c.label for c in advice.candidates(load_with([*BASE, "model.dtype=bfloat16"]))}
    base, half = forecast(BASE), forecast([*BASE, *bf16.overrides])
    assert half.weight_bytes < 0.51 * base.weight_bytes and half.peak < base.peak  # float32 buffers (RoPE) stay


def test_a_combination_is_shown_even_when_it_does_not_fit_either():
    singles = advice.rank(load_with(BASE), BASE, 1, forecast)  # nothing fits 1 byte
    change, p = advice.combine(load_with, BASE, 1, forecast, singles)
    assert change.combined and change.label.count(" + ") == 2  # three changes, the most combine tries
    assert p.peak < singles[0][1].peak and forecast([*BASE, *change.overrides]).peak == p.peak


def test_a_change_that_saves_nothing_says_why():
    base = forecast(BASE)
    same = advice.rank(load_with(BASE), BASE, 1, lambda extra: base, base=base)
    assert same and all(c.note.startswith("saves nothing here") for c, _ in same)
    worse = dataclasses.replace(base, activations=base.activations + 2**20, gradients=base.gradients - 1)
    assert advice.no_saving(base, worse) == "raises the peak here: more activations outweigh less gradients"
    bounded = dataclasses.replace(base, notes=["tokentune: activations shown without token selection, an upper "
                                               "bound (the fit with selection is not reliable yet)"])
    assert "bound without token selection" in advice.no_saving(base, bounded)
    barely = dataclasses.replace(base, backward_transient=base.backward_transient - base.peak // 200)
    assert advice.no_saving(base, barely).startswith("saves under 1% here")
    for c, q in advice.rank(load_with(BASE), BASE, 1, forecast, base=base):
        if q.peak > 0.99 * base.peak:
            assert c.note, c.label
        elif not any("upper bound" in n for n in q.notes):
            assert not c.note, c.label


def test_json_holds_the_ranked_advice_and_the_combination(tmp_path):
    out = tmp_path / "p.json"
    result = CliRunner().invoke(app, ["profile", "recipes/lora.yaml", *BASE, "--device", "cpu", "--gpu-memory", "1",
                                      "--json", str(out)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert saved["budget"] == 1 and saved["fits"] is False and saved["peak"] > 1
    rows = saved["advice"]
    assert rows[0]["combined"] and " + " in rows[0]["label"] and not any(r["combined"] for r in rows[1:])
    for row in rows:
        assert set(row) == {"label", "overrides", "cost", "peak", "fits", "note", "combined"}
        assert row["fits"] is False and all(isinstance(o, str) and "=" in o for o in row["overrides"])
        assert row["label"][:12] in result.output  # the table's cells wrap
    assert [r["peak"] for r in rows[1:]] == sorted(r["peak"] for r in rows[1:])
    assert forecast([*BASE, *rows[1]["overrides"]]).peak == rows[1]["peak"]  # each row reproduces as pasted

    fits = CliRunner().invoke(app, ["profile", "recipes/lora.yaml", *BASE, "--device", "cpu", "--gpu-memory", "80GiB",
                                    "--json", str(out)])
    assert fits.exit_code == 0 and json.loads(out.read_text())["advice"] == []
