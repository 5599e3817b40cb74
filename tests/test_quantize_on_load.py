"""QLoRA loading stores fused MoE experts in 4 bits as each one is loaded (memft/models/load.py,
`experts_quantized_on_load`), never the whole full-precision model.

The reference is the load path before it: the model loaded with bitsandbytes' own 4-bit quantizer (linear layers
only), then `quantize_experts` on the loaded model. Both must give the same packed bytes and constants, hence the
same logits, from a fused checkpoint (keys as the model holds them), from a per-expert one (the hub's Mixtral and
Qwen3-MoE layout, which transformers' `save_pretrained` also writes; transformers fuses the `experts.N.w1` /
`gate_proj` keys while loading) and from a random-init built-in (loaded through `from_pretrained(None,
state_dict=...)`).
"""

import contextlib
import gc
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig
from transformers.quantizers import auto as auto_quantizers

from memft import registry
from memft.errors import UserError
from memft.models import load as memft_load
from memft.models.expert_lora import LoraExperts
from memft.models.load import load_model
from memft.models.nf4_experts import NF4Experts, quantize_experts
from memft.recipe import ModelConfig
from memft.recipe import load as load_recipe
from memft.train.loop import apply_strategies

REPO = Path(__file__).resolve().parents[1]

EXPERTS, LAYERS = 4, 3
SMALL = dict(vocab_size=128, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
             num_experts_per_tok=2, max_position_embeddings=64, tie_word_embeddings=False)
CONFIGS = {
    "mixtral": lambda: MixtralConfig(**SMALL, intermediate_size=96, num_local_experts=EXPERTS),
    "qwen3_moe": lambda: Qwen3MoeConfig(**SMALL, moe_intermediate_size=96, num_experts=EXPERTS, head_dim=16),
    # a shared expert: plain linear layers named like the experts weights (`shared_expert.down_proj`)
    "qwen2_moe": lambda: Qwen2MoeConfig(**SMALL, intermediate_size=128, moe_intermediate_size=96,
                                        shared_expert_intermediate_size=128, num_experts=EXPERTS),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.py)


def qlora_config(dtype: torch.dtype, double_quant: bool = True) -> BitsAndBytesConfig:
    """What the `qlora` strategy passes to `load_model` (`QLora.load_kwargs`)."""
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=["lm_head", "score", "classifier"])


def save_moe(path, family: str = "mixtral", layout: str = "fused", seed: int = 0) -> str:
    """A random tiny MoE directory. transformers' `save_pretrained` writes the hub's per-expert keys
    (`block_sparse_moe.experts.N.w1.weight`, `mlp.experts.N.gate_proj.weight`); `fused` rewrites them as the
    model holds them (`mlp.experts.gate_up_proj`), as memft's own tiny models are saved."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[family]())
    model.save_pretrained(path, safe_serialization=True)
    if layout == "fused":
        save_file(model.state_dict(), path / "model.safetensors", metadata={"format": "pt"})
    return str(path)


def reference_loading(monkeypatch) -> None:
    """Load as before quantize-on-load: transformers' own 4-bit quantizer (linear layers only)."""
    monkeypatch.setattr(memft_load, "experts_quantized_on_load", lambda config: contextlib.nullcontext())


def load(name: str, dtype: str, quantization_config=None):
    cfg = ModelConfig(name=name, dtype=dtype, device="cpu")
    return load_model(cfg, quantization_config=quantization_config).model


def holders(model) -> dict[str, NF4Experts]:
    return {n: m for n, m in model.named_modules() if isinstance(m, NF4Experts)}


def assert_same_storage(model, reference) -> None:
    """The same modules, buffers and parameters, bit for bit (4-bit linears and experts alike)."""
    got, want = holders(model), holders(reference)
    assert got and sorted(got) == sorted(want)
    for name, holder in got.items():
        assert holder.compute_dtype == want[name].compute_dtype, name
        assert holder.extra_repr() == want[name].extra_repr(), name
    state, ref_state = model.state_dict(), reference.state_dict()
    assert state.keys() == ref_state.keys()
    for key, value in state.items():
        assert value.dtype == ref_state[key].dtype and torch.equal(value, ref_state[key]), key


