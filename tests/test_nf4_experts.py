"""4-bit fused MoE experts (memft/models/nf4_experts.py) against bitsandbytes and a dense reference.

The reference for a quantized model is the same model with its 3-D expert weights replaced by their dequantized
values, run by transformers' own experts forward: the two compute the same function, so logits and gradients
agree to float32 rounding.
"""

import copy
import io
import json
import math
from pathlib import Path

import bitsandbytes.functional as bnb_functional
import pytest
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from transformers import AutoConfig, AutoModelForCausalLM

from memft.errors import UserError
from memft.models import nf4_experts
from memft.models.nf4_experts import (
    DenseExperts,
    NF4Experts,
    expert_weights,
    nf4_expert_bytes,
    quantize_experts,
)
from memft.profile.predict import nf4_bytes

REPO = Path(__file__).resolve().parents[1]
MOE_MODELS = ["tiny-mixtral", "tiny-qwen2-moe", "tiny-olmoe"]
GIB = 2**30

NF4_GAUSSIAN_ERROR = 0.11
"""Relative Frobenius error bound of NF4 with blocksize 64 on gaussian weights. NF4's 16 levels are the quantiles
of N(0, 1) scaled to each block's absmax (~2.4 sigma for 64 gaussians); its expected error is ~0.094 of the
weights' norm (measured here 0.093-0.097 over shapes, dtypes and double quantization, which adds ~0.001). FP4
(uniform-ish levels) is worse, ~0.12."""


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.py)


def tiny_moe(name: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    config = json.loads((REPO / "configs" / f"{name}.json").read_text())
    config.pop("_memft")
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=dtype)
    return model.eval()


def dense_reference(quantized: torch.nn.Module, original: torch.nn.Module) -> torch.nn.Module:
    """`original` with each 3-D expert weight replaced by the dequantized values of `quantized`'s holder."""
    reference = copy.deepcopy(original)
    for name, module in quantized.named_modules():
        if isinstance(module, NF4Experts):
            weight = reference.get_parameter(name)
            with torch.no_grad():
                weight.copy_(torch.stack([module.expert(e) for e in range(module.num_experts)]))
            weight.requires_grad_(False)
    return reference


