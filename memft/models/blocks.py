"""One view over the layer stacks of the models memft supports, so strategies never special-case an architecture.

Llama-family decoders (Llama, Mistral, Qwen2/3, Mixtral, Qwen2-MoE/Qwen3-MoE, OLMoE) keep their layers
at `<base>.model.layers`; BERT-family encoders at `<base>.<bert>.encoder.layer`. peft wrappers are
looked through.
"""

from __future__ import annotations

import torch
from torch import nn

from memft.errors import UserError


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside peft wrappers (`PeftModel` -> `LoraModel` -> HF model)."""
    while hasattr(model, "get_base_model") and model.get_base_model() is not model:
        model = model.get_base_model()
    return model


def layer_stack(model: nn.Module) -> nn.ModuleList:
    """The ordered list of transformer blocks (decoder layers or encoder layers).

    Raises:
        UserError: when the architecture has no recognised layer stack.
    """
    hf = unwrap(model)
    base = getattr(hf, "base_model", hf)
    for path in ("layers", "model.layers", "encoder.layer", "transformer.h"):
        node = base
        for part in path.split("."):
            node = getattr(node, part, None)
            if node is None:
                break
        if isinstance(node, nn.ModuleList) and len(node) > 0:
            return node
    raise UserError(f"memft does not know where the layers of {type(hf).__name__} are; supported: Llama-family "
                    "decoders (dense and MoE) and BERT-family encoders")


def is_encoder(model: nn.Module) -> bool:
    """True for BERT-family encoders (bidirectional attention, [CLS] first)."""
    return not getattr(unwrap(model).config, "is_decoder", False) and hasattr(
        getattr(unwrap(model), "base_model", None), "encoder")


# --------------------------------------------------------------------------------------------
# Running a layer on a subset of its rows, with the other rows' keys and values as constants.
#
# Every supported architecture computes attention through transformers' attention interface
# (`ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module, q, k, v, mask, ...)`), after its
# own projections, q/k norms and rotary embeddings. memft registers one more implementation that
# behaves exactly like sdpa / eager unless a strategy has put the layer's attention modules into a
# mode: `capture` keeps the (post-rotary) keys and values of a full pass; `rows` lets queries of a
# subset of rows attend over all keys, with the subset's own keys/values (carrying gradients)
# scattered into the captured ones, under the original causal / padding / sliding-window mask.

_ATTN_PREFIX = "memft_rows_"


class RowAttention:
    """Per-layer state read by memft's attention implementation (set on each attention module)."""

    def __init__(self, shared: dict):
        self.shared = shared
        """One dict for all layers of a model: the rows' mask is built once per forward, saved once."""
        self.mode: str | None = None          # None | "capture" | "rows"
        self.keys: torch.Tensor | None = None  # (B, H_kv, T, head_dim), from the capture pass
        self.values: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None  # (B, k) the rows' original positions
        self.key_valid: torch.Tensor | None = None  # (B, T) bool, False at padding
        self.segments: torch.Tensor | None = None  # (B, T) packed rows: which example each token is in; or None
        self.causal = True


def _rows_attention(module, query, key, value, attention_mask, **kwargs):
    import sys

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    # eager: the architecture's own eager function, as its attention module would have called it
    base = (sdpa_attention_forward if module._memft_base == "sdpa"
            else sys.modules[type(module).__module__].eager_attention_forward)
    state: RowAttention | None = getattr(module, "_memft_rows", None)
    if state is None or state.mode is None:
        return base(module, query, key, value, attention_mask, **kwargs)
    if state.mode == "capture":
        state.keys, state.values = key.detach(), value.detach()
        return base(module, query, key, value, attention_mask, **kwargs)
    # rows: these rows' keys/values carry gradients; every other row's are the captured constants
    idx = state.positions[:, None, :, None].expand(-1, key.size(1), -1, key.size(-1))
    keys = state.keys.scatter(2, idx, key)
    values = state.values.scatter(2, idx, value)
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    mask = _rows_mask(state, query.dtype, window)
    kwargs.pop("is_causal", None)
    return base(module, query, keys, values, mask, is_causal=False, **kwargs)


def _rows_mask(state: RowAttention, dtype: torch.dtype, window: int | None) -> torch.Tensor:
    """Additive (B, 1, k, T) mask for the rows' queries: original causal order, padding, sliding window, and in
    packed rows (`state.segments`) the query's own example only.

    Built once per forward and shared by every layer, so autograd keeps one copy, not one per layer.
    """
    segments = state.segments
    key = (state.positions.data_ptr(), state.positions.shape, dtype, window,
           None if segments is None else segments.data_ptr())
    if state.shared.get("key") != key:
        T = state.key_valid.size(1)
        allowed = state.key_valid[:, None, None, :].expand(-1, 1, state.positions.size(1), -1)
        q_pos, k_pos = state.positions[:, None, :, None], torch.arange(T, device=state.positions.device)
        if state.causal:
            allowed = allowed & (k_pos <= q_pos)
        if window:
            allowed = allowed & (q_pos - k_pos < window)
        if segments is not None:  # (B, 1, k, 1) == (B, 1, 1, T): the key is in the query's example
            allowed = allowed & (segments.gather(1, state.positions)[:, None, :, None] == segments[:, None, None, :])
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        state.shared.update(key=key, mask=mask.masked_fill(~allowed, torch.finfo(dtype).min))
    return state.shared["mask"]