@pytest.mark.parametrize(("family", "layout", "dtype"), [
    ("mixtral", "fused", "float32"),
    ("mixtral", "per-expert", "bfloat16"),
    ("qwen3_moe", "per-expert", "float32"),
    ("qwen3_moe", "fused", "bfloat16"),
])
def test_a_checkpoint_loads_into_the_same_nf4_experts_as_load_then_quantize(family, layout, dtype, tmp_path,
                                                                          monkeypatch):
    path = save_moe(tmp_path / "moe", family, layout)
    bnb = qlora_config(getattr(torch, dtype))
    model = load(path, dtype, bnb)
    assert len(holders(model)) == 2 * LAYERS  # already 4-bit when `load_model` returns
    assert not [n for n, p in model.named_parameters() if p.dim() == 3]
    assert type(model.config.quantization_config) is BitsAndBytesConfig  # a plain config, as saved and exported
    assert auto_quantizers.AUTO_QUANTIZER_MAPPING["bitsandbytes_4bit"].__name__ == "Bnb4BitHfQuantizer"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert quantize_experts(model, "nf4", True, getattr(torch, dtype)) == []  # qlora's apply: a no-op now
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    with monkeypatch.context() as patch:
        reference_loading(patch)
        reference = load(path, dtype, bnb)
    assert not holders(reference)
    assert len(quantize_experts(reference, "nf4", True, getattr(torch, dtype))) == LAYERS
    assert_same_storage(model, reference)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


@pytest.mark.parametrize(("dtype", "double_quant"), [("float32", False), ("bfloat16", True)])
def test_a_random_init_builtin_loads_into_the_same_nf4_experts(dtype, double_quant, monkeypatch):
    bnb = qlora_config(getattr(torch, dtype), double_quant)
    model = load("tiny-mixtral", dtype, bnb)
    with monkeypatch.context() as patch:
        reference_loading(patch)
        reference = load("tiny-mixtral", dtype, bnb)
    layers = model.config.num_hidden_layers
    assert len(holders(model)) == 2 * layers and not holders(reference)
    assert len(quantize_experts(reference, "nf4", double_quant, getattr(torch, dtype))) == layers
    assert_same_storage(model, reference)
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def full_precision_experts_alive(before: frozenset = frozenset()) -> list[int]:
    """Elements of every floating 3-D tensor with the experts' leading dimension that is alive anywhere (each
    storage once): the fused experts weights, and any stack of per-expert matrices on the way to one. Storages in
    `before` (alive before the load began: other tests' leftovers in the same process) are not counted."""
    return [n for ptr, n in _experts_storages().items() if ptr not in before]


def _experts_storages() -> dict[int, int]:
    gc.collect()
    sizes: dict[int, int] = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and obj.dim() == 3 and obj.is_floating_point() and not obj.is_meta \
                and obj.shape[0] == EXPERTS:
            ptr = obj.untyped_storage().data_ptr()
            sizes[ptr] = max(sizes.get(ptr, 0), obj.numel())
    return sizes