def holders(model: torch.nn.Module) -> list[NF4Experts]:
    return [m for m in model.modules() if isinstance(m, NF4Experts)]


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def nf4_reference(holder: NF4Experts, e: int) -> torch.Tensor:
    """NF4 decoding written out in torch: level of each nibble (high nibble first) times its block's absmax."""
    packed = holder.packed[e]
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1).long()
    absmax = holder.absmax[e].float()
    if holder.double_quant:  # 8-bit absmax: its own level times its block's float32 absmax, plus the offset
        blocks = torch.arange(absmax.numel()) // nf4_experts.NESTED_BLOCKSIZE
        absmax = holder.nested_code[holder.absmax[e].long()] * holder.nested_absmax[e][blocks] + holder.offset[e]
    numel = holder.out_features * holder.in_features
    levels = holder.code[codes[:numel]]
    weights = levels * absmax[torch.arange(numel) // nf4_experts.BLOCKSIZE]
    return weights.view(holder.out_features, holder.in_features).to(holder.compute_dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [True, False])
def test_expert_is_bitsandbytes_dequantization_of_its_own_quantization(dtype, double_quant):
    weight = torch.randn(3, 96, 64).to(dtype)
    holder = NF4Experts.from_parameter(weight, "nf4", double_quant)
    assert holder.compute_dtype == dtype and holder.packed.dtype == torch.uint8
    for e in range(3):
        packed, state = bnb_functional.quantize_4bit(weight[e], blocksize=64, compress_statistics=double_quant,
                                                     quant_type="nf4")
        own = bnb_functional.dequantize_4bit(packed, state)
        got = holder.expert(e)
        assert got.dtype == dtype and got.shape == (96, 64)
        assert torch.equal(got, own)
        assert rel_error(got, weight[e]) < NF4_GAUSSIAN_ERROR


@pytest.mark.parametrize("quant_type,bound", [("nf4", NF4_GAUSSIAN_ERROR), ("fp4", 0.14)])
@pytest.mark.parametrize("shape", [(2, 10, 33), (2, 7, 9), (2, 6, 50)])
def test_odd_widths_decode_exactly(shape, quant_type, bound):
    # bitsandbytes 0.50's CPU kernel takes only even last dims; the holder hands it flat shapes, and the values
    # must equal plain NF4 decoding for widths not multiple of 2, 32 or the block
    weight = torch.randn(shape)
    holder = NF4Experts.from_parameter(weight, quant_type, double_quant=True)
    for e in range(shape[0]):
        got = holder.expert(e)
        assert torch.equal(got, nf4_reference(holder, e))
        assert rel_error(got, weight[e]) < bound


def test_expert_dtype_and_float64_callers():
    holder = NF4Experts.from_parameter(torch.randn(2, 16, 32, dtype=torch.bfloat16))
    assert holder.expert(1, torch.float32).dtype == torch.float32
    assert torch.equal(holder.expert(1, torch.float64), holder.expert(1, torch.float32).double())
    with pytest.raises(UserError, match="float64"):
        NF4Experts.from_parameter(torch.randn(2, 4, 4, dtype=torch.float64))
    with pytest.raises(UserError, match="fused"):
        NF4Experts.from_parameter(torch.randn(4, 4))


def test_dense_provider_has_the_same_interface():
    weight = torch.nn.Parameter(torch.randn(4, 6, 5))
    dense = DenseExperts(weight)
    assert dense.expert(2) is not None and torch.equal(dense.expert(2), weight[2])
    x = torch.randn(3, 5)
    dense.linear(x, 2).sum().backward()  # a trainable dense expert keeps its gradient
    assert weight.grad[2].abs().sum() > 0 and weight.grad[0].abs().sum() == 0
    module = torch.nn.Module()
    module.gate_up_proj = weight
    module.down_proj = NF4Experts.from_parameter(torch.randn(4, 5, 3))
    assert isinstance(expert_weights(module, "gate_up_proj"), DenseExperts)
    assert expert_weights(module, "down_proj") is module.down_proj


def test_linear_keeps_no_weight_and_follows_autocast():
    holder = NF4Experts.from_parameter(torch.randn(2, 16, 32))
    x = torch.randn(4, 32, requires_grad=True)
    grad_out = torch.randn(4, 16)
    holder.linear(x, 1).backward(grad_out)
    assert torch.equal(x.grad, grad_out @ holder.expert(1))
    x.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):  # dequantized into autocast's dtype; x's gradient in x's
        y = holder.linear(x, 1)
    assert y.dtype == torch.bfloat16
    y.backward(grad_out.bfloat16())
    assert x.grad.dtype == torch.float32
    assert torch.equal(x.grad, (grad_out.bfloat16() @ holder.expert(1, torch.bfloat16)).float())


@pytest.mark.parametrize("name", MOE_MODELS)
def test_quantized_moe_matches_dequantized_reference(name):
    original = tiny_moe(name)
    quantized = copy.deepcopy(original)
    names = quantize_experts(quantized)
    assert len(names) == original.config.num_hidden_layers
    reference = dense_reference(quantized, original)
    ids = torch.randint(0, 512, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, 7:] = 0  # right padding
    weights = torch.randn(3, 10, 512) * mask[..., None]  # a loss over real tokens only

    def logits_and_grads(model):
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
        logits = model(inputs_embeds=embeds, attention_mask=mask).logits
        routers = [layer.mlp.gate.weight for layer in model.model.layers]
        grads = torch.autograd.grad((logits * weights).sum(), [embeds, *routers])
        return logits.detach(), grads

    logits, grads = logits_and_grads(quantized)
    ref_logits, ref_grads = logits_and_grads(reference)
    assert original.config.num_experts_per_tok == 2
    assert rel_error(logits, ref_logits) < 1e-5
    for grad, ref_grad in zip(grads, ref_grads):
        assert rel_error(grad, ref_grad) < 1e-5
    # the experts are frozen 4-bit buffers; the routers stay full-precision parameters
    assert not any(p.dim() == 3 for p in quantized.parameters())
    assert all(layer.mlp.gate.weight.dtype == torch.float32 for layer in quantized.model.layers)
    if name == "tiny-qwen2-moe":  # its shared expert is nn.Linear, bitsandbytes' own business
        assert isinstance(quantized.model.layers[0].mlp.shared_expert.gate_proj, torch.nn.Linear)


