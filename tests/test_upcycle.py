"""Sparse upcycling (`model.upcycle`): dense Llama -> Mixtral with copied experts and the same function."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import MixtralForCausalLM
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

from memft.errors import RecipeError, UserError
from memft.models.load import count_params, is_moe, load_model
from memft.models.upcycle import upcycle
from memft.recipe import ModelConfig, load
from memft.train.loop import Trainer

REPO = Path(__file__).resolve().parents[1]
UP = {"experts": 4, "top_k": 2}


def ids(batch=3, length=40, seed=0) -> torch.Tensor:
    return torch.randint(3, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, input_ids, attention_mask=None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits


def _router_in_model_dtype(self, hidden_states):
    """MixtralTopKRouter.forward with the softmax and renormalisation in the model's dtype, not float32."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states, self.weight)
    top, index = torch.topk(router_logits.softmax(dim=-1), self.top_k, dim=-1)
    return router_logits, top / top.sum(dim=-1, keepdim=True), index


# --------------------------------------------------------------------------------------------
# function preservation


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_float64_upcycled_stories260K_computes_the_dense_function(top_k, monkeypatch):
    dense = load_model(ModelConfig(name="stories260K", dtype="float64")).model
    moe = load_model(ModelConfig(name="stories260K", dtype="float64", upcycle={"experts": 4, "top_k": top_k})).model
    assert moe.dtype == torch.float64 and moe.config._experts_implementation == "eager"
    mask = torch.ones(3, 40, dtype=torch.long)
    mask[1, :7] = 0  # a left-padded row
    x = ids()
    expected = logits(dense, x, mask)
    got = logits(moe, x, mask)
    if top_k == 1:  # the one weight is p / p == 1 exactly
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)
    else:  # Mixtral renormalises the top-k weights in float32: they sum to 1 only to ~1e-7
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        assert (got - expected).abs().max() > 1e-10
        monkeypatch.setattr(MixtralTopKRouter, "forward", _router_in_model_dtype)
        torch.testing.assert_close(logits(moe, x, mask), expected, atol=1e-10, rtol=0)


def test_float32_upcycled_stories260K_computes_the_dense_function():
    dense = load_model(ModelConfig(name="stories260K")).model
    loaded = load_model(ModelConfig(name="stories260K", upcycle=UP))
    expected, got = logits(dense, ids()), logits(loaded.model, ids())
    # logits reach ~17: the fused expert kernel rounds differently from three nn.Linear (a few ulps)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - expected).abs().max() / expected.abs().max() < 2e-6
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_mistral_with_a_sliding_window_is_upcycled_too(tmp_path):
    config = {"model_type": "mistral", "vocab_size": 512, "hidden_size": 32, "intermediate_size": 48,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": 8,
              "_memft": {"tokenizer": "stories260K"}}
    (tmp_path / "mistral.json").write_text(json.dumps(config))
    cfg = ModelConfig(name=str(tmp_path / "mistral.json"), dtype="float64", attn_implementation="eager")
    dense = load_model(cfg).model
    moe = load_model(ModelConfig(**{**cfg.model_dump(), "upcycle": {"experts": 3, "top_k": 1}})).model
    assert isinstance(moe, MixtralForCausalLM) and moe.config.sliding_window == 8
    torch.testing.assert_close(logits(moe, ids(2, 24)), logits(dense, ids(2, 24)), atol=1e-10, rtol=0)


# --------------------------------------------------------------------------------------------
# structure