@pytest.mark.parametrize("layout", ["fused", "per-expert"])
def test_at_most_one_experts_weight_is_in_full_precision_while_loading(layout, tmp_path, monkeypatch):
    path = save_moe(tmp_path / "moe", "mixtral", layout)
    quantize = NF4Experts.from_parameter.__func__
    alive: list[list[int]] = []
    before = frozenset(_experts_storages())

    def watched(cls, param, *args, **kwargs):
        alive.append(full_precision_experts_alive(before))  # the weight about to be quantized included
        return quantize(cls, param, *args, **kwargs)

    monkeypatch.setattr(NF4Experts, "from_parameter", classmethod(watched))
    config = MixtralConfig.from_pretrained(path)
    gate_up = EXPERTS * 2 * config.intermediate_size * config.hidden_size
    largest = max(gate_up, EXPERTS * config.hidden_size * config.intermediate_size)

    model = load(path, "float32", qlora_config(torch.float32))
    assert len(alive) == 2 * LAYERS and len(holders(model)) == 2 * LAYERS
    assert max(sum(a) for a in alive) <= largest, alive  # one layer's gate_up at most, never all layers'
    assert full_precision_experts_alive(before) == []

    # the measure sees the bound break: loading first and quantizing afterwards holds every layer's experts
    del model
    alive.clear()
    reference_loading(monkeypatch)
    reference = load(path, "float32", qlora_config(torch.float32))
    quantize_experts(reference, "nf4", True, torch.float32)
    assert max(sum(a) for a in alive) == LAYERS * (gate_up + gate_up // 2)


def test_wrong_or_missing_experts_weights_are_still_reported(tmp_path):
    path = save_moe(tmp_path / "moe")
    weights = tmp_path / "moe" / "model.safetensors"
    state = load_file(weights)
    key = "model.layers.1.mlp.experts.down_proj"
    save_file({**state, key: state[key][:, :, :-2].contiguous()}, weights, metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"`model\.layers\.1\.mlp\.experts\.down_proj` has shape \(4, 64, 94\)"):
        load(path, "float32", qlora_config(torch.float32))
    save_file({k: v for k, v in state.items() if k != key}, weights, metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"lacks 1 weight the model needs \(`model\.layers\.1\.mlp\.experts\.down_"):
        load(path, "float32", qlora_config(torch.float32))
    assert auto_quantizers.AUTO_QUANTIZER_MAPPING["bitsandbytes_4bit"].__name__ == "Bnb4BitHfQuantizer"


def test_a_qlora_recipe_on_a_hub_layout_directory_trains_as_before(tmp_path, monkeypatch):
    """recipe -> registry.compose -> load_model -> apply_strategies, as a run builds it: the same adapted model (NF4
    experts under memft's expert LoRA, peft on the linear layers, the shared expert's included) and the same loss
    and gradients as loading first and quantizing in qlora's apply."""
    path = save_moe(tmp_path / "moe", "qwen2_moe", "per-expert")
    recipe = load_recipe(REPO / "recipes" / "qlora.yaml", [f"model.name={path}", "model.dtype=float32",
                                                           "model.device=cpu", "model.tokenizer=stories260K",
                                                           "strategies=[{name: qlora, params: {r: 4}}]"])
    ids = torch.randint(0, SMALL["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))

    def build_and_step():
        strategies = registry.compose(recipe)
        loaded = load_model(recipe.model, **registry.load_kwargs(strategies, recipe))
        stored = len(holders(loaded.model))
        ctx = registry.BuildContext(recipe=recipe, device=torch.device("cpu"), is_moe=loaded.is_moe, total_steps=1)
        model = apply_strategies(loaded.model, strategies, ctx)
        with torch.no_grad():  # B starts at zero, which would hide the adapters from the loss and A's gradients
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        return model, stored, loss, grads

    model, stored, loss, grads = build_and_step()
    assert stored == 2 * LAYERS  # 4-bit before the strategies saw the model
    wrapped = [m for m in model.modules() if isinstance(m, LoraExperts)]
    assert len(wrapped) == LAYERS and all(isinstance(m.gate_up_base, NF4Experts) for m in wrapped)
    assert any("shared_expert.down_proj.lora_A" in n for n in grads) and any("gate_up_lora_A" in n for n in grads)
    with monkeypatch.context() as patch:
        reference_loading(patch)
        _, stored_before, ref_loss, ref_grads = build_and_step()
    assert stored_before == 0
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    assert all(torch.equal(g, ref_grads[n]) for n, g in grads.items())
