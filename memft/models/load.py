"""Load the model and tokenizer a recipe names: a built-in from `configs/`, a local directory, or a hub id.

Name resolution (`model.name`, and `model.tokenizer` the same way), first match wins:

1. a built-in: `configs/NAME.json` (an HF config, randomly initialised with `model.seed`) or
   `configs/NAME/` (a directory with config.json and weights, loaded pretrained); `NAME.json` works too;
2. an existing local directory: `from_pretrained(dir, local_files_only=True)`, or a local config
   `.json` file (randomly initialised, like a config-only built-in);
3. a Hugging Face hub id: `from_pretrained(id)` (needs a network unless the files are cached).

A built-in's config may carry a `"_memft"` key (`description` for `memft recipes`, `tokenizer` naming
the built-in whose tokenizer it uses); it is removed before transformers sees the config.

Sparse upcycling (`model.upcycle`): the loaded dense Llama-family causal LM is turned into a Mixtral MoE
(`memft.models.upcycle`) before `load_model` returns it, so the rest of memft sees an MoE.

QLoRA: with a 4-bit `BitsAndBytesConfig`, transformers replaces every `nn.Linear` except the output head
(LM head or classification `score`) with a bitsandbytes `Linear4bit`, quantizing each weight as it is loaded.
Fused MoE expert weights (transformers 5 stores each layer's experts as 3-D `nn.Parameter`s, not `nn.Linear`)
are stored in 4 bits the same way, one weight at a time, as `NF4Experts` (`experts_quantized_on_load`): at most
one layer's `gate_up_proj` or `down_proj` exists in full precision while loading. Routers (`...TopKRouter`, a
bare 2-D parameter) stay in full precision.
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from pickle import UnpicklingError
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError, safe_open
from torch import nn

from memft.errors import UserError
from memft.models.builtin import META_KEY, Builtin, all_builtins, find_builtin, looks_like_model_path, read_config_file
from memft.models.nf4_experts import EXPERT_WEIGHTS, NF4Experts, fused_experts, store_experts_weight
from memft.paths import CONFIGS_DIR
from memft.recipe import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}

# Config keys that may change on a pretrained model: none of them changes a weight's shape.
PRETRAINED_SAFE_OVERRIDES = frozenset({
    "hidden_dropout_prob", "attention_probs_dropout_prob",
    "attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "classifier_dropout",
    "use_cache", "output_router_logits", "router_aux_loss_coef", "router_jitter_noise", "num_experts_per_tok",
})

_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
               dict: "a mapping"}

# Config attributes that hold a model's number of routed experts, across MoE families.
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


@dataclass
class LoadedModel:
    model: nn.Module
    """The model on the device, in `cfg.dtype` (4-bit weights excepted), in eval mode; `config.use_cache` is False."""
    source: str
    """Where it came from, for logs: "built-in stories260K (pretrained)", "built-in tiny-mixtral (random init,
    seed 0)", "local /abs/path" or "hub org/name"; with `model.upcycle`, followed by ", upcycled to 4 experts,
    top-k 2"."""
    is_moe: bool
    """Whether the model routes tokens to experts (Mixtral, Qwen2-MoE, OLMoE, ...)."""


def _tokenizer_dir(builtin: Builtin) -> Path:
    """The built-in directory holding `builtin`'s tokenizer: its own, or the one `_memft.tokenizer` names."""
    if builtin.pretrained and (builtin.path / "tokenizer_config.json").is_file():
        return builtin.path
    other = all_builtins().get(builtin.meta.get("tokenizer", ""))
    if other is None or not (other.path / "tokenizer_config.json").is_file():
        raise UserError(f"built-in `{builtin.name}` has no tokenizer; set `model.tokenizer` (e.g. `stories260K`)")
    return other.path


