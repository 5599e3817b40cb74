"""`memft profile --gpus N`: each rank's parameters, gradients and optimizer state are exactly what two gloo ranks hold
after a training step (FSDP2 shards, padded chunks included, and DDP's whole tensors); one GPU is today's prediction;
what `memft train --nproc N` refuses, `--gpus N` refuses in the same words.

One torchrun job (tests/dist_scripts/profile_ranks.py) measures every case; the predictions come from the meta-device
skeleton alone (`predict.shard_states`), so only the peak check fits activations.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memft.cli import app
from memft.models.load import resolve_config
from memft.profile import predict
from memft.recipe import load

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "quickstart.yaml")
RANKS = 2
BASE = ["model.device=cpu", "model.dtype=float64", "data.max_length=64", "data.eval_split=null", "train.batch_size=2",
        "train.max_steps=1", "train.warmup_steps=0", "output.checkpoints=false", "output.plot=false"]
LORA = "strategies=[{name: lora, params: {r: 4}}]"
CASES = {
    "llama-full": ["model.name=tiny-llama"],
    "llama-lora": ["model.name=tiny-llama", LORA],
    # r=3: lora_A's 3 rows split 2 + 1, both ranks store 2 (padding); AdamW's moments only the rank's own rows
    "llama-lora-r3": ["model.name=tiny-llama", "model.dtype=float32", "strategies=[{name: lora, params: {r: 3}}]"],
    "olmoe-full": ["model.name=tiny-olmoe", "train.router_aux_loss=off"],
    "olmoe-lora": ["model.name=tiny-olmoe", LORA],
    "llama-ddp": ["model.name=tiny-llama", "distributed.mode=ddp"],
    "llama-qlora": ["model.name=tiny-llama", "model.dtype=float32", "strategies=[{name: qlora, params: {r: 4}}]"],
}
TRACKED = {"llama-full", "olmoe-lora", "llama-ddp"}
"""Cases whose second step runs under torch's FSDPMemTracker, for the peak check."""


def recipe(name: str):
    return load(RECIPE, [*BASE, *CASES[name]])


@pytest.fixture(scope="module")
def held(tmp_path_factory) -> dict[tuple[str, int], dict]:
    """{(case, rank): what that rank held}, from one torchrun job."""
    root = tmp_path_factory.mktemp("ranks")
    cases = [{"name": name, "recipe": RECIPE, "overrides": [*BASE, *extra], "dir": str(root / name),
              "track": name in TRACKED} for name, extra in CASES.items()]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={RANKS}",
                           str(ROOT / "tests" / "dist_scripts" / "profile_ranks.py"), json.dumps(cases),
                           str(root / "held")], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    records = [r for rank in range(RANKS) for r in json.loads((root / f"held.{rank}.json").read_text())]
    return {(r["name"], r["rank"]): r for r in records}


def predicted_ranks(name: str) -> list[dict]:
    r = recipe(name)
    model, strategies, quantized = predict.skeleton(r, resolve_config(r.model).config)
    return predict.shard_states(model, quantized, r, predict.double_quantized(strategies, r), RANKS)["ranks"]


@pytest.mark.parametrize("name", CASES)
def test_each_ranks_parameters_gradients_and_optimizer_state_are_exact(held, name):
    for rank, predicted in enumerate(predicted_ranks(name)):
        measured = {part: held[name, rank][part]["cpu"] for part in ("params", "gradients", "optimizer_state")}
        assert measured == predicted, (name, rank)


def test_uneven_shards_are_padded_but_adam_keeps_own_rows(held):
    """lora_A (3 rows) on two ranks: the parameter and gradient shards are padded alike; the moments are not."""
    first, second = (held["llama-lora-r3", rank] for rank in range(RANKS))
    assert first["params"] == second["params"] and first["gradients"] == second["gradients"]
    assert first["optimizer_state"]["cpu"] > second["optimizer_state"]["cpu"]


