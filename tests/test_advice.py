"""`memft profile --gpu-memory`: the advice is as exact as profiling each change alone, complete and scriptable."""

import contextlib
import dataclasses
import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memft.cli import app
from memft.errors import UserError
from memft.profile import activations, advice, predict
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
    # the new full fine-tuning levers reuse the recipe's fit and skeleton-free parts, yet equal a fresh prediction
    labels = {c.label for c, _ in cached}
    assert {"AdamW state in host memory", "optimizer step in backward", "bf16 weights, stochastic rounding"} <= labels
    budget = cached[0][1].peak - 1  # no single change fits: the combinations too must not depend on the caches
    combined = advice.combinations(load_with, overrides, budget, forecast, cached, base=base)
    assert combined and all(c.combined for c, _ in combined)
    assert rows(combined) == rows(advice.combinations(load_with, overrides, budget, from_scratch, cached, base=base))


def test_variants_of_the_batch_or_the_optimizer_fit_and_build_nothing_new():
    forecast(BASE)
    fits, skeletons = len(predict._FITS), len(predict._SKELETONS)
    for extra in (["train.optimizer=adamw_8bit"], ["train.batch_size=1", "train.grad_accum=2"]):
        forecast([*BASE, *extra])
    assert (len(predict._FITS), len(predict._SKELETONS)) == (fits, skeletons)
    # where the optimizer keeps or steps its state, or how it rounds, changes no saved tensor and no module either:
    # the recipe's fit and skeleton are reused
    for extra in (["train.optimizer_state=host"], ["train.optimizer_in_backward=true", "train.max_grad_norm=null"]):
        forecast([*BASE, *extra])
    assert (len(predict._FITS), len(predict._SKELETONS)) == (fits, skeletons)
    forecast([*BASE, "model.dtype=bfloat16"])
    fits, skeletons = len(predict._FITS), len(predict._SKELETONS)
    forecast([*BASE, "model.dtype=bfloat16", "train.precision=bf16_stochastic_rounding"])
    assert (len(predict._FITS), len(predict._SKELETONS)) == (fits, skeletons)


LEVERS = {"bf16 weights, stochastic rounding": ["model.dtype=bfloat16", "train.precision=bf16_stochastic_rounding"],
          "AdamW state in host memory": ["train.optimizer_state=host"],
          "optimizer step in backward": ["train.optimizer_in_backward=true", "train.max_grad_norm=null"]}
"""The full fine-tuning levers advice offers a float32 AdamW recipe with clipping (`recipes/lora.yaml`'s training)."""


@pytest.mark.parametrize("strategies", ["[{name: full}]", "[{name: full}, {name: revffn}]",
                                        "[{name: full}, {name: tokentune}]"])
def test_full_fine_tuning_is_offered_its_levers_and_each_validates(strategies):
    overrides = [*BASE, f"strategies={strategies}"]
    changes = {c.label: c for c in advice.candidates(load_with(overrides))}
    assert {label: changes[label].overrides for label in LEVERS} == LEVERS
    for label in LEVERS:
        r = load_with([*overrides, *changes[label].overrides])  # the loader `memft profile` and `train` use
        assert changes[label].same_training
    assert (r.train.optimizer_in_backward, r.train.max_grad_norm) == (True, None)
    assert "global-norm clipping" in changes["optimizer step in backward"].cost
    assert "norm is still logged" in changes["optimizer step in backward"].cost
    assert "on the CPU" in changes["AdamW state in host memory"].cost
    assert "bf16_stochastic_rounding" in changes["bf16 weights"].cost  # where the plain bf16 change loses updates


def test_the_levers_follow_what_the_recipe_already_has():
    def offered(*extra):
        return {c.label: c.overrides for c in advice.candidates(load_with([*BASE, *extra]))}

    lora = offered("strategies=[{name: lora}]")
    assert not set(LEVERS) & set(lora) and "stochastic rounding" not in lora  # adapters train in float32 anyway
    assert offered("model.dtype=bfloat16")["stochastic rounding"] == ["train.precision=bf16_stochastic_rounding"]
    assert offered("train.max_grad_norm=null")["optimizer step in backward"] == ["train.optimizer_in_backward=true"]
    assert "optimizer step in backward" not in offered("train.grad_accum=2")  # validate refuses it with accumulation
    eight = offered("train.optimizer=adamw_8bit")
    assert eight["AdamW state in host memory (instead of 8-bit AdamW)"] == ["train.optimizer=adamw",
                                                                          "train.optimizer_state=host"]
    assert "bf16 weights, stochastic rounding" not in eight  # memft's own AdamW step: needs `optimizer: adamw`
    load_with([*BASE, "train.optimizer=adamw_8bit", "train.optimizer=adamw", "train.optimizer_state=host"])
    host = offered("train.optimizer_state=host")
    assert "8-bit AdamW" not in host and "bf16 weights, stochastic rounding" not in host  # both need device state
    assert "keep every update" in advice.candidates(load_with([*BASE, "train.optimizer_state=host"]))[0].cost
    stepped = offered("train.optimizer_in_backward=true", "train.max_grad_norm=null")
    assert not any(label.startswith(("micro-batch", "LCSB")) for label in stepped)  # validate refuses both with it
    assert "optimizer step in backward" not in offered("strategies=[{name: full}, {name: lcsb}]")


