"""Sparse upcycling: a dense Llama-family causal LM -> a Mixtral mixture of experts (`model.upcycle`).

Komatsuzaki et al. 2022, "Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints": every
decoder layer's dense FFN is copied into `experts` identical experts and a new router picks `top_k` of
them per token. Attention, norms, embeddings and the LM head are copied unchanged.

Function preservation: Mixtral's router renormalises the top-k softmax weights to sum to 1, and every
expert computes the dense FFN, so at initialisation the MoE layer computes `(w_1 + ... + w_k) * FFN(x)
= FFN(x)`. The upcycled model computes the dense model's function up to float rounding. One rounding
is Mixtral's own: the router's softmax and renormalisation always run in float32, so with `top_k >= 2`
the weights sum to 1 only to about 1e-7 even in a float64 model (`top_k: 1` gives exactly 1).

Layout (transformers 5 fused experts, `MixtralExperts`): `mlp.experts.gate_up_proj` is
(experts, 2 * intermediate, hidden) with the gate projection's rows first and the up projection's
second (`forward` does `gate, up = linear(x, gate_up_proj[e]).chunk(2, dim=-1)`); `mlp.experts.down_proj`
is (experts, hidden, intermediate); the router `mlp.gate.weight` is (experts, hidden).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn

from memft.errors import UserError
from memft.models.load import experts_kernel, is_moe

if TYPE_CHECKING:
    from transformers import MixtralForCausalLM

SUPPORTED_TYPES = ("llama", "mistral")
"""Dense `model_type`s whose decoder layer is Mixtral's with a dense FFN (no biases, same norms and RoPE)."""

_FIX = "drop `model.upcycle`, or upcycle a dense Llama-family model such as `stories260K` or `tiny-llama`"


def check_upcyclable(config, name: str = "the model", *, quantized: bool = False) -> None:
    """Raise a `UserError` unless a model with `config` can be upcycled (`load_model` checks before loading weights).

    Args:
        config: the dense model's transformers config.
        name: the model's name, for the message.
        quantized: whether the model is (to be) loaded with a quantization config (`qlora`).
    """
    model_type = getattr(config, "model_type", "?")
    if is_moe(config):
        raise UserError(
            f"`model.upcycle`: `{name}` is already a mixture of experts ({model_type}); upcycling turns a dense "
            f"model into one; drop `model.upcycle` to train it as it is"
        )
    if model_type not in SUPPORTED_TYPES:
        why = " (its attention has q/k/v biases, which Mixtral's has not)" if model_type == "qwen2" else ""
        raise UserError(
            f"`model.upcycle`: `{name}` is a `{model_type}` model{why}; upcycling to Mixtral needs a dense "
            f"Llama-family causal LM ({', '.join(SUPPORTED_TYPES)}); {_FIX}"
        )
    biased = [k for k in ("attention_bias", "mlp_bias") if getattr(config, k, False)]
    if biased:
        raise UserError(
            f"`model.upcycle`: `{name}` has `{biased[0]}: true`, but Mixtral's attention and experts have no "
            f"biases, so the upcycled model could not compute the same function; {_FIX}"
        )
    if quantized or getattr(config, "quantization_config", None) is not None:
        raise UserError(
            f"`model.upcycle`: `{name}` is loaded quantized (4-bit, `qlora`), and quantized weights cannot be "
            "copied into experts; use `lora` (or `full`) on the upcycled model instead of `qlora`, or drop "
            "`model.upcycle`"
        )


