"""Model and tokenizer loading: built-in configs (`configs/`), local directories, hub ids, 4-bit QLoRA."""

from memft.models.load import (
    LoadedModel,
    count_params,
    is_moe,
    list_builtin,
    load_model,
    load_tokenizer,
    resolve_device,
)

__all__ = ["LoadedModel", "count_params", "is_moe", "list_builtin", "load_model", "load_tokenizer", "resolve_device"]
