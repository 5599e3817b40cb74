"""One view over the layer stacks of the models memft supports, so strategies never special-case an architecture.

Llama-family decoders (Llama, Mistral, Qwen2/3, Mixtral, Qwen2-MoE/Qwen3-MoE, OLMoE) keep their layers
at `<base>.model.layers`; BERT-family encoders at `<base>.<bert>.encoder.layer`. peft wrappers are
looked through.
"""

from __future__ import annotations

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
