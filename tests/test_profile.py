"""`memft profile`: weights, gradients and optimizer state exact; activations within 10% of measured."""

import contextlib
import json
import os
from pathlib import Path

import pytest
import torch

from memft import registry
from memft.models.load import resolve_config
from memft.profile import activations, advice, predict
from memft.recipe import load

REPO = Path(__file__).resolve().parents[1]


def recipe(model: str, strategies: str, *extra: str):
    return load(REPO / "recipes" / "lora.yaml", [f"model.name={model}", f"strategies={strategies}",
                                                 "train.batch_size=2", "data.max_length=96", *extra])


STATE_CASES = [
    ("tiny-llama", "[{name: full}]", ()),
    ("tiny-llama", "[{name: full}]", ("model.dtype=bfloat16", "train.precision=bf16_stochastic_rounding")),
    ("tiny-mixtral", "[{name: lora, params: {r: 4}}]", ("model.dtype=bfloat16",)),
    ("tiny-qwen2-moe", "[{name: full}]", ("train.optimizer=adamw_8bit",)),
    ("stories260K", "[{name: qlora}]", ()),
    ("stories260K", "[{name: qlora, params: {double_quant: false}}]", ()),
    ("tiny-mixtral", "[{name: full, params: {freeze: ['.*embed.*']}}, {name: revffn}]", ()),
    ("tiny-llama", "[{name: meft, params: {width: 256, experts: 16}}]", ()),
]


@pytest.mark.parametrize("model,strategies,extra", STATE_CASES)
def test_weights_gradients_and_optimizer_state_are_exact(model, strategies, extra):
    r = recipe(model, strategies, *extra)
    config = resolve_config(r.model).config
    skeleton, built, quantized = predict.skeleton(r, config)
    predicted = predict.state_bytes(skeleton, quantized, r, double_quant=predict.double_quantized(built, r))
    measured = predict.measure(r)
    assert sum(predicted["weights"].values()) == measured["weight_bytes"]
    assert predicted["gradients"] == measured["gradient_bytes"]
    assert predicted["optimizer_state"] == measured["optimizer_bytes"]


ACTIVATION_CASES = [
    ("tiny-llama", "[{name: full}]", ()),
    ("tiny-llama", "[{name: qlora}]", ()),
    ("tiny-llama", "[{name: full}]", ("train.gradient_checkpointing=true",)),
    ("tiny-llama", "[{name: lora}, {name: revffn, params: {coupling: momentum, buffer_every: 2}}]", ()),
    ("tiny-mixtral", "[{name: lora}]", ()),
    ("tiny-mixtral", "[{name: lora}, {name: lcsb, params: {groups: 2}}]", ()),
    # LCSB fitted on twins one and two blocks of `groups` layers deep (depth_block): contiguous, strided, random
    ("tiny-llama", "[{name: full}, {name: lcsb, params: {groups: 4}}]", ()),
    ("tiny-llama", "[{name: lora}, {name: lcsb, params: {groups: 2, partition: strided}}]", ()),
    ("tiny-llama", "[{name: full}, {name: lcsb, params: {groups: 4, schedule: random}}]", ("train.seed=3",)),
    ("tiny-mixtral", "[{name: full}, {name: revffn}]", ()),
    ("tiny-qwen2-moe", "[{name: full}]", ("train.gradient_checkpointing=true",)),
    ("tiny-olmoe", "[{name: lora}]", ("model.dtype=bfloat16",)),
    ("tiny-llama", "[{name: full}]", ("train.autocast=bf16",)),  # saves bf16 copies of the fp32 weights too
    ("tiny-mixtral", "[{name: lora}]", ("train.autocast=bf16",)),
    # a dense first layer (DeepSeek-MoE's pattern): twins at depths 2 and 3, the dense layer in the rest
    ("tiny-qwen2-moe", "[{name: lora}]", ("model.config_overrides={mlp_only_layers: [0]}",)),
]