def test_host_state_says_the_host_memory_it_takes():
    base = forecast(BASE)
    ranked = dict((c.label, (c, q)) for c, q in advice.rank(load_with(BASE), BASE, 1, forecast, base=base))
    change, q = ranked["AdamW state in host memory"]
    trainable = q.trainable_params
    assert q.host == {"optimizer state (host)": q.host["optimizer state (host)"]} and q.optimizer_state == 0
    assert q.host["optimizer state (host)"] >= 12 * trainable  # float32 master, two moments
    assert change.cost.endswith(f"({advice.fmt_bytes(sum(q.host.values()))} more host memory)")
    assert not ranked["8-bit AdamW"][0].host and "host memory)" not in ranked["8-bit AdamW"][0].cost
    stepped, r = ranked["optimizer step in backward"]
    assert r.gradients < base.gradients and r.optimizer_in_backward


def test_twins_measured_on_two_processes_fit_the_same_coefficients():
    # expert LoRA on a routed MoE: the saved bytes follow the routing, so they are equal only if every twin computes
    # the same values in a worker as here
    r = load_with(["model.name=tiny-mixtral", "strategies=[{name: lora, params: {r: 8}}]", "data.max_length=32"])
    config, _, strategies, _ = predict.cached_skeleton(r, predict.resolve_config(
        r.model, fallback=predict.shipped_config).config)
    leading = activations.leading_layers(config)
    assert leading is not None and all(s.depth_uniform for s in strategies)
    with predict.one_thread():
        fits = [activations.fit(predict.twin_measure(r, contextlib.nullcontext()), config, max_seq=32, by_depth=True,
                                leading=leading, workers=workers) for workers in (1, 2)]
    assert fits[0] == fits[1] and fits[0].residual < 0.05


def test_measure_all_keeps_the_order_runs_in_workers_and_raises_here(monkeypatch):
    # whatever threads earlier tests left behind: this measure takes no lock a fork could copy held
    monkeypatch.setattr(activations, "_safe_to_fork", lambda: True)

    def measure(config, shapes, twin):
        if config == "bad":
            raise UserError(f"twin {twin} cannot be built")
        return [(os.getpid(), twin)]

    jobs = [(None, [(1, 8)], twin) for twin in range(5)]
    out = activations.measure_all(measure, jobs, workers=2)
    assert [twin for [(_, twin)] in out] == list(range(5)) and os.getpid() not in {pid for [(pid, _)] in out}
    assert activations.measure_all(measure, jobs, workers=1) == [[(os.getpid(), twin)] for twin in range(5)]
    with pytest.raises(UserError, match="twin 3 cannot be built"):  # measured again here: the caller's own error
        activations.measure_all(measure, [*jobs[:3], ("bad", [(1, 8)], 3)], workers=2)
    # another Python thread alive (it may hold a lock the fork would copy): no workers, everything runs here
    import threading

    monkeypatch.undo()
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        assert not activations._safe_to_fork()
        assert activations.measure_all(measure, jobs, workers=2) == [[(os.getpid(), twin)] for twin in range(5)]
    finally:
        stop.set()
        other.join()


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
    assert change.combined and change.label.count(" + ") == advice.MAX_CHANGES - 1  # the most combine tries
    assert p.peak < singles[0][1].peak and forecast([*BASE, *change.overrides]).peak == p.peak