def attention_modules(layer: nn.Module) -> list[nn.Module]:
    """The self-attention modules inside one transformer layer."""
    return [m for m in layer.modules() if hasattr(m, "is_causal") and hasattr(m, "config")
            and not getattr(m, "is_cross_attention", False)]


def enable_row_attention(model: nn.Module) -> list[RowAttention]:
    """Route the model's attention through memft's row-aware implementation; one state per layer.

    Exact when no state is active (the same sdpa / eager call). Raises `UserError` for attention
    kernels other than sdpa and eager (e.g. flash attention), which take no arbitrary mask.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    config = unwrap(model).config
    current = config._attn_implementation
    base = current.removeprefix(_ATTN_PREFIX)
    if base not in ("sdpa", "eager"):
        raise UserError(f"attention `{base}` cannot take the masks this strategy needs; use "
                        "`model.attn_implementation: sdpa` or `eager`")
    name = _ATTN_PREFIX + base
    AttentionInterface.register(name, _rows_attention)
    AttentionMaskInterface.register(name, sdpa_mask if base == "sdpa" else eager_mask)
    config._attn_implementation = name
    states, shared = [], {}
    for layer in layer_stack(model):
        mods = attention_modules(layer)
        if not mods:
            raise UserError(f"no self-attention found in {type(layer).__name__}")
        state = getattr(mods[0], "_memft_rows", None) or RowAttention(shared)
        for m in mods:
            m._memft_rows, m._memft_base = state, base
        states.append(state)
    return states


def gather_rows(t: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`t[b, positions[b, i]]` for a (B, T, ...) tensor (batch dim 1 is broadcast) -> (B, k, ...).

    Advanced indexing, not `gather`: its backward keeps only the indices, never `t` itself.
    """
    batch = torch.arange(positions.size(0), device=positions.device)[:, None]
    return t[batch if t.size(0) > 1 else torch.zeros_like(batch), positions]


def scatter_rows(full: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A copy of `full` (B, T, D) with rows `positions` (B, k) replaced by `rows` (B, k, D); out of place."""
    return full.scatter(1, positions[..., None].expand(-1, -1, full.size(-1)), rows)


# --------------------------------------------------------------------------------------------
# A pre-norm decoder layer seen as its two residual branches.
#
# Every supported decoder computes `h = x + attention(x)`, then `out = h + ffn(h)`, where each branch
# starts with its own RMSNorm and the FFN is a dense MLP or a routed MoE block. Strategies that rewire
# the residual stream (RevFFN) call the branches directly.


def decoder_body(model: nn.Module) -> nn.Module:
    """The module that owns a decoder's `layers` and final `norm` (e.g. `LlamaModel`).

    Raises:
        UserError: for encoders and decoders memft cannot see as pre-norm residual layers.
    """
    hf = unwrap(model)
    body = getattr(hf, "model", None)
    layers = getattr(body, "layers", None)
    if is_encoder(model) or not isinstance(layers, nn.ModuleList) or not isinstance(getattr(body, "norm", None),
                                                                                    nn.Module):
        raise UserError(f"{type(hf).__name__} is not a Llama-family decoder (pre-norm layers with `self_attn` and "
                        "`mlp`); RevFFN supports Llama, Mistral, Qwen2/3, Mixtral, Qwen2-MoE/Qwen3-MoE and OLMoE")
    for layer in layers:
        missing = [a for a in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
                   if not hasattr(layer, a)]
        if missing:
            raise UserError(f"{type(layer).__name__} has no {', '.join(missing)}; it is not a pre-norm decoder layer "
                            "memft can rewire")
    return body


def attention_branch(layer: nn.Module, x: torch.Tensor, layer_kwargs: dict) -> torch.Tensor:
    """`attention(norm1(x))` with the arguments the model passed to the layer (mask, rotary, positions)."""
    out = layer.self_attn(hidden_states=layer.input_layernorm(x), **layer_kwargs)
    return out[0] if isinstance(out, tuple) else out


def ffn_branch(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`ffn(norm2(x))`: the dense MLP or the MoE block (router + experts [+ shared expert])."""
    out = layer.mlp(layer.post_attention_layernorm(x))
    return out[0] if isinstance(out, tuple) else out
