"""Export of MoE expert adapters (memft/export.py) and their peft layout (memft/models/peft_interop.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from memft.export import experts_by_weight, merge_expert_adapters
from memft.models.expert_lora import LoraExperts, wrap_experts
from memft.models.peft_interop import NotRepresentable, write_peft_adapter

REPO = Path(__file__).resolve().parents[1]
MOE_CONFIGS = ["tiny-mixtral.json", "tiny-qwen2-moe.json", "tiny-olmoe.json"]


def tiny_moe(config_file: str, dtype=torch.float64, seed=0, layers=2):
    """A random-init tiny MoE, eager attention and experts, so float64 is exact to rounding."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = json.loads((REPO / "configs" / config_file).read_text())
    spec.pop("_memft")
    spec["num_hidden_layers"] = layers
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**spec), dtype=dtype, attn_implementation="eager",
                                            experts_implementation="eager")


def randomise_lora_B(model: torch.nn.Module, seed=1) -> None:
    """B is zero at init, which would make every comparison trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def logits(model, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 512, (2, 12), generator=g)
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits


def with_linear_adapters(model, r=4, alpha=8.0):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"]))


# --- 1. export merges the expert adapters into a plain transformers model


@pytest.mark.parametrize("config_file", MOE_CONFIGS)
def test_merged_experts_give_a_plain_model_with_the_adapted_logits(config_file, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_moe(config_file)
    originals = experts_by_weight(model)
    classes = {type(m) for m in originals.values()}
    assert wrap_experts(model, r=3, alpha=5.0)
    randomise_lora_B(model)
    expected = logits(model)

    assert merge_expert_adapters(model, originals) == 2
    assert not any(isinstance(m, LoraExperts) for m in model.modules())
    assert {type(m) for m in experts_by_weight(model).values()} == classes  # the original modules are back
    assert not any("lora" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(logits(model), expected, rtol=1e-10, atol=1e-10)

    model.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64, attn_implementation="eager",
                                                    experts_implementation="eager")
    torch.testing.assert_close(logits(reloaded), expected, rtol=1e-10, atol=1e-10)


def test_merge_inside_a_peft_model_then_merge_and_unload(tmp_path):
    model = tiny_moe("tiny-mixtral.json")
    originals = experts_by_weight(model)
    model = with_linear_adapters(model)
    wrap_experts(model, r=4, alpha=8.0)
    randomise_lora_B(model)
    expected = logits(model)
    merge_expert_adapters(model, originals)
    plain = model.merge_and_unload()
    assert not any("lora" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(logits(plain), expected, rtol=1e-10, atol=1e-10)


def test_merging_an_unrecorded_wrapper_is_an_error():
    model = tiny_moe("tiny-mixtral.json", layers=1)
    wrap_experts(model, r=2, alpha=2.0)
    with pytest.raises(RuntimeError, match="was not recorded"):
        merge_expert_adapters(model, {})


# --- 2. peft interop: the expert factors in peft 0.21's `target_parameters` layout


@pytest.mark.parametrize("config_file", MOE_CONFIGS)
def test_peft_loads_the_expert_adapters_and_computes_the_same_logits(config_file, tmp_path):
    from peft import PeftModel

    model = with_linear_adapters(tiny_moe(config_file))
    wrap_experts(model, r=4, alpha=8.0)
    randomise_lora_B(model)
    expected = logits(model)

    write_peft_adapter(model, tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_moe(config_file), tmp_path / "adapter")  # same seed: same base
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == ["experts.down_proj", "experts.gate_up_proj"]
    torch.testing.assert_close(logits(loaded), expected, rtol=1e-10, atol=1e-10)


def test_experts_only_adapter_with_rslora(tmp_path):
    from peft import PeftModel

    model = tiny_moe("tiny-olmoe.json").requires_grad_(False)  # a frozen base, as a LoRA strategy leaves it
    wrap_experts(model, r=4, alpha=3.0, rslora=True)  # no peft linears at all
    randomise_lora_B(model)
    expected = logits(model)
    write_peft_adapter(model, tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_moe("tiny-olmoe.json"), tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded), expected, rtol=1e-10, atol=1e-10)


def test_an_adapter_peft_cannot_hold_exactly_is_not_written(tmp_path):
    model = with_linear_adapters(tiny_moe("tiny-mixtral.json", layers=1), r=4, alpha=8.0)
    wrap_experts(model, r=2, alpha=8.0)  # one peft config has one rank
    with pytest.raises(NotRepresentable, match="use r=2"):
        write_peft_adapter(model, tmp_path / "a")

    model = with_linear_adapters(tiny_moe("tiny-mixtral.json", layers=1))
    wrap_experts(model, r=4, alpha=8.0)
    model.base_model.model.model.norm.weight.requires_grad_(True)  # trained, but no part of a LoRA adapter
    with pytest.raises(NotRepresentable, match="other than LoRA factors"):
        write_peft_adapter(model, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# --- end to end: `memft train` with expert adapters, `memft export`, reload


MOE_LORA_RUN = """\
model: {{name: tiny-mixtral, dtype: float64}}
data: {{source: {data}, format: text, text_field: answer, max_length: 32, max_samples: 8, eval_split: null}}
strategies:
  - name: lora
    params: {{r: 4, alpha: 8, target_modules: [q_proj, v_proj], target_experts: true}}