def test_combining_never_undoes_an_earlier_change():
    # 8-bit AdamW first: host state (which needs `optimizer: adamw`) would silently replace it if merged on top
    first = next(c for c in advice.candidates(load_with(BASE)) if c.label == "8-bit AdamW")
    ranked = [(first, forecast([*BASE, *first.overrides]))]
    change, _ = advice.combine(load_with, BASE, 1, forecast, ranked, same_training=True)
    assert "train.optimizer=adamw_8bit" in change.overrides and "train.optimizer=adamw" not in change.overrides
    assert "AdamW state in host memory" not in change.label
    keys = [o.split("=", 1)[0] for o in change.overrides]
    assert len(keys) == len(set(keys)) and change.label.startswith("8-bit AdamW + ")


LLAMA_SHAPED = ["model.name=tiny-llama", "strategies=[{name: full}]", "train.batch_size=1", "data.max_length=96"]
"""Full fine-tuning of a float32 Llama at one sequence, with AdamW and clipping: Meta-Llama-3-8B's advice at 1 x 2048
tokens in miniature (its weights, gradients and AdamW state outweigh its activations, as the 8B model's do)."""
FULL_BUDGET = ["model.dtype=bfloat16", "train.optimizer_state=host", "train.optimizer_in_backward=true",
               "train.max_grad_norm=null", "train.gradient_checkpointing=true"]
"""docs/strategies/full.md's 17.7 GiB for Meta-Llama-3-8B: bf16, host state, the step in backward, checkpointing."""


def test_the_combination_that_keeps_full_fine_tuning_finds_all_four_levers():
    r = load_with(LLAMA_SHAPED)
    base, target = forecast(LLAMA_SHAPED), forecast([*LLAMA_SHAPED, *FULL_BUDGET])
    assert target.peak < 0.2 * base.peak
    same = [c for c in advice.candidates(r) if c.same_training]  # what the search below may use (fast to profile)
    ranked = sorted(((c, forecast([*LLAMA_SHAPED, *c.overrides])) for c in same), key=lambda cq: cq[1].peak)
    assert all(q.peak > target.peak for _, q in ranked)  # no single change is enough, nor any three: see below
    change, q = advice.combine(load_with, LLAMA_SHAPED, target.peak, forecast, ranked, same_training=True, base=base)
    assert change.combined and change.same_training and change.label.count(" + ") == 3
    assert sorted(change.overrides) == sorted(FULL_BUDGET) and q.peak == target.peak
    assert "more host memory)" in change.cost and "norm is still logged" in change.cost
    assert "keep every update" in change.cost and "small ones are lost" not in change.cost  # bf16 beside host state
    load_with([*LLAMA_SHAPED, *change.overrides])  # it validates as pasted
    three = advice.combine(load_with, LLAMA_SHAPED, target.peak, forecast, ranked, same_training=True, max_changes=3)
    assert three[1].peak > target.peak  # four changes are needed: the default allows them


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
    result = CliRunner().invoke(app, ["profile", "recipes/lora.yaml", *LLAMA_SHAPED, "--device", "cpu", "--gpu-memory",
                                      "1", "--json", str(out)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert saved["budget"] == 1 and saved["fits"] is False and saved["peak"] > 1
    rows = saved["advice"]
    combined = [r for r in rows if r["combined"]]
    assert rows[:len(combined)] == combined and all(" + " in r["label"] for r in combined)
    # the best combination, and the best that keeps training the full weights (bf16, host state, in backward, ...)
    assert [r["same_training"] for r in combined] in ([False, True], [True, False], [True])
    kept = next(r for r in combined if r["same_training"])
    assert {"train.optimizer_state=host", "train.optimizer_in_backward=true"} <= set(kept["overrides"])
    singles = rows[len(combined):]
    for row in rows:
        assert set(row) == {"label", "overrides", "cost", "peak", "fits", "note", "combined", "same_training"}
        assert row["fits"] is False and all(isinstance(o, str) and "=" in o for o in row["overrides"])
        assert row["label"][:12] in result.output  # the table's cells wrap
    assert [r["peak"] for r in singles] == sorted(r["peak"] for r in singles)
    by_label = {r["label"]: r for r in singles}
    for label, overrides in LEVERS.items():
        assert by_label[label]["overrides"] == overrides
    assert "more host memory)" in by_label["AdamW state in host memory"]["cost"]
    for row in (singles[0], kept):  # each row reproduces as pasted
        assert forecast([*LLAMA_SHAPED, *row["overrides"]]).peak == row["peak"]

    fits = CliRunner().invoke(app, ["profile", "recipes/lora.yaml", *LLAMA_SHAPED, "--device", "cpu", "--gpu-memory",
                                    "80GiB", "--json", str(out)])
    assert fits.exit_code == 0 and json.loads(out.read_text())["advice"] == []
