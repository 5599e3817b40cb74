"""Models and tokenizers: the built-in names (`builtin`), loading (`load`), and the parts memft changes in them
(`blocks`, `moe`, `expert_lora`, `nf4_experts`, `upcycle`, ...).

Import from the submodules: the package itself imports nothing, so `memft validate` and `memft recipes`, which only
look up built-in names, never import torch or transformers.
"""