def _not_found(name: str, what: str, reason: str) -> UserError:
    guess = difflib.get_close_matches(name.removesuffix(".json"), list(all_builtins()), n=1)
    hint = f"; did you mean `{guess[0]}`?" if guess else ""
    return UserError(
        f"could not load {what} `{name}`: not a built-in (`memft recipes` lists them{hint}), not a local "
        f"directory, and the hub could not be reached (offline?) or has no such repository: {reason}"
    )


def _no_such_path(name: str, field: str) -> UserError:
    guess = difflib.get_close_matches(Path(name).name.removesuffix(".json"), list(all_builtins()), n=1)
    hint = f"; did you mean the built-in `{guess[0]}`?" if guess else ""
    return UserError(
        f"`{field}`: `{name}` does not exist (a local model is a directory with config.json and weights, "
        f"or a config .json file for a random init){hint}"
    )


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


# --------------------------------------------------------------------------------------------
# device, tokenizer


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA when a GPU is visible, else CPU; `cuda` without a GPU is a `UserError`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("`model.device: cuda` but no CUDA GPU is visible; use `model.device: auto` or `cpu`")
    return torch.device(name)


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer for `cfg`: `cfg.tokenizer` if set, else the model's own.

    A built-in without its own tokenizer files uses the one its `_memft.tokenizer` names (the tiny
    random-init models share stories260K's 512-token vocabulary). A path to a SentencePiece `.model`
    file is converted on the fly (`memft.models.tokenizer`). The tokenizer is returned as its files
    define it: stories260K has no pad token, so callers pad with EOS (or whatever they choose).

    Raises:
        UserError: the name is not a built-in, a local directory or a reachable hub repository.
    """
    from transformers import AutoTokenizer

    name = cfg.tokenizer or cfg.name
    what = "tokenizer" if cfg.tokenizer else "the tokenizer of model"
    builtin = find_builtin(name)
    if builtin is not None:
        return AutoTokenizer.from_pretrained(_tokenizer_dir(builtin), local_files_only=True)

    path = Path(name).expanduser()
    if path.suffix == ".model" and path.is_file():
        from memft.models.tokenizer import sentencepiece_to_fast

        return sentencepiece_to_fast(path)
    try:
        if path.is_dir():
            return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=cfg.trust_remote_code)
        if looks_like_model_path(name):
            raise _no_such_path(name, "model.tokenizer" if cfg.tokenizer else "model.name")
        return AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        if path.is_dir():
            raise UserError(f"could not load a tokenizer from `{path}`: {_first_line(exc)}") from None
        raise _not_found(name, what, _first_line(exc)) from None


# --------------------------------------------------------------------------------------------
# model


def load_model(
    cfg: ModelConfig,
    *,
    num_labels: int | None = None,
    quantization_config: Any = None,
    pad_token_id: int | None = None,
) -> LoadedModel:
    """Build or load the model `cfg` names, on `resolve_device(cfg.device)`, in `cfg.dtype`.

    Args:
        cfg: the recipe's `model` block.
        num_labels: classes for `task: sequence_classification` (falls back to `cfg.num_labels`).
        quantization_config: a `transformers.BitsAndBytesConfig` (4-bit NF4 for QLoRA) or None.
        pad_token_id: the id the collator pads with; sequence classification needs it to find each
            row's last real token. Stored as `config.pad_token_id` when given.

    Random weights (config-only built-ins, new classification heads) come from
    `torch.manual_seed(cfg.seed)`: the global generator is reseeded. They are drawn in float32 and
    then cast, so every `cfg.dtype` starts from the same weights. With `cfg.upcycle`, the loaded dense
    model is upcycled to Mixtral (`memft.models.upcycle.upcycle`); its routers come from a private
    generator seeded with `cfg.seed`.

    Returns:
        `LoadedModel` with the model in eval mode (the caller switches to train mode).

    Raises:
        UserError: unknown name, a bad `config_overrides` key, an architecture change asked of
            pretrained weights, a missing `num_labels`, a task the architecture does not support, or
            `cfg.upcycle` on a model that is not a dense Llama-family causal LM or is loaded in 4 bits.
    """
    device = resolve_device(cfg.device)
    dtype = DTYPES[cfg.dtype]
    if quantization_config is not None and dtype == torch.float64:
        raise UserError("4-bit quantization (QLoRA) does not support `model.dtype: float64`; use float32 or bfloat16")
    resolved = resolve_config(cfg, num_labels=num_labels, pad_token_id=pad_token_id)
    config, source = resolved.config, resolved.source
    if cfg.upcycle is not None:
        from memft.models.upcycle import check_upcyclable

        check_upcyclable(config, cfg.name, quantized=quantization_config is not None)  # before loading weights
    model = build_model(config, cfg, weights=resolved.weights, hub_kwargs=resolved.hub_kwargs,
                        quantization_config=quantization_config, device=device)
    moe = is_moe(config)
    if cfg.upcycle is not None:
        from memft.models.upcycle import upcycle

        up = cfg.upcycle
        model = upcycle(model, up.experts, up.top_k, router_std=up.router_std, seed=cfg.seed)
        source += f", upcycled to {up.experts} experts, top-k {up.top_k}"
        moe = True
    if quantization_config is None:
        model = model.to(device)
    model.eval()
    return LoadedModel(model=model, source=source, is_moe=moe)


def skeleton_model(cfg: ModelConfig, *, num_labels: int | None = None, pad_token_id: int | None = None) -> LoadedModel:
    """The model `load_model(cfg)` builds, on the meta device: the same modules, names, shapes and dtypes, no storage
    and no weights read. A torchrun job's ranks but rank 0 build this and receive their shards from rank 0
    (`memft.train.distributed.World.shard`), which checks that the two agree."""
    resolved = resolve_config(cfg, num_labels=num_labels, pad_token_id=pad_token_id)
    model = meta_model(resolved.config, cfg)
    model.eval()
    return LoadedModel(model=model, source=f"{resolved.source}, weights sent by rank 0", is_moe=is_moe(resolved.config))


def meta_model(config, cfg: ModelConfig) -> nn.Module:
    """`config`'s model as `cfg` builds it, on the meta device (random init skipped: meta tensors hold nothing)."""
    with torch.device("meta"):
        return auto_class(cfg.task, config).from_config(config, **model_kwargs(config, cfg))


@dataclass
class ResolvedConfig:
    config: Any
    """The transformers config, with the recipe's overrides, task head size and `use_cache=False`."""
    source: str
    """Where it came from, for logs (see `LoadedModel.source`)."""
    weights: Any = None
    """What `from_pretrained` loads (a directory or hub id), or None for random init."""
    hub_kwargs: dict | None = None


def resolve_config(cfg: ModelConfig, *, num_labels: int | None = None, pad_token_id: int | None = None,
                   fallback: Any = None) -> ResolvedConfig:
    """The config `cfg` names (built-in, local directory or config file, hub id), without loading weights.

    `fallback(name)` may return a local config.json path for a hub id before the hub is asked (the
    profiler's shipped configs of popular models).
    """
    from transformers import AutoConfig

    if cfg.task == "sequence_classification":
        num_labels = num_labels or cfg.num_labels
        if num_labels is None:
            raise UserError("`model.task: sequence_classification` needs the number of classes; set `model.num_labels`")
    builtin = find_builtin(cfg.name)
    path = Path(cfg.name).expanduser()
    hub_kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    shipped = fallback(cfg.name) if fallback is not None and builtin is None and not path.exists() else None
    if builtin is not None:
        tree = read_config_file(builtin.config_file)
        tree.pop(META_KEY, None)
        if builtin.pretrained:
            config = _config_from_dict(tree, builtin.name, "its config.json")
            _apply_pretrained_overrides(config, cfg.config_overrides, builtin.name)
            source, weights = f"built-in {builtin.name} (pretrained)", builtin.path
            hub_kwargs = {"local_files_only": True}
        else:
            _check_override_keys(_config_from_dict(tree, builtin.name, "its config"), cfg.config_overrides)
            config = _config_from_dict({**tree, **cfg.config_overrides}, builtin.name, "`model.config_overrides`")
            kind = "built-in" if builtin.path.parent == CONFIGS_DIR else "local config"
            source, weights = f"{kind} {builtin.name} (random init, seed {cfg.seed})", None
    elif shipped is not None:
        tree = read_config_file(shipped)
        tree.pop(META_KEY, None)
        config = _config_from_dict(tree, cfg.name, "its shipped config")
        _apply_pretrained_overrides(config, cfg.config_overrides, cfg.name)
        source, weights = f"{cfg.name} (config shipped with memft)", cfg.name
    else:
        if path.is_dir():
            where, hub_kwargs["local_files_only"] = str(path.resolve()), True
            source = f"local {where}"
        elif looks_like_model_path(cfg.name):
            raise _no_such_path(cfg.name, "model.name")
        else:
            where, source = cfg.name, f"hub {cfg.name}"
        try:
            config = AutoConfig.from_pretrained(where, **hub_kwargs)
        except (OSError, ValueError) as exc:
            if path.is_dir():
                raise UserError(f"could not load a model config from `{where}`: {_first_line(exc)}") from None
            raise _not_found(cfg.name, "model", _first_line(exc)) from None
        _apply_pretrained_overrides(config, cfg.config_overrides, cfg.name)
        weights = where

    if cfg.task == "sequence_classification":
        config.num_labels = num_labels
        if pad_token_id is not None:
            config.pad_token_id = pad_token_id
    if "use_cache" not in cfg.config_overrides:
        # Training never reuses past K/V; a cache would keep every layer's K/V alive for nothing.
        # generate() still caches: it reads `generation_config.use_cache`.
        config.use_cache = False
    return ResolvedConfig(config, source, weights, hub_kwargs)


def model_kwargs(config, cfg: ModelConfig) -> dict[str, Any]:
    """`dtype`, attention and (MoE) experts implementation for building `config` as the recipe asks."""
    dtype = DTYPES[cfg.dtype]
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": cfg.attn_implementation}
    if is_moe(config) and (kernel := experts_kernel(config, dtype)):
        kwargs["experts_implementation"] = kernel
    return kwargs


def build_model(config, cfg: ModelConfig, *, weights: Any = None, hub_kwargs: dict | None = None,
                quantization_config: Any = None, device: torch.device | None = None) -> nn.Module:
    """The model of `config`: pretrained from `weights`, or random init seeded with `cfg.seed`."""
    kwargs = model_kwargs(config, cfg)
    model_class = auto_class(cfg.task, config)
    load_kwargs = dict(kwargs)
    if quantization_config is not None:
        # bitsandbytes quantizes while loading, onto the device named here.
        device = device or torch.device("cpu")
        target = torch.cuda.current_device() if device.type == "cuda" and device.index is None else str(device)
        load_kwargs |= {"quantization_config": quantization_config, "device_map": {"": target}}
    # Random-init built-ins and new classification heads draw from torch's global generator.
    torch.manual_seed(cfg.seed)
    if weights is None:
        # Initialise in float32 whatever the dtype (torch draws different numbers per dtype, so a
        # float64 reference and a float32 run would otherwise start from different weights), then
        # load those weights in the target dtype, or quantized, through the path a checkpoint takes.
        model = model_class.from_config(config, **{**kwargs, "dtype": torch.float32})
        if kwargs["dtype"] != torch.float32 or quantization_config is not None:
            with experts_quantized_on_load(quantization_config):
                model = type(model).from_pretrained(None, config=model.config, state_dict=model.state_dict(),
                                                    **load_kwargs)
        return model
    try:
        # weights_only: a pickled pytorch_model.bin may hold only tensors, never code to run.
        # ignore_mismatched_sizes: report every wrong shape ourselves instead of transformers' traceback.
        with experts_quantized_on_load(quantization_config):
            model, report = model_class.from_pretrained(weights, config=config, output_loading_info=True,
                                                        weights_only=True, ignore_mismatched_sizes=True,
                                                        **load_kwargs, **(hub_kwargs or {}))
    except OSError as exc:
        raise UserError(f"could not load the weights of `{cfg.name}`: {_first_line(exc)}") from None
    except Exception as exc:
        if (reason := _unreadable_weights(weights, exc)) is None:
            raise
        raise UserError(reason) from None
    _check_loading_report(report, weights, new_head=_new_classification_head(cfg.task, config, model))
    return model


# --------------------------------------------------------------------------------------------
# 4-bit fused experts while loading


@contextmanager
def experts_quantized_on_load(quantization_config: Any) -> Iterator[None]:
    """While open, a 4-bit `BitsAndBytesConfig` given to `from_pretrained` also stores each fused experts weight in
    4 bits (`NF4Experts`) as soon as transformers has built it (after fusing per-expert checkpoint keys, cast to the
    load dtype, on the target device), before the next one is read: at most one experts weight exists in full
    precision at a time, instead of all of them until `quantize_experts` runs after loading.

    transformers 5.24 takes no quantizer instance: `from_pretrained` builds one from the config's quant method, so
    memft's subclass stands in for bitsandbytes' 4-bit one (`AUTO_QUANTIZER_MAPPING`) for the call only. The model
    keeps a plain `BitsAndBytesConfig`; without one (or for 8 bits) nothing changes.
    """
    if quantization_config is None or not getattr(quantization_config, "load_in_4bit", False):
        yield
        return
    from transformers.quantizers import auto

    key = "bitsandbytes_4bit"
    previous = auto.AUTO_QUANTIZER_MAPPING[key]
    auto.AUTO_QUANTIZER_MAPPING[key] = _experts_quantizer()
    try:
        yield
    finally:
        auto.AUTO_QUANTIZER_MAPPING[key] = previous


@functools.cache
def _experts_quantizer() -> type:
    """transformers' 4-bit bitsandbytes quantizer, extended to the fused experts weights bitsandbytes cannot see."""
    from transformers.core_model_loading import ConversionOps
    from transformers.integrations.bitsandbytes import Bnb4bitQuantize
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer

    class ExpertsQuantize(ConversionOps):
        """transformers' quantize op for one loaded weight: fused experts become `NF4Experts`, linears `Params4bit`."""

        def __init__(self, hf_quantizer):
            self.hf_quantizer = hf_quantizer
            self.linear = Bnb4bitQuantize(hf_quantizer)

        def convert(self, input_dict: dict, model=None, missing_keys=None, **kwargs) -> dict:
            q = self.hf_quantizer
            rest = {k: v for k, v in input_dict.items() if k not in q.expert_weights}
            result = self.linear.convert(rest, model=model, missing_keys=missing_keys, **kwargs) if rest else {}
            config = q.quantization_config
            for key in input_dict.keys() - rest.keys():
                value = input_dict[key]
                value = value[0] if isinstance(value, list) else value
                module_name, _, weight_name = key.rpartition(".")
                module = model.get_submodule(module_name)
                if value.shape != getattr(module, weight_name).shape:
                    # left in full precision for transformers to report as mismatched (memft's report raises)
                    q.expert_weights.discard(key)
                    result[key] = value
                    continue
                holder = store_experts_weight(module, weight_name, value, config.bnb_4bit_quant_type,
                                              config.bnb_4bit_use_double_quant, config.bnb_4bit_compute_dtype)
                # the holder is the loaded weight: transformers must neither initialise nor report it as missing
                holder._is_hf_initialized = True
                if missing_keys is not None:
                    missing_keys.discard(key)
            return result

    class NF4ExpertsQuantizer(Bnb4BitHfQuantizer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.expert_weights: set[str] = set()
            """The fused experts weights quantized while loading, e.g. `model.layers.0.mlp.experts.gate_up_proj`."""

        def _process_model_before_weight_loading(self, model, device_map, **kwargs):
            super()._process_model_before_weight_loading(model, device_map, **kwargs)
            # decided on the empty model, before any weight is replaced (a layout memft cannot store raises here);
            # a checkpoint saved 4-bit holds its experts in full precision: they load so, `quantize_experts` follows
            self.expert_weights = set() if self.pre_quantized else {
                f"{name}.{w}" for name, _ in fused_experts(model) for w in EXPERT_WEIGHTS}

        def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
            return param_name in self.expert_weights or super().param_needs_quantization(model, param_name, **kwargs)

        def get_quantize_ops(self):
            return ExpertsQuantize(self)

    return NF4ExpertsQuantizer


# --------------------------------------------------------------------------------------------
# checking the weights a checkpoint holds

RESAVE_HINT = "re-save it with `model.save_pretrained(dir, safe_serialization=True)`"
SHOWN_KEYS = 3
"""Keys named in a missing / unexpected / mismatched weights message (then the count of the rest)."""


def _unreadable_weights(weights: Any, exc: Exception) -> str | None:
    """The sentence for a weights file `from_pretrained` could not read, or None when `exc` is something else.

    In a local directory every weight file transformers would read is checked, to name the bad one."""
    where = Path(str(weights))
    if where.is_dir():
        for file in _weight_files(where):
            if (reason := _weight_file_problem(file)) is not None:
                return f"{reason}: download the model again, or {RESAVE_HINT}"
        return None
    if isinstance(exc, (SafetensorError, UnpicklingError, EOFError)):
        return (f"the downloaded weights of `{weights}` are unreadable ({_first_line(exc)}): download them again "
                f"(`hf download {weights} --force-download`), or {RESAVE_HINT}")
    return None


def _weight_files(model_dir: Path) -> list[Path]:
    """The files `from_pretrained` reads weights from: the safetensors ones when there are any."""
    safetensors = sorted(model_dir.glob("*.safetensors"))
    return safetensors or sorted(model_dir.glob("pytorch_model*.bin"))


def _weight_file_problem(file: Path) -> str | None:
    """Why `file` cannot be read as weights (a sentence naming it), or None when it reads."""
    if file.suffix == ".safetensors":
        try:
            with safe_open(str(file), framework="pt"):  # reads and checks the header against the file's size
                return None
        except (SafetensorError, OSError) as exc:
            return f"`{file}` is not a readable safetensors file ({_safetensors_reason(exc)})"
    try:
        tensors = torch.load(file, map_location="meta", weights_only=True, mmap=True)
    except UnpicklingError as exc:
        return (f"`{file}` is not a plain state dict of tensors (PyTorch's safe loader, `weights_only=True`, "
                f"refuses {_unsafe_global(exc)} in it)")
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        reason = _first_line(exc).split(". ")[0] if str(exc).strip() else "it is empty"
        return f"`{file}` is not a readable PyTorch weights file ({reason})"
    if not isinstance(tensors, dict) or not all(torch.is_tensor(t) for t in tensors.values()):
        return f"`{file}` is not a plain state dict of tensors (it holds a {type(tensors).__name__})"
    return None


def _safetensors_reason(exc: Exception) -> str:
    text = _first_line(exc).removeprefix("Error while deserializing header: ")
    return f"{text}; the file is damaged or cut short"


def _unsafe_global(exc: Exception) -> str:
    """What torch's long weights-only message says it refused: "the object `pkg.Class`" when it names one."""
    found = re.search(r"GLOBAL (\S+) was not an allowed global", str(exc))
    return f"the object `{found.group(1)}`" if found else "what it holds"


def _new_classification_head(task: str, config, model: nn.Module) -> Any:
    """For a classifier built on a checkpoint without one (a causal LM, a base encoder): whether a key
    belongs to the new head (missing: random init is expected) or the checkpoint's old head (unexpected:
    dropped). None when the checkpoint must hold every weight (a causal LM, an exported classifier)."""
    if task != "sequence_classification":
        return None
    if any("ForSequenceClassification" in a for a in getattr(config, "architectures", None) or []):
        return None
    body = f"{model.base_model_prefix}."
    # BERT's pooler feeds only the classifier; an encoder saved without it gets a new one too.
    return lambda key: not key.startswith(body) or key.startswith(f"{body}pooler.")


def _check_loading_report(report: dict, weights: Any, new_head: Any = None) -> None:
    """Missing, unexpected or wrongly shaped weights are a UserError (a model silently trained from
    partly random weights is the worst outcome). `new_head(key)`: keys a new classification head may
    leave missing (or its checkpoint's old head unexpected). Tied weights are not reported missing."""
    allowed = new_head or (lambda key: False)
    mismatched = sorted(report.get("mismatched_keys") or [])
    missing = sorted(k for k in report.get("missing_keys") or [] if not allowed(k))
    unexpected = sorted(k for k in report.get("unexpected_keys") or [] if not allowed(k))
    if mismatched:
        key, found, wanted = mismatched[0]
        raise UserError(
            f"`{weights}`: `{key}` has shape {tuple(found)} in the weights but the model its config describes "
            f"needs {tuple(wanted)}{_more(len(mismatched))}; the weights and config.json do not belong together: "
            f"download the model again, or {RESAVE_HINT}"
        )
    if missing:
        raise UserError(
            f"`{weights}` lacks {_count(missing)} the model needs ({_keys(missing)}), which would be trained from "
            f"random values: the checkpoint is incomplete; download the model again, or {RESAVE_HINT}"
        )
    if unexpected:
        raise UserError(
            f"`{weights}` holds {_count(unexpected)} the model does not use ({_keys(unexpected)}): they were saved "
            f"from another architecture than config.json names; download the model again, or {RESAVE_HINT}"
        )


def _count(keys: list[str]) -> str:
    return f"{len(keys)} weight{'s' if len(keys) != 1 else ''}"


def _keys(keys: list[str]) -> str:
    shown = ", ".join(f"`{k}`" for k in keys[:SHOWN_KEYS])
    return shown + (f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else "")


def _more(n: int) -> str:
    return f" (and {n - 1} more wrongly shaped weight{'s' if n > 2 else ''})" if n > 1 else ""


def auto_class(task: str, config):
    """The transformers auto class for `task`, or a UserError when the architecture lacks it."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if task == "sequence_classification" else AutoModelForCausalLM
    if type(config) not in auto._model_mapping and not getattr(config, "auto_map", None):
        raise UserError(f"`model.task: {task}` is not available for `{config.model_type}` models in transformers")
    return auto


def _config_from_dict(tree: dict, name: str, blame: str):
    """An HF config object from a config.json dict (needs `model_type`); `blame` names what made it invalid."""
    from transformers import AutoConfig

    tree = dict(tree)
    model_type = tree.pop("model_type", None)
    if model_type is None:
        raise UserError(f"built-in `{name}`: its config has no `model_type`")
    try:
        return AutoConfig.for_model(model_type, **tree)
    except (ValueError, TypeError, StrictDataclassError) as exc:
        # transformers 5 configs validate themselves; the readable reason is the cause's message.
        reason = exc.__cause__ if isinstance(exc, StrictDataclassError) and exc.__cause__ else exc
        raise UserError(f"`{name}`: {blame} gives an invalid `{model_type}` config: {_first_line(reason)}") from None


def _known_keys(config) -> list[str]:
    return sorted(set(config.to_dict()) | set(getattr(config, "attribute_map", {})))


def _check_override_keys(config, overrides: dict) -> None:
    """Unknown keys (transformers would silently keep them) and wrong value types are UserErrors."""
    known = _known_keys(config)
    for key, value in overrides.items():
        if key not in known:
            guess = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean `{guess[0]}`?" if guess else ""
            raise UserError(f"`model.config_overrides.{key}`: `{config.model_type}` configs have no such key{hint}")
        current = getattr(config, key, None)
        if current is not None and value is not None and not _same_kind(current, value):
            kind = _KIND_NAMES.get(type(current), type(current).__name__)
            raise UserError(f"`model.config_overrides.{key}` must be {kind} (got {value!r})")


def _same_kind(current: Any, value: Any) -> bool:
    if isinstance(current, bool) or isinstance(value, bool):
        return isinstance(current, bool) and isinstance(value, bool)
    if isinstance(current, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(current))


def _apply_pretrained_overrides(config, overrides: dict, name: str) -> None:
    """Only shape-preserving keys may change on pretrained weights; set them on `config`."""
    _check_override_keys(config, overrides)
    refused = sorted(k for k in overrides if k not in PRETRAINED_SAFE_OVERRIDES)
    if refused:
        raise UserError(
            f"`model.config_overrides` cannot change `{refused[0]}` of pretrained `{name}`: its weights fix the "
            f"architecture (allowed here: {', '.join(sorted(PRETRAINED_SAFE_OVERRIDES))}); to change the "
            "architecture use a random-init built-in such as `tiny-llama`"
        )
    for key, value in overrides.items():
        setattr(config, key, value)


# --------------------------------------------------------------------------------------------
# inspection


def experts_kernel(config, dtype: torch.dtype) -> str | None:
    """`eager` where transformers 5's default fused-expert kernel (`grouped_mm`) cannot run: it takes only
    fp32/bf16/fp16, with rows a multiple of 16 bytes (stories260K upcycled has 172 bf16 = 344 bytes). None: default."""
    if dtype == torch.float64:
        return "eager"
    size = torch.tensor([], dtype=dtype).element_size()
    widths = [getattr(config, k, None) for k in ("hidden_size", "intermediate_size", "moe_intermediate_size")]
    return "eager" if any(w and (w * size) % 16 for w in widths) else None


def is_moe(model_or_config) -> bool:
    """True when a model (or its config) routes tokens to more than one expert."""
    config = getattr(model_or_config, "config", model_or_config)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for key in EXPERT_COUNT_KEYS:
        n = getattr(config, key, None)
        if isinstance(n, int) and n > 1:
            return True
    if isinstance(model_or_config, nn.Module):
        return any(name.rsplit(".", 1)[-1] == "experts" for name, _ in model_or_config.named_modules())
    return False


def count_params(model: nn.Module) -> dict[str, int]:
    """Parameter counts: {"total_params", "trainable_params", "expert_params"}.

    Shared (tied) parameters count once. A bitsandbytes 4-bit weight is stored packed (two values
    per uint8, shape `(n/2, 1)`); it counts as the `quant_state.shape` it stands for. `expert_params`
    are the routed experts' weights (a `.experts.` module in the name; Qwen2-MoE's always-on
    `shared_expert` is not one of them); 4-bit fused experts (`NF4Experts`, buffers) count as the weights
    they stand for.
    """
    total = trainable = experts = 0
    for name, p in model.named_parameters():
        quant_state = getattr(p, "quant_state", None)
        n = quant_state.shape.numel() if quant_state is not None else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
        # adapter weights hung on an expert module (peft's lora_A/lora_B) are not expert weights
        experts += n if "experts" in name.split(".") and "lora_" not in name else 0
    for holder in (m for m in model.modules() if isinstance(m, NF4Experts)):  # 4-bit fused experts are buffers
        n = holder.num_experts * holder.out_features * holder.in_features
        total, experts = total + n, experts + n
    return {"total_params": total, "trainable_params": trainable, "expert_params": experts}