def test_bf16_model_stays_bf16_and_bytes_are_the_accounting():
    original = tiny_moe("tiny-mixtral", torch.bfloat16)
    dense_bytes = sum(p.numel() * p.element_size() for p in original.parameters() if p.dim() == 3)
    quantized = copy.deepcopy(original)
    quantize_experts(quantized)
    assert all(p.dtype == torch.bfloat16 for p in quantized.parameters())
    stored = sum(h.nbytes for h in holders(quantized))
    assert stored == sum(nf4_expert_bytes(h.num_experts, h.out_features, h.in_features, True)
                         for h in holders(quantized))
    # 16 bits vs 4 bits + an 8-bit absmax per 64 (3.88x); the 1,088 bytes of tables per holder weigh 2% here
    assert 3.75 < dense_bytes / stored < 3.9
    assert all(h.compute_dtype == torch.bfloat16 and h.expert(0).dtype == torch.bfloat16 for h in holders(quantized))
    ids = torch.randint(0, 512, (2, 8))
    assert quantized(input_ids=ids).logits.dtype == torch.bfloat16
    before = [h.expert(0, torch.float32) for h in holders(quantized)]
    quantized.to(torch.float16)  # the float32 constants keep their dtype and values; only the compute dtype follows
    assert all(h.code.dtype == h.nested_absmax.dtype == torch.float32 for h in holders(quantized))
    assert all(torch.equal(h.expert(0, torch.float32), b) for h, b in zip(holders(quantized), before))
    assert holders(quantized)[0].compute_dtype == torch.float16
    assert quantized(input_ids=ids).logits.dtype == torch.float16


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(8, 256, 64), (3, 10, 33), (2, 7, 9), (5, 128, 300)])
def test_nf4_expert_bytes_from_shapes(shape, double_quant):
    holder = NF4Experts.from_parameter(torch.randn(shape), double_quant=double_quant)
    assert holder.nbytes == nf4_expert_bytes(*shape, double_quant)
    # predict's Linear4bit formula per expert, with the code tables kept once per holder
    experts, out_features, in_features = shape
    tables = 4 * 16 + (4 * 256 if double_quant else 0)
    assert holder.nbytes == experts * nf4_bytes(out_features * in_features, double_quant) - (experts - 1) * tables
    meta = NF4Experts(*shape, double_quant=double_quant, device="meta")  # shapes only, as `memft profile` builds
    assert meta.nbytes == holder.nbytes