def upcycle(
    model: nn.Module, experts: int, top_k: int, router_std: float = 0.02, seed: int = 0
) -> MixtralForCausalLM:
    """A `MixtralForCausalLM` whose every layer holds `experts` copies of `model`'s dense FFN.

    Args:
        model: a dense `LlamaForCausalLM` or `MistralForCausalLM` (not quantized, not wrapped by peft).
        experts: experts per layer (>= 2); each starts as an exact copy of the layer's FFN.
        top_k: experts each token is routed to (1 <= top_k <= experts).
        router_std: std of the new routers' normal(0, std) init. Small values keep the routing near
            uniform; the model's output does not depend on it at initialisation (identical experts).
        seed: seeds a private `torch.Generator` for the routers (torch's global generator is untouched).
            Router weights are drawn in float32 and then cast, so every dtype starts from the same ones.

    Returns:
        The Mixtral model on `model`'s device, in `model`'s dtype and train/eval mode, with its attention
        implementation and generation config, and the eager experts kernel in float64 (transformers'
        default `grouped_mm` takes no float64), as `load_model` does for MoE models. Attention, norms,
        embeddings and LM head hold `model`'s values; tied embeddings and LM head stay tied.

    Raises:
        UserError: the model is not a dense Llama-family causal LM (an MoE, a classification model,
            a quantized model, another architecture), or `experts`/`top_k` are out of range.
    """
    from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedModel

    if experts < 2:
        raise UserError(f"`model.upcycle.experts` must be at least 2 (got {experts})")
    if not 1 <= top_k <= experts:
        raise UserError(f"`model.upcycle.top_k` must be between 1 and `experts` ({experts}) (got {top_k})")
    if not isinstance(model, PreTrainedModel):  # e.g. already wrapped by peft: upcycle before adding adapters
        raise UserError(f"`model.upcycle`: a `{type(model).__name__}` is not a plain transformers model; {_FIX}")
    config = model.config
    name = getattr(config, "_name_or_path", "") or "the model"
    quantized = getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None
    check_upcyclable(config, name, quantized=quantized)
    if not type(model).__name__.endswith("ForCausalLM"):
        raise UserError(
            f"`model.upcycle`: `{name}` is loaded as `{type(model).__name__}`, not a causal LM; upcycling works on "
            "`model.task: causal_lm` only (a classification head would be new anyway); set `model.task: causal_lm` "
            "or drop `model.upcycle`"
        )

    dtype = next(model.parameters()).dtype
    new_config = MixtralConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.initializer_range,
        rms_norm_eps=config.rms_norm_eps,
        use_cache=config.use_cache,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        tie_word_embeddings=config.tie_word_embeddings,
        # Llama has none; Mistral's window is part of the function to preserve.
        sliding_window=getattr(config, "sliding_window", None),
        attention_dropout=config.attention_dropout,
        rope_parameters=copy.deepcopy(config.rope_parameters),
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        output_router_logits=False,
        router_jitter_noise=0.0,
        architectures=["MixtralForCausalLM"],
        dtype=dtype,
    )  # router_aux_loss_coef: MixtralConfig's default (it only counts with output_router_logits)
    new_config._name_or_path = config._name_or_path

    state = _upcycled_state_dict(model, experts, router_std, seed)
    kwargs = {"attn_implementation": config._attn_implementation}
    if kernel := experts_kernel(new_config, dtype):
        kwargs["experts_implementation"] = kernel
    new, info = MixtralForCausalLM.from_pretrained(
        None, config=new_config, state_dict=state, dtype=dtype, output_loading_info=True, **kwargs
    )
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:  # a transformers change in Mixtral's layout; never a user mistake
        raise RuntimeError(f"upcycling {type(model).__name__} to Mixtral left weights unmatched: {problems}")
    new.generation_config = copy.deepcopy(model.generation_config)
    new.to(next(model.parameters()).device)
    new.train(model.training)
    return new


@torch.no_grad()
def _upcycled_state_dict(model: nn.Module, experts: int, router_std: float, seed: int) -> dict[str, torch.Tensor]:
    """Mixtral's state dict: the dense FFN of each layer stacked `experts` times, plus seeded routers."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        prefix, dot, leaf = key.partition(".mlp.")
        if not dot:
            state[key] = value  # attention, norms, embeddings, LM head: shared, not copied
        elif leaf == "gate_proj.weight":
            mlp = model.get_submodule(f"{prefix}.mlp")
            gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0)  # gate rows first
            state[f"{prefix}.mlp.experts.gate_up_proj"] = gate_up.unsqueeze(0).repeat(experts, 1, 1)
            state[f"{prefix}.mlp.experts.down_proj"] = mlp.down_proj.weight.unsqueeze(0).repeat(experts, 1, 1)
            router = torch.empty(experts, mlp.gate_proj.weight.shape[1], dtype=torch.float32)
            router.normal_(0.0, router_std, generator=generator)
            state[f"{prefix}.mlp.gate.weight"] = router.to(value.dtype).to(value.device)
        elif leaf not in ("up_proj.weight", "down_proj.weight"):
            raise UserError(f"`model.upcycle`: unexpected FFN weight `{key}` in `{type(model).__name__}`; {_FIX}")
    return state