@pytest.mark.parametrize("model,strategies,extra", ACTIVATION_CASES)
def test_predicted_activations_are_within_10_percent_of_measured(model, strategies, extra):
    """One fit on small twins, checked against real saved-tensor bytes at three batch shapes, none of them a twin."""
    r = recipe(model, strategies, *extra)
    config = resolve_config(r.model).config
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if r.train.autocast == "bf16" else contextlib.nullcontext()
    partial = "tokentune" in strategies
    fit = predict.fit_activations(r, config, registry.compose(r), autocast, partial_gradients=partial)
    real = predict.twin_measure(r, autocast, vary=False)
    widths = activations.Widths.of(config)
    shapes = [(1, 80), (2, 128), (4, 200)]
    for (batch, seq), (measured, grad_tokens) in zip(shapes, real(config, shapes)):
        assert (grad_tokens is not None) == partial
        predicted, logits = fit.predict(widths, batch, seq, grad_tokens)
        assert abs(predicted / measured - 1) <= 0.10, (batch, seq, predicted, measured)
        # the chunked losses (plain, TokenTune's selected rows, RevFFN's distillation) keep no B x S x V tensor
        assert abs(logits) <= 0.02 * predicted


def test_profile_matches_a_real_step_of_the_recipe():
    r = recipe("tiny-mixtral", "[{name: lora}]")
    p = predict.profile(r, "cpu")
    m = predict.measure(r)
    assert abs(p.activations / m["activation_bytes"] - 1) <= 0.10
    assert (p.weight_bytes, p.gradients, p.optimizer_state) == (m["weight_bytes"], m["gradient_bytes"],
                                                                m["optimizer_bytes"])
    assert p.head_gradient == 0  # LoRA freezes the head


def test_the_peak_is_the_fullest_moment_of_backward_and_gradients_stay_under_accumulation():
    one, two = (predict.profile(recipe("tiny-llama", "[{name: full}]", f"train.grad_accum={k}"), "cpu") for k in (1, 2))
    head = 512 * 64 * 4  # tiny-llama's lm_head (vocab x hidden), float32
    assert one.head_gradient == two.head_gradient == head and one.activations == two.activations
    start = one.activations + one.backward_transient + head
    fixed = one.weight_bytes + one.optimizer_state + one.per_layer
    assert one.peak == fixed + max(start, one.gradients)
    assert two.peak == fixed + start + two.gradients > one.peak


def test_shipped_configs_of_popular_models_profile_offline():
    r = load(REPO / "recipes" / "lora.yaml", ["model.name=meta-llama/Meta-Llama-3-8B", "model.dtype=bfloat16",
                                              "data.max_length=1024", "train.batch_size=1"])
    p = predict.profile(r, "cuda")
    assert p.params > 8_030_000_000 and p.source.endswith("(config shipped with memft)")
    assert p.weights["bfloat16"] == 2 * 8_030_261_248  # the base; LoRA's adapters are float32
    # 1,024 tokens of a 32-layer model, at least the residual stream and the FFN input per layer in bf16
    assert p.activations > 32 * 1024 * 4096 * 2 * 2
    assert set(predict.list_shipped()) >= {"mistralai/Mixtral-8x7B-v0.1", "Qwen/Qwen3-30B-A3B", "Qwen/Qwen2.5-7B",
                                           "allenai/OLMoE-1B-7B-0924", "google-bert/bert-large-uncased"}


def test_budget_parsing():
    assert advice.parse_bytes("24GiB") == 24 * 2**30 and advice.parse_bytes("80GB") == 80 * 10**9
    assert advice.parse_bytes("512M") == 512 * 2**20 and advice.parse_bytes("1000") == 1000
    from memft.errors import UserError

    with pytest.raises(UserError, match="24GiB"):
        advice.parse_bytes("lots")


