"""4-bit storage of fused MoE experts: one bitsandbytes NF4 (or FP4) quantization per expert matrix.

transformers 5 keeps a MoE layer's routed experts as two fused 3-D parameters of one module (`MixtralExperts`,
`Qwen2MoeExperts`, `Qwen3MoeExperts`, `OlmoeExperts`): `gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I),
applied as `F.linear(x, W[e])`. bitsandbytes quantizes only `nn.Linear`, so QLoRA left them in full precision
(114 GiB for Qwen3-30B-A3B). Here each expert matrix `W[e]` gets its own `bitsandbytes.functional.quantize_4bit`
(blocksize 64 as `Linear4bit`, double quantization when asked), stacked expert by expert so that dequantizing
expert e reads only expert e's bytes.

Every caller reads expert weights through a provider with one interface, quantized or not (`expert_weights`):

* `expert(e, dtype) -> (out, in)`: expert e's weight in `dtype`, one expert at a time; the 4-bit holder's
  `reader(dtype)` serves a pass over the experts from bounded chunks (`CHUNK_BYTES`, one bitsandbytes call
  each; memft's expert LoRA reads through it);
* `linear(x, e)`: `F.linear(x, W[e])`. The 4-bit one dequantizes again in backward instead of keeping the
  dequantized weight for it (the experts are frozen, so only `x`'s gradient needs it), as bitsandbytes'
  `MatMul4Bit` does: saving it would keep every hit expert of every layer in full precision until backward.

`quantize_experts(model, ...)` replaces both parameters of every fused experts module by `NF4Experts` holders
and gives the module a forward that is transformers' eager experts loop reading `W[e]` through the providers.
QLoRA loading (`memft.models.load.experts_quantized_on_load`) does the same per weight as each one is loaded
(`store_experts_weight`), so `quantize_experts` then finds nothing left to quantize.
Routers, shared experts (ordinary `nn.Linear`, which bitsandbytes quantizes itself) and everything else are
left as they are; frozen weights keep the model's dtype.
"""

from __future__ import annotations

import math
import types

import torch
import torch.nn.functional as F
from torch import nn

from memft.errors import UserError