def test_qwen3_30b_a3b_expert_bytes():
    # shapes only: 48 layers of 128 experts, hidden 2048, moe_intermediate 768
    layers, experts, hidden, inter = 48, 128, 2048, 768
    params = layers * experts * (2 * inter * hidden + hidden * inter)
    bf16 = 2 * params / GIB
    nf4_dq = layers * (nf4_expert_bytes(experts, 2 * inter, hidden, True)
                       + nf4_expert_bytes(experts, hidden, inter, True)) / GIB
    nf4 = layers * (nf4_expert_bytes(experts, 2 * inter, hidden, False)
                    + nf4_expert_bytes(experts, hidden, inter, False)) / GIB
    print(f"Qwen3-30B-A3B experts: {params:,} weights, bf16 {bf16:.2f} GiB, float32 {2 * bf16:.2f} GiB, "
          f"NF4 {nf4:.2f} GiB, NF4 + double quant {nf4_dq:.2f} GiB")
    assert math.isclose(bf16, 54.0, abs_tol=0.05)
    # bytes per weight: 1/2 + 4/64 without double quant; 1/2 + 1/64 + 4/(64 * 256) with it
    assert math.isclose(nf4, 15.19, abs_tol=0.005) and math.isclose(nf4_dq, 13.93, abs_tol=0.005)
    assert 3.8 < bf16 / nf4_dq < 3.9