def test_cli_profile_fit_advice_and_json(tmp_path):
    from typer.testing import CliRunner

    from memft.cli import app

    out = tmp_path / "p.json"
    result = CliRunner().invoke(app, ["profile", "recipes/lora.yaml", "model.name=tiny-llama", "data.max_length=128",
                                      "strategies=[{name: full}]", "--gpu-memory", "4MiB", "--json", str(out)],
                                    env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "predicted peak" in result.output and "does not fit" in result.output
    assert "gradient checkpointing" in result.output and "LoRA instead of full" in result.output
    saved = json.loads(out.read_text())
    assert saved["peak"] > 4 * 2**20 and saved["activations"] > 0 and saved["weights"]["float32"] > 0
    bad = CliRunner().invoke(app, ["profile", "recipes/lora.yaml", "--gpu-memory", "lots"])
    assert bad.exit_code == 2 and "24GiB" in bad.output


def test_advice_offers_leaving_the_experts_out_on_moe():
    # memft's expert LoRA saves fewer activations than frozen eager experts (0.8x on tiny-mixtral), so leaving the
    # experts out pays only where their factors' state outweighs that: from r=8 here (at r=4 it does not)
    r = recipe("tiny-mixtral", "[{name: lora, params: {r: 8}}]")
    changes = {c.label: c for c in advice.candidates(r, moe=True)}
    assert "target_experts: False" in changes["lora without the routed experts"].overrides[0]
    assert "lora without the routed experts" not in {c.label for c in advice.candidates(r, moe=False)}
    lean = load(REPO / "recipes" / "lora.yaml", ["model.name=tiny-mixtral", "train.batch_size=2", "data.max_length=96",
                                                 *changes["lora without the routed experts"].overrides])
    assert predict.profile(lean, "cpu").peak < predict.profile(r, "cpu").peak


def test_advice_ranks_fitting_changes_first():
    r = recipe("tiny-llama", "[{name: full}]")
    base = predict.profile(r, "cpu")
    budget = int(base.peak * 0.8)
    ranked = advice.rank(r, ["model.name=tiny-llama", "strategies=[{name: full}]", "train.batch_size=2",
                             "data.max_length=96"], budget,
                         lambda extra: predict.profile(load(REPO / "recipes" / "lora.yaml", extra), "cpu"))
    fits = [p.peak <= budget for _, p in ranked]
    assert any(fits) and fits == sorted(fits, reverse=True)  # every fitting change before every other one
    assert all(p.peak < base.peak for c, p in ranked if c.label == "gradient checkpointing")


def test_token_selection_is_predicted_or_bounded_never_underestimated():
    """TokenTune's own fit is not reliable yet: profile then shows the bound without selection, and says so."""
    r = recipe("tiny-llama", "[{name: full}, {name: tokentune, params: {fraction: 0.25}}]")
    p = predict.profile(r, "cpu")
    measured = predict.measure(r)["activation_bytes"]
    assert p.activations >= 0.9 * measured
    if p.activations > 1.1 * measured:
        assert any("upper bound" in n for n in p.notes)


def test_meft_host_memory_is_counted_exactly():
    r = recipe("tiny-llama", "[{name: meft, params: {width: 256, experts: 16}}]")
    p = predict.profile(r, "cpu")
    from memft.train.loop import Trainer

    t = Trainer(r, run_dir="unused").setup(for_training=False)
    hosts = t.strategies[-1].hosts
    real = sum(x.numel() * x.element_size() for h in hosts for group in (h.params, h.grads, h.exp_avg, h.exp_avg_sq,
                                                                         h.row_steps, h.touched)
               for x in group.values())
    assert p.host == {"meft adapters and AdamW state": real}


def test_advice_combines_changes_when_no_single_change_fits():
    base = ["model.name=tiny-llama", "strategies=[{name: full}]", "train.batch_size=2", "data.max_length=96"]
    load_with = lambda extra: load(REPO / "recipes" / "lora.yaml", extra)  # noqa: E731
    forecast = lambda extra: predict.profile(load_with(extra), "cpu")  # noqa: E731
    singles = advice.rank(load_with(base), base, 1, forecast)  # none fits 1 byte: ordered by peak
    budget = singles[0][1].peak - 1  # just below the best single change
    combined = advice.combine(load_with, base, budget, forecast, singles)
    assert combined is not None
    change, p = combined
    assert " + " in change.label and p.peak <= budget
    assert forecast([*base, *change.overrides]).peak == p.peak  # the printed overrides reproduce it


def test_leading_dense_layers_still_allow_fitting_by_depth():
    from transformers import AutoConfig

    qwen = AutoConfig.for_model("qwen2_moe")
    assert activations.leading_layers(qwen) == 0
    qwen.mlp_only_layers = [0, 1]
    assert activations.leading_layers(qwen) == 2
    qwen.mlp_only_layers = [3]  # a dense layer mid-stack: no repeating pattern to scale
    assert activations.leading_layers(qwen) is None
    qwen.mlp_only_layers, qwen.decoder_sparse_step = [], 2
    assert activations.leading_layers(qwen) is None


def test_revffn_auto_buffers_are_profiled_without_and_said():
    p = predict.profile(recipe("tiny-llama", "[{name: full}, {name: revffn}]"), "cpu")
    kept = 2 * 2 * 96 * 64 * 4  # two float32 streams of the micro-batch's tokens (2 x 96) at hidden 64
    assert any("buffer_every: auto" in n and f"{kept:,} bytes" in n for n in p.notes)


def _refuse_to_predict(monkeypatch):
    """The slow prediction must not start: the output path is checked first."""
    def never(*_, **__):
        raise AssertionError("predict.profile ran before --json was checked")

    monkeypatch.setattr(predict, "profile", never)


def _profile_cli(*args):
    from typer.testing import CliRunner

    from memft.cli import app

    result = CliRunner().invoke(app, ["profile", "recipes/lora.yaml", "model.name=tiny-llama", *map(str, args)])
    return result, " ".join(result.output.split())


def test_profile_json_to_a_directory_or_under_a_file_exits_2_before_predicting(tmp_path, monkeypatch):
    _refuse_to_predict(monkeypatch)
    (tmp_path / "a-file").write_text("x")
    for target, words in [(tmp_path, "is a directory, not a file"),
                          (tmp_path / "a-file" / "p.json", f"cannot be created: {tmp_path / 'a-file'} is a file")]:
        result, text = _profile_cli("--json", target)
        assert result.exit_code == 2, result.output
        assert f"`--json` {target}" in text and words in text and "Traceback" not in result.output


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only directory")
def test_profile_json_into_a_read_only_directory_exits_2_before_predicting(tmp_path, monkeypatch):
    _refuse_to_predict(monkeypatch)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    result, text = _profile_cli("--json", locked / "p.json")
    locked.chmod(0o700)
    assert result.exit_code == 2 and f"permission denied on {locked}" in text


def test_profile_device_is_cuda_or_cpu():
    from memft.errors import UserError

    result, text = _profile_cli("--device", "tpu")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "cannot profile for device `tpu`: memft trains on `cuda` or `cpu`" in text
    with pytest.raises(UserError, match="`cuda` or `cpu`"):
        predict.profile(recipe("tiny-llama", "[{name: full}]"), "cuda:0")


def test_a_micro_batch_too_large_to_model_is_one_sentence_not_an_allocation():
    result, text = _profile_cli("train.batch_size=100000000")  # 1e8 x 384 tokens: a 300 GB synthetic batch
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "cannot profile a micro-batch of 100,000,000 x" in text and "`train.batch_size`" in text


def test_lcsb_fitted_by_blocks_of_its_groups_predicts_what_the_full_depth_fit_does(monkeypatch):
    r = recipe("tiny-llama", "[{name: full}, {name: lcsb, params: {groups: 2}}]")
    config = resolve_config(r.model).config
    assert registry.compose(r)[-1].depth_block(config.num_hidden_layers) == 2
    blocks = predict._fit_activations(r, config, registry.compose(r), contextlib.nullcontext(), False)
    assert blocks.per_layer is not None  # twins of 2 and 4 layers, not 8
    monkeypatch.setattr(type(registry.compose(r)[-1]), "depth_block", lambda self, layers: None)
    full = predict._fit_activations(r, config, registry.compose(r), contextlib.nullcontext(), False)
    assert full.per_layer is None
    widths = activations.Widths.of(config)
    for batch, seq in [(1, 80), (4, 256), (8, 2048)]:
        a, b = blocks.predict(widths, batch, seq)[0], full.predict(widths, batch, seq)[0]
        assert abs(a / b - 1) < 0.01, (batch, seq, a, b)