BLOCKSIZE = 64
"""Weights per absmax, bitsandbytes' `Linear4bit` default."""
NESTED_BLOCKSIZE = 256
"""With double quantization the absmax values are 8-bit in blocks of 256."""
CODE_BYTES, NESTED_CODE_BYTES = 4 * 16, 4 * 256
"""The 16 float32 levels of NF4/FP4 and the 256 float32 levels of the 8-bit map of the absmax values."""
QUANT_TYPES = ("nf4", "fp4")
EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")
"""The two fused weights of an experts module, (E, 2I, H) and (E, H, I)."""
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""The dtypes bitsandbytes quantizes from and dequantizes to."""
CHUNK_BYTES = 32 * 2**20
"""At most this many bytes of dequantized experts per call in a pass over a layer's experts (`reader`), one expert
at least: one bitsandbytes call per chunk instead of per expert (whose fixed cost dominates at small widths)."""


def nf4_expert_bytes(num_experts: int, out_features: int, in_features: int, double_quant: bool) -> int:
    """Bytes an `NF4Experts` of this shape stores: packed nibbles, absmax values (8-bit with their own float32
    constants and offset under double quantization) and the two code tables.

    A bitsandbytes `Linear4bit` stores what a holder of one expert does (`predict.nf4_bytes` is this with E = 1);
    the code tables (the same fixed levels for every expert) are kept once per holder, not once per expert.
    """
    numel = out_features * in_features
    blocks = math.ceil(numel / BLOCKSIZE)
    per_expert = math.ceil(numel / 2)  # two weights per byte
    if double_quant:
        per_expert += blocks + 4 * math.ceil(blocks / NESTED_BLOCKSIZE) + 4  # uint8 absmax, its float32 absmax, offset
        return num_experts * per_expert + CODE_BYTES + NESTED_CODE_BYTES
    return num_experts * (per_expert + 4 * blocks) + CODE_BYTES


class NF4Experts(nn.Module):
    """A fused (E, out, in) expert weight in 4 bits, quantized expert by expert; its data are buffers, so `.to()`,
    `state_dict()` and `load_state_dict()` work as for any module.

    Buffers (row e belongs to expert e only):
        packed (E, ceil(out*in/2)) uint8: two 4-bit codes per byte, as `quantize_4bit` packs them.
        absmax (E, blocks): float32, or uint8 under double quantization.
        code (16,) float32: the NF4/FP4 levels.
        nested_absmax (E, ceil(blocks/256)) float32, nested_code (256,) float32, offset (E,) float32: only under
            double quantization, bitsandbytes' `state2` and `offset` of each expert's quantization.

    Args:
        compute_dtype: the dtype `expert()` returns by default; the dtype of the weight it was made from.
    """

    def __init__(self, num_experts: int, out_features: int, in_features: int, quant_type: str = "nf4",
                 double_quant: bool = True, compute_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if quant_type not in QUANT_TYPES:
            raise UserError(f"4-bit experts take quant_type `nf4` or `fp4`, not `{quant_type}`")
        self.num_experts, self.out_features, self.in_features = num_experts, out_features, in_features
        self.quant_type, self.double_quant, self.compute_dtype = quant_type, double_quant, compute_dtype
        numel = out_features * in_features
        blocks = math.ceil(numel / BLOCKSIZE)

        def zeros(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        self.register_buffer("packed", zeros(num_experts, math.ceil(numel / 2), dtype=torch.uint8))
        self.register_buffer("absmax", zeros(num_experts, blocks, dtype=torch.uint8 if double_quant else torch.float32))
        self.register_buffer("code", zeros(16))
        if double_quant:
            self.register_buffer("nested_absmax", zeros(num_experts, math.ceil(blocks / NESTED_BLOCKSIZE)))
            self.register_buffer("nested_code", zeros(256))
            self.register_buffer("offset", zeros(num_experts))

    @classmethod
    def from_parameter(cls, param: torch.Tensor, quant_type: str = "nf4", double_quant: bool = True,
                       compute_dtype: torch.dtype | None = None) -> NF4Experts:
        """Quantize a fused (E, out, in) weight one expert matrix at a time, on the weight's device.

        Raises:
            UserError: for a weight that is not 3-D or whose dtype bitsandbytes does not quantize (float64).
        """
        import bitsandbytes.functional as bnb_functional

        if param.dim() != 3:
            raise UserError(f"4-bit experts quantize a fused (experts, out, in) weight, not one of shape "
                            f"{tuple(param.shape)}")
        if param.dtype not in KERNEL_DTYPES:
            raise UserError(f"bitsandbytes quantizes float32, bfloat16 and float16 weights, not {param.dtype}; "
                            "use `model.dtype: float32` or `bfloat16` for 4-bit experts")
        holder = cls(*param.shape, quant_type=quant_type, double_quant=double_quant,
                     compute_dtype=compute_dtype or param.dtype, device=param.device)
        if param.is_meta:  # `memft profile`'s skeleton: the buffers' shapes are all it needs
            return holder
        with torch.no_grad():
            for e in range(param.shape[0]):
                packed, state = bnb_functional.quantize_4bit(
                    param[e].detach().contiguous(), blocksize=BLOCKSIZE, compress_statistics=double_quant,
                    quant_type=quant_type)
                holder._store(e, packed, state)
        return holder

    def _store(self, e: int, packed: torch.Tensor, state) -> None:
        self.packed[e] = packed.reshape(-1)
        self.absmax[e] = state.absmax
        self.code.copy_(state.code)  # the same fixed levels for every expert
        if self.double_quant:
            self.nested_absmax[e] = state.state2.absmax
            self.nested_code.copy_(state.state2.code)
            self.offset[e] = state.offset

    def quant_state(self, e: int, dtype: torch.dtype):
        """bitsandbytes' `QuantState` of expert e (views of its own rows), dequantizing to `dtype`.

        Its shape is flat, (out*in,) rounded up to even: quantization runs over the flattened matrix either way,
        and bitsandbytes 0.50's CPU kernel takes only even last dimensions (an odd one goes to a torch.compile'd
        fallback that compiles for seconds per shape). The packed bytes already hold that last nibble, and it
        falls in the last block, so the first out*in values are the same.
        """
        from bitsandbytes.functional import QuantState

        nested = {}
        if self.double_quant:
            nested = {"offset": self.offset[e], "state2": QuantState(
                absmax=self.nested_absmax[e], code=self.nested_code, blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)}
        return QuantState(absmax=self.absmax[e], shape=torch.Size([2 * self.packed.shape[1]]),
                          code=self.code, blocksize=BLOCKSIZE, quant_type=self.quant_type, dtype=dtype, **nested)

    def expert(self, e: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Expert e's dequantized weight, shape (out, in), in `dtype` (default `compute_dtype`); no gradient."""
        import bitsandbytes.functional as bnb_functional  # looked up per call, so tests can watch it

        dtype = dtype or self.compute_dtype
        kernel_dtype = dtype if dtype in KERNEL_DTYPES else torch.float32  # float64 callers get an exact upcast
        weight = bnb_functional.dequantize_4bit(self.packed[e], self.quant_state(e, kernel_dtype))
        numel = self.out_features * self.in_features
        return weight.view(-1)[:numel].view(self.out_features, self.in_features).to(dtype)

    def experts(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Experts `start..stop-1` dequantized, (stop - start, out, in) in `dtype`, in one bitsandbytes call.

        Each expert's values start a fresh block when out*in is a multiple of the blocksize (every real model), so
        the experts' packed rows and absmax values, end to end, are one quantization with the same blocks and
        each value is its own expert's `code[nibble] * absmax`. Otherwise it is `expert()` one by one.
        Double quantization's absmax values are dequantized here as bitsandbytes does (`nested_code[q] *
        nested_absmax + offset`), for all the chunk's experts at once.
        """
        import bitsandbytes.functional as bnb_functional
        from bitsandbytes.functional import QuantState

        numel = self.out_features * self.in_features
        if numel % BLOCKSIZE:
            return torch.stack([self.expert(e, dtype) for e in range(start, stop)])
        kernel_dtype = dtype if dtype in KERNEL_DTYPES else torch.float32
        absmax = self.absmax[start:stop]
        if self.double_quant:
            scale = self.nested_absmax[start:stop].repeat_interleave(NESTED_BLOCKSIZE, dim=1)[:, :absmax.shape[1]]
            absmax = self.nested_code[absmax.long()] * scale + self.offset[start:stop, None]
        state = QuantState(absmax=absmax.reshape(-1), shape=torch.Size([(stop - start) * numel]), code=self.code,
                           blocksize=BLOCKSIZE, quant_type=self.quant_type, dtype=kernel_dtype)
        weight = bnb_functional.dequantize_4bit(self.packed[start:stop].reshape(-1), state)
        return weight.view(stop - start, self.out_features, self.in_features).to(dtype)

    def reader(self, dtype: torch.dtype, max_bytes: int | None = None) -> ExpertChunks:
        """An `expert(e, dtype)` source for one pass over the experts in increasing order that dequantizes them a
        bounded chunk at a time (`experts`, at most `max_bytes`, default `CHUNK_BYTES`); one chunk is alive."""
        max_bytes = CHUNK_BYTES if max_bytes is None else max_bytes
        per_chunk = max(1, max_bytes // (self.out_features * self.in_features * dtype.itemsize))
        return ExpertChunks(self, dtype, per_chunk)

    def linear(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """`F.linear(x, W[e])` for x (..., in) -> (..., out), keeping nothing of W[e] for backward."""
        return _DequantizedLinear.apply(x, self, e)

    @property
    def nbytes(self) -> int:
        """Bytes stored: packed data, absmax values, double-quantization statistics and code tables."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def _apply(self, fn, recurse=True):
        # `model.to(dtype)` casts every float buffer: the absmax values and code tables must stay float32 (as in
        # bitsandbytes' Params4bit), so they only move; the requested float dtype becomes the compute dtype
        for name, buf in self._buffers.items():
            moved = fn(buf)
            if moved.dtype != buf.dtype:
                if moved.is_floating_point():
                    self.compute_dtype = moved.dtype
                moved = buf.to(moved.device)
            self._buffers[name] = moved
        return self

    def extra_repr(self) -> str:
        return (f"{self.num_experts}, {self.out_features}, {self.in_features}, quant_type={self.quant_type}, "
                f"double_quant={self.double_quant}, compute_dtype={self.compute_dtype}")


class _DequantizedLinear(torch.autograd.Function):
    """x @ W[e]^T with a frozen 4-bit W: backward dequantizes W[e] again rather than saving it."""

    @staticmethod
    def forward(ctx, x, holder: NF4Experts, e: int):
        ctx.holder, ctx.e, ctx.x_dtype = holder, e, x.dtype
        # dequantize straight into the dtype the matmul runs in (autocast's, when it is on)
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        return F.linear(x, holder.expert(e, dtype))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        # under autocast the output (and its gradient) may be in another dtype than x
        grad_x = grad_out @ ctx.holder.expert(ctx.e, grad_out.dtype)
        return grad_x.to(ctx.x_dtype), None, None


class ExpertChunks:
    """`NF4Experts.reader`: expert e's weight from the chunk of experts that holds it, dequantizing the next chunk,
    starting at e, when e is outside the current one."""

    def __init__(self, holder: NF4Experts, dtype: torch.dtype, per_chunk: int):
        self.holder, self.dtype, self.per_chunk = holder, dtype, per_chunk
        self.start, self.chunk = 0, None

    def expert(self, e: int, dtype: torch.dtype) -> torch.Tensor:
        if dtype != self.dtype:
            raise ValueError(f"this reader dequantizes to {self.dtype}, not {dtype}")
        if self.chunk is None or not self.start <= e < self.start + self.chunk.shape[0]:
            self.chunk = None  # free the last chunk first
            self.start = e
            self.chunk = self.holder.experts(e, min(e + self.per_chunk, self.holder.num_experts), dtype)
        return self.chunk[e - self.start]


class DenseExperts:
    """The provider interface over a plain fused (E, out, in) parameter, so callers never branch on quantization."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        self.num_experts, self.out_features, self.in_features = weight.shape

    def expert(self, e: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Expert e's weight (out, in) in `dtype`: a view, with the parameter's gradient if it has one."""
        return self.weight[e] if dtype is None else self.weight[e].to(dtype)

    def linear(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return F.linear(x, self.weight[e])


def expert_weights(module: nn.Module, name: str) -> NF4Experts | DenseExperts:
    """The provider of a fused experts module's `gate_up_proj` or `down_proj`, 4-bit or not."""
    weight = getattr(module, name)
    return weight if isinstance(weight, NF4Experts) else DenseExperts(weight)


def experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' eager experts loop (`MixtralExperts.forward`; Qwen2-MoE's, Qwen3-MoE's and OLMoE's are the
    same computation) with `W[e]` read through the providers. Shapes: hidden_states (T, H), top_k_index and
    top_k_weights (T, k) -> (T, H)."""
    final_hidden_states = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    gate_up_proj, down_proj = expert_weights(self, "gate_up_proj"), expert_weights(self, "down_proj")
    for e in expert_hit[:, 0].tolist():  # one host sync for the whole layer
        if e == self.num_experts:  # transformers' slot for dropped assignments
            continue
        top_k_pos, token_idx = torch.where(expert_mask[e])
        gate, up = gate_up_proj.linear(hidden_states[token_idx], e).chunk(2, dim=-1)
        current = down_proj.linear(self.act_fn(gate) * up, e)
        current = current * top_k_weights[token_idx, top_k_pos, None]
        final_hidden_states.index_add_(0, token_idx, current.to(final_hidden_states.dtype))
    return final_hidden_states


def fused_experts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module that holds fused 3-D `gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I)
    parameters, the layout `experts_forward` computes.

    Raises:
        UserError: for fused experts in another layout (biases, transposed weights, no `act_fn`), whose forward
            `experts_forward` would silently change.
    """
    found = []
    for name, module in model.named_modules():
        gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
        if not (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter)
                and gate_up.dim() == 3 and down.dim() == 3):
            continue
        experts, two_inter, hidden = gate_up.shape
        standard = (down.shape == (experts, hidden, two_inter // 2) and getattr(module, "num_experts", None) == experts
                    and hasattr(module, "act_fn") and not getattr(module, "has_bias", False)
                    and not getattr(module, "is_transposed", False) and getattr(module, "has_gate", True))
        if not standard:
            raise UserError(f"memft cannot quantize the fused experts `{name}` ({type(module).__name__}): its "
                            f"layout (gate_up_proj {tuple(gate_up.shape)}, down_proj {tuple(down.shape)}) is not "
                            "the Mixtral/Qwen-MoE/OLMoE one; supported: Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE")
        found.append((name, module))
    return found


def quantize_experts(model: nn.Module, quant_type: str = "nf4", double_quant: bool = True,
                     compute_dtype: torch.dtype | None = None) -> list[str]:
    """Store every fused experts module's two weights in 4 bits and give it a forward that reads them one expert
    at a time. Returns the names of the modules quantized (none for a dense model).

    A model whose experts are already 4-bit (`memft.models.load` quantizes them while loading) has no fused
    parameters left: nothing is quantized twice.

    Args:
        compute_dtype: the dtype `expert()` returns by default (the weight's own dtype when None); the forward
            computes in the dtype of its input.
    """
    names = []
    for name, module in fused_experts(model):
        for weight_name in EXPERT_WEIGHTS:
            store_experts_weight(module, weight_name, getattr(module, weight_name), quant_type, double_quant,
                                 compute_dtype)
        names.append(name)
    return names


def store_experts_weight(module: nn.Module, weight_name: str, weight: torch.Tensor, quant_type: str = "nf4",
                         double_quant: bool = True, compute_dtype: torch.dtype | None = None) -> NF4Experts:
    """Quantize `weight` (E, out, in) into an `NF4Experts` that replaces the experts module's `weight_name`
    parameter, and give the module the forward that reads it (a still full-precision other weight reads as is).
    `quantize_experts` calls it for each weight of a loaded model; loading calls it as each weight arrives."""
    holder = NF4Experts.from_parameter(weight, quant_type, double_quant, compute_dtype)
    delattr(module, weight_name)  # frees the full-precision parameter (a meta one while loading)
    setattr(module, weight_name, holder)
    # an instance attribute wins over the class's forward, and over transformers' `experts_implementation`
    # dispatch (grouped_mm / batched_mm index the whole 3-D weight)
    module.forward = types.MethodType(experts_forward, module)
    return holder