def test_profile_reports_rank_zero_and_ddp_holds_everything():
    fsdp = predict.profile(recipe("llama-full"), "cpu", gpus=RANKS)
    one = predict.profile(recipe("llama-full"), "cpu")
    assert (fsdp.gpus, fsdp.distributed) == (RANKS, "fsdp")
    assert fsdp.gradients == fsdp.ranks[0]["gradients"] and fsdp.optimizer_state == fsdp.ranks[0]["optimizer_state"]
    assert fsdp.weights == {"float64": one.weights["float64"] // RANKS, "float32": one.weights["float32"]}  # rotary
    assert fsdp.peak < one.peak and fsdp.gathered_root > 0 and fsdp.gathered_layers > 0
    ddp = predict.profile(recipe("llama-ddp"), "cpu", gpus=RANKS)
    assert (ddp.weights, ddp.gradients, ddp.optimizer_state) == (one.weights, one.gradients, one.optimizer_state)


@pytest.mark.parametrize("name", sorted(TRACKED))
def test_peak_bounds_what_fsdp_mem_tracker_saw(held, name):
    """The peak is a model (docs/profile.md); on two CPU ranks it is at or a little above every tensor's storage at
    the fullest moment of a step, by torch's own FSDP2 memory tracker."""
    peak = held[name, 0].get("peak")
    if peak is None:
        pytest.skip("torch.distributed._tools.fsdp2_mem_tracker is not available")
    measured = max(held[name, rank]["peak"]["cpu"]["Total"] for rank in range(RANKS))
    predicted = predict.profile(recipe(name), "cpu", gpus=RANKS).peak
    assert measured <= predicted <= 1.25 * measured, (predicted, measured)


@pytest.mark.parametrize("extra", [[], ["distributed.mode=ddp", "distributed.cpu_offload=true"]])
def test_one_gpu_is_the_single_process_prediction(extra):
    r = load(ROOT / "recipes" / "lora.yaml", ["model.name=tiny-llama", "data.max_length=96", *extra])
    plain = predict.profile(load(ROOT / "recipes" / "lora.yaml", ["model.name=tiny-llama", "data.max_length=96"]),
                            "cpu")
    one = predict.profile(r, "cpu", gpus=1)
    assert one.to_json() == plain.to_json()  # `distributed:` means nothing to one process
    start = one.activations + one.backward_transient + one.head_gradient
    assert one.peak == one.weight_bytes + one.optimizer_state + one.per_layer + max(start, one.gradients)


def _profile(*args):
    result = CliRunner().invoke(app, ["profile", RECIPE, *BASE, "model.name=tiny-llama", *map(str, args)],
                                env={"COLUMNS": "200"})
    return result, " ".join(result.output.split())


def test_cli_gpus_table_and_json(tmp_path):
    out = tmp_path / "p.json"
    result, text = _profile("--gpus", RANKS, "--json", out)
    assert result.exit_code == 0, result.output
    assert f"per process of {RANKS} (fsdp)" in text and "gathered: root unit" in text
    saved = json.loads(out.read_text())
    assert saved["gpus"] == RANKS and saved["distributed"] == "fsdp" and len(saved["ranks"]) == RANKS
    assert saved["gradients"] == saved["ranks"][0]["gradients"] and saved["peak"] > saved["gathered_root"]
    budget, text = _profile("--gpus", RANKS, "--gpu-memory", "1MiB")
    assert budget.exit_code == 0 and f"per process of {RANKS} (fsdp) > 1.0 MiB" in text
    assert "AdamW state in host memory" not in text  # refused on several GPUs, so not offered


def test_cli_gpus_refuses_what_training_on_several_refuses():
    result, text = _profile("strategies=[{name: full}]", "train.optimizer_state=host", "--gpus", RANKS)
    assert result.exit_code == 2, result.output
    assert f"cannot train in {RANKS} processes" in text and "distributed.cpu_offload: true" in text
    measure, text = _profile("--gpus", RANKS, "--measure")
    assert measure.exit_code == 2 and "--nproc" in text