def test_upcycled_structure_copies_the_ffn_into_every_expert():
    dense = load_model(ModelConfig(name="stories260K")).model
    loaded = load_model(ModelConfig(name="stories260K", upcycle={**UP, "router_std": 0.05}, seed=3))
    model = loaded.model
    assert isinstance(model, MixtralForCausalLM) and loaded.is_moe and is_moe(model)
    assert loaded.source == "built-in stories260K (pretrained), upcycled to 4 experts, top-k 2"
    c = model.config
    assert (c.num_local_experts, c.num_experts_per_tok, c.output_router_logits) == (4, 2, False)
    assert c.router_jitter_noise == 0
    assert c.sliding_window is None and c.use_cache is False and not model.training
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "rms_norm_eps", "rope_parameters", "vocab_size", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act"):
        assert getattr(c, key) == getattr(dense.config, key), key
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied

    routers = []
    for layer, dense_layer in zip(model.model.layers, dense.model.layers, strict=True):
        mlp, ffn = layer.mlp, dense_layer.mlp
        assert mlp.experts.gate_up_proj.shape == (4, 2 * 172, 64) and mlp.experts.down_proj.shape == (4, 64, 172)
        for e in range(4):
            assert torch.equal(mlp.experts.gate_up_proj[e, :172], ffn.gate_proj.weight)  # gate rows first
            assert torch.equal(mlp.experts.gate_up_proj[e, 172:], ffn.up_proj.weight)
            assert torch.equal(mlp.experts.down_proj[e], ffn.down_proj.weight)
        assert torch.equal(layer.self_attn.q_proj.weight, dense_layer.self_attn.q_proj.weight)
        assert torch.equal(layer.self_attn.o_proj.weight, dense_layer.self_attn.o_proj.weight)
        assert torch.equal(layer.post_attention_layernorm.weight, dense_layer.post_attention_layernorm.weight)
        assert mlp.gate.weight.shape == (4, 64) and mlp.gate.top_k == 2
        routers.append(mlp.gate.weight.detach())
    routers = torch.stack(routers)
    assert 0.045 < routers.std().item() < 0.055 and abs(routers.mean().item()) < 0.01  # 1280 draws
    assert not torch.equal(routers[0], routers[1])  # a fresh draw per layer
    assert torch.equal(model.model.norm.weight, dense.model.norm.weight)
    n_ffn = 5 * 3 * 64 * 172
    assert count_params(model)["expert_params"] == 4 * n_ffn
    assert count_params(model)["total_params"] == count_params(dense)["total_params"] + 3 * n_ffn + 5 * 4 * 64


def test_routers_are_seeded_by_model_seed_and_the_same_in_every_dtype():
    def routers(**kw):
        model = load_model(ModelConfig(name="stories260K", upcycle=UP, **kw)).model
        return torch.stack([layer.mlp.gate.weight.detach().double() for layer in model.model.layers])

    a = routers(seed=0)
    torch.manual_seed(123)  # the global generator plays no part
    assert torch.equal(a, routers(seed=0))
    assert not torch.equal(a, routers(seed=1))
    assert torch.equal(a, routers(seed=0, dtype="float64"))  # drawn in float32, then cast