def test_forward_dequantizes_one_expert_at_a_time(monkeypatch):
    model = tiny_moe("tiny-olmoe")
    quantize_experts(model)
    expert_args, dequantized_shapes, saved_shapes = [], [], []
    real_expert, real_dequantize = NF4Experts.expert, bnb_functional.dequantize_4bit

    def spy_expert(self, e, dtype=None):
        expert_args.append(e)
        return real_expert(self, e, dtype)

    def spy_dequantize(packed, quant_state=None, *args, **kwargs):
        dequantized_shapes.append(tuple(quant_state.shape))
        return real_dequantize(packed, quant_state, *args, **kwargs)

    monkeypatch.setattr(NF4Experts, "expert", spy_expert)
    monkeypatch.setattr(bnb_functional, "dequantize_4bit", spy_dequantize)
    ids = torch.randint(0, 512, (2, 16))
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved_shapes.append(tuple(t.shape)) or t, lambda t: t):
        loss = model(inputs_embeds=embeds).logits.square().mean()
    forward_calls = len(expert_args)
    loss.backward()
    assert forward_calls > 0 and len(expert_args) == 2 * forward_calls  # backward dequantizes again
    assert all(isinstance(e, int) and 0 <= e < 8 for e in expert_args)
    # each call decodes one expert matrix, gate_up (2I x H) or down (H x I), never a whole (E, out, in)
    hidden, inter = model.config.hidden_size, model.config.intermediate_size
    assert set(dequantized_shapes) == {(2 * inter * hidden,), (hidden * inter,)}
    # and no dequantized expert weight is kept for backward
    weight_shapes = {(2 * inter, hidden), (hidden, inter), (8, 2 * inter, hidden), (8, hidden, inter)}
    assert saved_shapes and not weight_shapes & set(saved_shapes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_a_chunk_of_experts_is_each_expert_bitwise(dtype, double_quant, quant_type):
    # 160 x 128: 320 blocks per expert, so the double quantization's 256-block groups end mid-expert
    holder = NF4Experts.from_parameter(torch.randn(5, 160, 128).to(dtype), quant_type, double_quant)
    for start, stop in ((0, 5), (1, 3), (4, 5)):
        chunk = holder.experts(start, stop, dtype)
        assert chunk.shape == (stop - start, 160, 128) and chunk.dtype == dtype
        assert all(torch.equal(chunk[i], holder.expert(start + i, dtype)) for i in range(stop - start))
    odd = NF4Experts.from_parameter(torch.randn(3, 10, 33), quant_type, double_quant)  # not whole blocks
    assert all(torch.equal(odd.experts(0, 3, torch.float32)[e], nf4_reference(odd, e)) for e in range(3))


def test_reader_dequantizes_bounded_chunks_in_one_call_each(monkeypatch):
    holder = NF4Experts.from_parameter(torch.randn(5, 64, 32))
    calls = []
    real = bnb_functional.dequantize_4bit
    monkeypatch.setattr(bnb_functional, "dequantize_4bit",
                        lambda packed, state, *a, **kw: calls.append(state.shape[0]) or real(packed, state, *a, **kw))
    reader = holder.reader(torch.float32, max_bytes=2 * 64 * 32 * 4)  # two experts per chunk
    read = {e: reader.expert(e, torch.float32) for e in (0, 1, 3, 4)}  # a pass that skips expert 2
    assert calls == [2 * 64 * 32, 2 * 64 * 32]  # experts [0, 2) and [3, 5), one call each
    assert all(torch.equal(w, holder.expert(e, torch.float32)) for e, w in read.items())
    with pytest.raises(ValueError, match="float32"):
        reader.expert(4, torch.bfloat16)


def test_expert_lora_on_4bit_experts_reads_bounded_chunks(monkeypatch):
    from memft.models.expert_lora import expert_lora

    E, H, inter, r = 6, 32, 16, 4
    gate_up, down = (NF4Experts.from_parameter(torch.randn(E, out, inp) * 0.1) for out, inp in
                     ((2 * inter, H), (H, inter)))
    x = torch.randn(20, H, requires_grad=True)
    weights, index = torch.randn(20, E).softmax(-1).topk(2)
    factors = [torch.randn(E, *shape, requires_grad=True) for shape in ((r, H), (2 * inter, r), (r, inter), (H, r))]

    real = bnb_functional.dequantize_4bit

    def run(chunk_bytes):
        monkeypatch.setattr(nf4_experts, "CHUNK_BYTES", chunk_bytes)
        calls = []
        monkeypatch.setattr(bnb_functional, "dequantize_4bit", lambda p, state, *a, **kw: calls.append(
            state.shape[0] * 4) or real(p, state, *a, **kw))
        for t in (x, *factors):
            t.grad = None
        out = expert_lora(x, index, weights, gate_up, down, *factors, scaling=2.0, act_fn=torch.nn.SiLU())
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return calls, [out.detach(), *(t.grad.clone() for t in (x, *factors))]

    one_by_one_calls, one_by_one = run(1)  # one expert per call
    chunked_calls, chunked = run(3 * 2 * inter * H * 4)  # three gate_up experts (six down) per call
    assert max(one_by_one_calls) == 2 * inter * H * 4 and len(chunked_calls) < len(one_by_one_calls)
    assert max(chunked_calls) <= 3 * 2 * inter * H * 4
    assert all(torch.equal(a, b) for a, b in zip(chunked, one_by_one))


def test_state_dict_round_trip():
    holder = NF4Experts.from_parameter(torch.randn(4, 32, 48))
    buffer = io.BytesIO()
    torch.save(holder.state_dict(), buffer)
    buffer.seek(0)
    loaded = NF4Experts(4, 32, 48)
    loaded.load_state_dict(torch.load(buffer))
    assert all(torch.equal(loaded.expert(e), holder.expert(e)) for e in range(4))

    # a whole quantized model through safetensors, into another quantized model
    source, target = tiny_moe("tiny-qwen2-moe"), tiny_moe("tiny-qwen2-moe")
    quantize_experts(source)
    quantize_experts(target)
    target.load_state_dict(safetensors_load(safetensors_save(source.state_dict())))
    for a, b in zip(holders(source), holders(target)):
        assert all(torch.equal(a.expert(e), b.expert(e)) for e in range(a.num_experts))
    ids = torch.randint(0, 512, (1, 8))
    assert torch.equal(source(input_ids=ids).logits, target(input_ids=ids).logits)


def test_unknown_fused_layout_is_refused():
    class TransposedExperts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.num_experts, self.act_fn, self.is_transposed = 4, torch.nn.SiLU(), True
            self.gate_up_proj = torch.nn.Parameter(torch.randn(4, 16, 8))
            self.down_proj = torch.nn.Parameter(torch.randn(4, 8, 8))

    with pytest.raises(UserError, match="cannot quantize the fused experts `experts`"):
        quantize_experts(torch.nn.ModuleDict({"experts": TransposedExperts()}))
    assert quantize_experts(torch.nn.Linear(4, 4)) == []
