"""LoRA / QLoRA wiring: which weights get adapters on a MoE model, and what the plan says about it."""

from pathlib import Path

import pytest

from memft.recipe import load
from memft.train.loop import Trainer

REPO = Path(__file__).resolve().parents[1]


def adapted(params: str, strategy: str = "lora") -> tuple[set[str], list[str], dict]:
    r = load(REPO / "recipes" / "bench_moe.yaml",
             [f"strategies=[{{name: {strategy}, params: {params}}}]", "data.max_samples=16"])
    t = Trainer(r, run_dir="unused").setup(for_training=False)
    names = {n.split(".lora_")[0].split("layers.0.")[-1] for n, p in t.model.named_parameters()
             if p.requires_grad and ".lora_" in n and "layers.0." in n}
    return names, t.notes, t.params


@pytest.mark.parametrize("strategy", ["lora", "qlora"])
def test_target_experts_false_adapts_only_linear_layers(strategy):
    names, notes, _ = adapted("{target_experts: false}", strategy)
    assert names == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}
    assert any("NOT adapted" in n for n in notes)


def test_target_experts_true_adapts_fused_experts_and_reports_it():
    names, notes, params = adapted("{target_experts: true}")
    assert any(n.startswith("mlp.experts") for n in names)
    assert any("ARE adapted" in n for n in notes)
    frozen_experts = params["expert_params"]
    assert 0 < frozen_experts < params["total_params"]


def test_default_note_matches_what_peft_built():
    names, notes, _ = adapted("{}")
    covered = any(n.startswith("mlp.experts") for n in names)
    assert any(("ARE adapted" if covered else "NOT adapted") in n for n in notes)


def test_explicit_target_modules():
    names, _, _ = adapted("{target_modules: [q_proj, v_proj], target_experts: false}")
    assert names == {"self_attn.q_proj", "self_attn.v_proj"}