def test_upcycle_function_directly_on_a_random_init_llama():
    dense = load_model(ModelConfig(name="tiny-llama")).model
    moe = upcycle(dense, experts=2, top_k=1, router_std=0.02, seed=0)
    assert isinstance(moe, MixtralForCausalLM) and moe.config.num_local_experts == 2
    assert moe.config.num_hidden_layers == dense.config.num_hidden_layers == 8
    assert not moe.config.tie_word_embeddings and moe.lm_head.weight is not moe.model.embed_tokens.weight
    torch.testing.assert_close(logits(moe, ids()), logits(dense, ids()), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# through memft: recipe -> load -> train


def test_recipe_with_upcycle_trains_and_the_experts_diverge(tmp_path):
    recipe = load(REPO / "recipes" / "quickstart.yaml", [
        "model.upcycle={experts: 4, top_k: 2}", "train.max_steps=2", "train.warmup_steps=0", "train.batch_size=4",
        "data.max_samples=24", "data.max_length=96", "data.eval_split=null", "train.eval_every=null",
        "log.progress=false", "output.plot=false", "output.checkpoints=false"])
    assert recipe.model.upcycle.experts == 4 and recipe.model.upcycle.router_std == 0.02
    trainer = Trainer(recipe, run_dir=tmp_path / "run").setup()
    summary = trainer.train()
    assert summary["steps"] == 2 and summary["is_moe"] and torch.isfinite(torch.tensor(summary["final_loss"]))
    assert "upcycled to 4 experts, top-k 2" in summary["model"]
    # tokens went to different experts, so the copies got different updates
    experts = trainer.model.model.layers[0].mlp.experts.gate_up_proj.detach()
    assert not torch.equal(experts[0], experts[1])


def test_lora_on_an_upcycled_model_adapts_the_experts(tmp_path):
    recipe = load(REPO / "recipes" / "lora.yaml", [
        "model.upcycle.experts=4", "strategies.0.params.target_experts=true", "train.max_steps=1",
        "train.batch_size=4", "data.max_samples=16", "data.max_length=64", "data.eval_split=null",
        "train.eval_every=null", "log.progress=false", "output.plot=false", "output.checkpoints=false"])
    trainer = Trainer(recipe, run_dir=tmp_path / "run").setup()
    assert trainer.is_moe
    assert any("routed expert weights ARE adapted" in note for note in trainer.notes)
    assert trainer.train()["steps"] == 1


# --------------------------------------------------------------------------------------------
# errors


def recipe_problems(tmp_path, model_block: str) -> list[str]:
    path = tmp_path / "r.yaml"
    path.write_text(f"model:\n{model_block}data:\n  source: {REPO / 'recipes/data/gsm8k_sample.jsonl'}\n")
    with pytest.raises(RecipeError) as info:
        load(path)
    return info.value.problems


def test_invalid_upcycle_blocks_are_recipe_errors(tmp_path):
    [p] = recipe_problems(tmp_path, "  upcycle: {experts: 4, top_k: 5}\n")
    assert p.startswith("`model.upcycle`: `top_k` (5) cannot exceed `experts` (4)") and "[line 2]" in p
    [p] = recipe_problems(tmp_path, "  upcycle: {experts: 1}\n")
    assert p.startswith("`model.upcycle.experts`: Input should be greater than or equal to 2")
    [p] = recipe_problems(tmp_path, "  upcycle: {top_k: 2}\n")
    assert p.startswith("`model.upcycle.experts`: required but missing")
    [p] = recipe_problems(tmp_path, "  upcycle: {experts: 4, top_k: 0}\n")
    assert p.startswith("`model.upcycle.top_k`: Input should be greater than or equal to 1")
    [p] = recipe_problems(tmp_path, "  upcycle: {experts: 4, expert_std: 0.1}\n")
    assert p.startswith("`model.upcycle.expert_std`: unknown key")
    with pytest.raises(RecipeError, match="works with `model.task: causal_lm` only"):
        load(REPO / "recipes" / "classify_sst2.yaml", ["model.upcycle.experts=4"])
    assert load(REPO / "recipes" / "quickstart.yaml", ["model.upcycle=null"]).model.upcycle is None


def test_upcycling_an_moe_or_unsupported_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="`tiny-mixtral` is already a mixture of experts"):
        load_model(ModelConfig(name="tiny-mixtral", upcycle=UP))
    with pytest.raises(UserError, match="already a mixture of experts"):
        upcycle(load_model(ModelConfig(name="tiny-mixtral")).model, 4, 2)
    with pytest.raises(UserError, match="`attention_bias: true`"):
        load_model(ModelConfig(name="tiny-llama", config_overrides={"attention_bias": True}, upcycle=UP))
    qwen2 = {"model_type": "qwen2", "vocab_size": 512, "hidden_size": 32, "intermediate_size": 48,
             "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2}
    (tmp_path / "qwen2.json").write_text(json.dumps(qwen2))
    with pytest.raises(UserError, match="`qwen2` model .*q/k/v biases"):
        load_model(ModelConfig(name=str(tmp_path / "qwen2.json"), upcycle=UP))


def test_upcycling_a_classifier_or_a_4bit_model_is_a_user_error():
    classifier = load_model(ModelConfig(name="stories260K", task="sequence_classification", num_labels=2)).model
    with pytest.raises(UserError, match="not a causal LM"):
        upcycle(classifier, 4, 2)
    with pytest.raises(UserError, match=r"quantized \(4-bit, `qlora`\)"):  # refused before any loading
        load_model(ModelConfig(name="stories260K", upcycle=UP), quantization_config=object())
    dense = load_model(ModelConfig(name="stories260K")).model
    with pytest.raises(UserError, match="between 1 and `experts`"):
        upcycle(dense, 4, 5)
    with pytest.raises(UserError, match="at least 2"):
        upcycle(dense, 1, 1)