train: {{lr: 1.0e-2, batch_size: 2, max_steps: 2}}
log: {{progress: false}}
output: {{dir: {run}, plot: false}}
"""


def test_memft_export_of_an_expert_lora_run_reloads_with_the_trained_logits(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from memft.cli import app
    from memft.eval.models import load

    recipe = tmp_path / "moe_lora.yaml"
    recipe.write_text(MOE_LORA_RUN.format(data=REPO / "recipes" / "data" / "gsm8k_sample.jsonl", run=tmp_path / "run"))
    result = CliRunner().invoke(app, ["train", str(recipe)])
    assert result.exit_code == 0, result.output
    trained = load(str(tmp_path / "run")).model
    assert any(isinstance(m, LoraExperts) for m in trained.modules())  # memft's expert adapters, not peft's
    assert any(p.abs().max() > 0 for n, p in trained.named_parameters() if "experts.gate_up_lora_B" in n)
    expected = logits(trained)

    result = CliRunner().invoke(app, ["export", str(tmp_path / "run"), str(tmp_path / "out")])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    # float64: transformers' default experts kernel (grouped_mm) takes no float64, so eager, as memft builds it
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64, experts_implementation="eager")
    assert not any("lora" in n for n, _ in exported.named_parameters())
    torch.testing.assert_close(logits(exported), expected, rtol=1e-9, atol=1e-9)

    base = load("tiny-mixtral", dtype="float64").model  # the run's base: built-ins are seeded
    adapted = PeftModel.from_pretrained(base, tmp_path / "out" / "adapter")
    torch.testing.assert_close(logits(adapted), expected, rtol=1e-9, atol=1e-9)


def test_merge_through_a_dense_weight_provider():
    from memft.models.nf4_experts import DenseExperts

    model = tiny_moe("tiny-qwen2-moe.json", layers=1)
    originals = experts_by_weight(model)
    experts = model.model.layers[0].mlp.experts
    wrapper = LoraExperts(experts, r=2, alpha=4.0, gate_up=DenseExperts(experts.gate_up_proj),
                          down=DenseExperts(experts.down_proj))
    model.model.layers[0].mlp.experts = wrapper
    randomise_lora_B(model)
    expected = logits(model)
    merge_expert_adapters(model, originals)
    assert model.model.layers[0].mlp.experts is experts
    torch.testing.assert_close(logits(model), expected, rtol=1e-10, atol=1e-10)
