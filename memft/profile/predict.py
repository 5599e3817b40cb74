"""The memory a recipe needs, predicted from its model's config: no weights, no GPU.

* Weights, gradients and optimizer state are **exact**: the model is built on PyTorch's `meta` device
  (shapes and dtypes, no storage) with the recipe's strategies applied, and every parameter is
  counted as the real run stores it (bitsandbytes' NF4 packing and quantization constants for QLoRA,
  AdamW's two moments in the parameter's dtype, 8-bit AdamW's blockwise state).
* Activations are **fitted from real steps of small twins** of the model (`activations.py`).
* Strategies add what lives outside the model (MEFT's host-memory adapter) through `Strategy.estimate()`.
* Several GPUs (`gpus`, `memft train --nproc N`): each rank's FSDP2 shards of the same skeleton, exact too, plus
  what FSDP gathers at a time (`shard_states`).
"""

from __future__ import annotations

import copy
import json
import math
import random
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from memft import registry
from memft.errors import UserError
from memft.models.blocks import layer_stack
from memft.models.load import build_model, is_moe, meta_model, resolve_config, resolve_device
from memft.models.nf4_experts import NF4Experts, nf4_expert_bytes
from memft.outputs import check_writable_file, write_text
from memft.paths import CONFIGS_DIR
from memft.profile import activations
from memft.recipe import Recipe
from memft.registry import BuildContext, MemoryEstimate
from memft.strategies.lora import HEADS
from memft.train.chunked_loss import distill_transient_bytes, linear_head
from memft.train.chunked_loss import transient_bytes as chunked_transient
from memft.train.distributed import check as check_world
from memft.train.loop import Trainer, apply_strategies, autocast_context, step_loss
from memft.train.meters import SavedTensorMeter

SHIPPED = CONFIGS_DIR / "hub"
"""Public config.json files of popular models, by hub id (`configs/hub/<org>/<name>.json`)."""

RELIABLE_FIT = 0.05
"""A fit whose error on its own twins is above this does not explain every saved tensor."""
ADAM8_MIN_SIZE, ADAM8_BLOCK = 4096, 256
"""bitsandbytes' 8-bit AdamW keeps fp32 state below 4,096 elements, else uint8 state with an fp32 absmax per 256."""


def shipped_config(name: str) -> Path | None:
    path = SHIPPED / f"{name}.json"
    return path if "/" in name and path.is_file() else None


def list_shipped() -> list[str]:
    return sorted(str(p.relative_to(SHIPPED).with_suffix("")) for p in SHIPPED.glob("*/*.json"))


@dataclass
class Profile:
    model: str
    source: str
    device: str
    dtype: str
    batch_size: int
    seq_len: int
    grad_accum: int
    strategies: list[str]
    gradient_checkpointing: bool
    optimizer: str
    moe: bool
    optimizer_in_backward: bool
    params: int
    trainable_params: int
    weights: dict[str, int]
    """Bytes of the weights (and buffers) by storage kind: `float32`, `bfloat16`, `nf4` (packed + constants)."""
    gradients: int
    optimizer_state: int
    activations: int
    """Bytes autograd saves for backward in one micro-batch (what `activation_bytes` in summary.json measures)."""
    logits: int
    """The part of `activations` that belongs to the logits and the loss."""
    layers: int
    backward_transient: int
    """What the loss's backward allocates on top (`loss_transient`): one chunk's logits and the hidden states' gradient
    under the chunked loss, else two float32 logit-sized gradients (log-softmax's and its input's)."""
    head_gradient: int
    """The output head's weight gradient, the first one backward creates (0 when the head is frozen)."""
    strategy_device: dict[str, int] = field(default_factory=dict)
    """Device bytes strategies add outside the model (MEFT's shipped rows)."""
    host: dict[str, int] = field(default_factory=dict)
    """Host-memory bytes strategies keep (MEFT's adapter and its AdamW state)."""
    fit_residual: float = 0.0
    twins: int = 0
    notes: list[str] = field(default_factory=list)
    gpus: int = 1
    """Processes (one per GPU) the recipe trains in. Above 1, `weights`, `gradients`, `optimizer_state` and `peak`
    are one GPU's: rank 0's, which holds the largest shards (`shard_states`)."""
    distributed: str | None = None
    """`distributed.mode` (`fsdp` or `ddp`) when `gpus` > 1."""
    cpu_offload: bool = False
    reshard_after_forward: bool = True
    gathered_root: int = 0
    """The root unit's parameters gathered whole (embeddings, final norm, head): through forward and through backward."""
    gathered_at_loss: int = 0
    """Decoder layers' parameters gathered during the loss's backward: the last layer's all-gather output, prefetched
    (none in `ddp` mode, which copies a layer when it starts; every layer when `reshard_after_forward` is false)."""
    gathered_layers: int = 0
    """Decoder layers' parameters gathered during a layer's backward: that layer's and the next one's, prefetched (one
    in `ddp` mode; every layer when `reshard_after_forward` is false, the last layer's backward being the fullest)."""
    layer_gradients: int = 0
    """One layer's unsharded gradients, made beside its gathered weights, then copied into the padded reduce-scatter
    input once those are freed (what the second adds beyond the freed weights); the largest layer's."""
    root_gradients: int = 0
    """The root unit's unsharded gradients (the head's among them), reduced last: at the end of backward beside every
    other gradient shard, then copied into the reduce-scatter input once the root's weights are freed."""
    model_weight_bytes: int = 0
    """The whole model's weight bytes (what one process holds), beside this GPU's."""
    ranks: list[dict] = field(default_factory=list)
    """Each rank's `params`, `gradients` and `optimizer_state` bytes (device or host, see `cpu_offload`)."""

    @property
    def weight_bytes(self) -> int:
        return sum(self.weights.values())

    @property
    def per_layer(self) -> int:
        return (self.activations - self.logits) // max(self.layers, 1)

    @property
    def peak(self) -> int:
        """Weights, optimizer state and strategies' device bytes, plus the fullest moment of backward, plus one
        layer's working memory (the gradients of its activations; a recomputed layer's activations).

        Backward starts with every activation saved, the loss's gradient buffers and the head's gradient;
        it frees each layer's activations as it creates that layer's weight gradients, so it ends with all
        gradients. With one micro-batch per step the gradients of the last step are gone before forward
        (`zero_grad(set_to_none=True)`), so the fullest moment is the larger of the two ends; with gradient
        accumulation the gradients stay beside every later micro-batch's activations.

        On several GPUs (`gpus` > 1), one GPU's: see `_sharded_peak`."""
        if self.gpus > 1:
            return self._sharded_peak()
        start = self.activations + self.backward_transient + self.head_gradient
        # with the optimizer step in backward, `gradients` is one layer's, alive beside what backward has not freed
        alongside = self.grad_accum > 1 or self.optimizer_in_backward
        backward = start + self.gradients if alongside else max(start, self.gradients)
        return (self.weight_bytes + self.optimizer_state + sum(self.strategy_device.values()) + backward
                + self.per_layer)

    def _sharded_peak(self) -> int:
        """One GPU's fullest moment of the three in backward: the loss's (every activation, the loss's buffers, the
        head's gradient, the root and the prefetched last layer gathered), a layer's (the activations but the
        logits', its working memory, the gathered layers and its unsharded gradients) and the end's (every gradient
        shard and the root's unsharded gradients). Gradient shards of the last step are gone before forward; with
        accumulation the earlier micro-batches' shards are there in all three."""
        resident = self.weight_bytes + self.optimizer_state + sum(self.strategy_device.values()) + self.gathered_root
        loss = self.activations + self.backward_transient + self.head_gradient + self.gathered_at_loss
        layer = (self.activations - self.logits + self.per_layer + self.head_gradient + self.gathered_layers
                 + self.layer_gradients)
        if self.grad_accum > 1:
            return resident + max(loss, layer, self.root_gradients) + self.gradients
        return resident + max(loss, layer, self.root_gradients + self.gradients)

    def to_json(self) -> dict:
        return {**asdict(self), "weight_bytes": self.weight_bytes, "activations_per_layer": self.per_layer,
                "peak": self.peak}


def skeleton(recipe: Recipe, config) -> tuple[nn.Module, list, set[int]]:
    """The model on the meta device with the recipe's strategies applied, and the ids of the weights a
    4-bit load would quantize (every `nn.Linear` of the base model but the heads)."""
    strategies = registry.compose(recipe)
    model = meta_model(config, recipe.model)
    quantized = set()
    if registry.load_kwargs(strategies, recipe).get("quantization_config") is not None:
        quantized = {id(m.weight) for name, m in model.named_modules()
                     if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] not in HEADS}
    ctx = BuildContext(recipe=recipe, device=torch.device("meta"), is_moe=is_moe(config),
                       total_steps=recipe.train.max_steps)
    return apply_strategies(model, strategies, ctx), strategies, quantized


_SKELETONS: dict[str, tuple] = {}
"""Skeletons already built in this process, with the config they were built from (building one changes it)."""
SHAPE_ONLY = {"train": ("batch_size", "grad_accum", "optimizer", "optimizer_state", "optimizer_in_backward",
                        "max_grad_norm", "precision"), "data": ("max_length",)}
"""Recipe fields neither loading nor any strategy's `apply` reads (the shapes and the optimizer): variants that
change only these share a skeleton."""


def cached_skeleton(recipe: Recipe, config) -> tuple:
    """(config, `skeleton`), built once per model and strategies: `--gpu-memory` profiles many variants, and wrapping
    a 30B model with adapters on the meta device takes half a second each time."""
    dump = recipe.model_dump(mode="json")
    for section, names in SHAPE_ONLY.items():
        for name in names:
            dump[section].pop(name)
    key = json.dumps([config.to_dict(), dump], sort_keys=True, default=str)
    if key not in _SKELETONS:
        _SKELETONS[key] = (config, *skeleton(recipe, config))
        if len(_SKELETONS) > 16:  # meta models hold no storage, but their modules add up
            _SKELETONS.pop(next(iter(_SKELETONS)))
    config, model, strategies, quantized = _SKELETONS[key]
    # shallow copies: `on_step_start` counts micro-batches on the strategy (TokenTune), each profile starts afresh
    return config, model, [copy.copy(s) for s in strategies], quantized


def nf4_bytes(numel: int, double_quant: bool) -> int:
    """Storage of one 4-bit weight (a bitsandbytes `Linear4bit`): packed nibbles plus its quantization constants,
    the same accounting as one expert of an `NF4Experts` holder with its own code tables."""
    return nf4_expert_bytes(1, numel, 1, double_quant)


def double_quantized(strategies: list, recipe: Recipe) -> bool:
    """Whether the 4-bit load the strategies ask for quantizes the quantization constants too."""
    config = registry.load_kwargs(strategies, recipe).get("quantization_config")
    return bool(config is not None and config.bnb_4bit_use_double_quant)


def state_bytes(model: nn.Module, quantized: set[int], recipe: Recipe, double_quant: bool) -> dict:
    """Weights by kind (`quantized`: ids of the 4-bit ones), gradients and optimizer state, as the run stores them."""
    weights: dict[str, int] = {}
    # 4-bit fused experts are buffers of NF4Experts holders: counted once as `nf4`, not as their uint8/float32 parts
    holders = [m for m in model.modules() if isinstance(m, NF4Experts)]
    if holders:
        weights["nf4"] = sum(nf4_expert_bytes(h.num_experts, h.out_features, h.in_features, h.double_quant)
                             for h in holders)
    held = {id(b) for h in holders for b in h.buffers()}
    for t in [*model.parameters(), *model.buffers()]:  # each tensor once, shared ones included
        if id(t) in held:
            continue
        if id(t) in quantized:
            weights["nf4"] = weights.get("nf4", 0) + nf4_bytes(t.numel(), double_quant)
        else:
            kind = str(t.dtype).removeprefix("torch.")
            weights[kind] = weights.get(kind, 0) + t.numel() * t.element_size()
    trainable = [p for p in model.parameters() if p.requires_grad]
    in_backward = recipe.train.optimizer_in_backward
    gradients = gradients_in_backward(model, trainable) if in_backward else sum(grad_bytes(p) for p in trainable)
    if recipe.train.optimizer == "adamw_8bit":
        big = [p for p in trainable if p.numel() >= ADAM8_MIN_SIZE]
        maps = 2 * 4 * 256 * (len(big) if in_backward else min(len(big), 1))  # two quantization maps per optimizer
        optimizer = (sum(2 * p.numel() + 2 * 4 * math.ceil(p.numel() / ADAM8_BLOCK) for p in big)
                     + sum(2 * 4 * p.numel() for p in trainable if p.numel() < ADAM8_MIN_SIZE) + maps)
    else:
        optimizer = sum(2 * p.numel() * p.element_size() + 4 for p in trainable)  # exp_avg, exp_avg_sq, step
    host = {}
    if recipe.train.optimizer_state == "host":  # float32 (float64) masters and moments, on the host instead
        host = {"optimizer state (host)": sum(3 * p.numel() * max(p.element_size(), 4) + 4 for p in trainable)}
        optimizer = 0
    return {"weights": weights, "gradients": gradients, "optimizer_state": optimizer, "host": host,
            "params": sum(t.numel() for t in model.parameters()) + sum(h.num_experts * h.out_features * h.in_features
                                                                       for h in holders),
            "trainable_params": sum(p.numel() for p in trainable)}


def shard_states(model: nn.Module, quantized: set[int], recipe: Recipe, double_quant: bool, gpus: int) -> dict:
    """What each of `gpus` ranks holds when `memft.train.distributed.World.shard` has run FSDP2's `fully_shard` on
    each decoder layer and then on the model (torch 2.13, torch/distributed/fsdp/_fully_shard), exactly:

    - a parameter is split on dim 0 into chunks of ceil(rows / S) rows (`S`: the ranks in `fsdp` mode; 1 in `ddp`
      mode, whose mesh shards over one rank); every rank stores a chunk padded to that size, the last ones padding
      only (a 4-bit weight: its packed bytes, `(numel/2, 1)`; its quantization constants stay whole);
    - a unit's gradient shards are views of one reduce-scatter output of its padded chunks (with CPU offload each is
      copied to the host at its own, unpadded size);
    - AdamW's moments are `zeros_like` of the unpadded local shard (rank r's rows only), the step a float32 scalar;
    - buffers (rotary tables, the 4-bit experts of `NF4Experts`) are not sharded: whole on every rank;
    - a unit's parameters are gathered at their padded size (chunk x S rows); a layer's gradients exist unsharded
      (their own size) beside the padded reduce-scatter input they are copied into; with `param_dtype: bfloat16`
      both the gathered weights and the unsharded gradients are bfloat16, the reduce-scatter input the shard's dtype
      (predicted from FSDP2's code, not measured on a GPU).

    Returns `ranks` (each rank's `params`, `gradients`, `optimizer_state` bytes), this GPU's `weights` by kind
    (rank 0's, the fullest), the gathered sizes `root` and `layers` (every decoder layer's, in order), and the most
    bytes of unsharded gradients at once beyond the gathered weights they outlive: `layer_grads` (the largest
    layer's) and `root_grads`."""
    cfg = recipe.distributed
    shards = gpus if cfg.mode == "fsdp" else 1
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    layers = list(layer_stack(model))
    unit_of: dict[int, int] = {}
    for i, layer in enumerate(layers):
        for p in layer.parameters():
            unit_of.setdefault(id(p), i)
    root = len(layers)
    gathered = [0] * (root + 1)
    grads_full, grads_padded = [0] * (root + 1), [0] * (root + 1)
    ranks = [{"params": 0, "gradients": 0, "optimizer_state": 0} for _ in range(gpus)]
    weights: dict[str, int] = {}

    def add(kind: str, n: int) -> None:
        weights[kind] = weights.get(kind, 0) + n

    for p in model.parameters():
        if id(p) in quantized:  # bitsandbytes' Params4bit: (ceil(numel/2), 1) uint8, sharded; constants whole
            rows, row_bytes, kind = math.ceil(p.numel() / 2), 1, "nf4"
            add(kind, nf4_bytes(p.numel(), double_quant) - rows)
        else:
            rows = p.shape[0] if p.dim() else 1
            row_bytes = p.numel() // max(rows, 1) * p.element_size()
            kind = str(p.dtype).removeprefix("torch.")
        chunk = math.ceil(rows / shards)
        unit = unit_of.get(id(p), root)
        # `param_dtype: bfloat16`: gathered, and its gradient computed, as bfloat16; reduced in the shard's dtype
        cast = 2 / p.element_size() if cfg.param_dtype == "bfloat16" and id(p) not in quantized else 1
        gathered[unit] += int(chunk * shards * row_bytes * cast)
        add(kind, 0 if cfg.cpu_offload else chunk * row_bytes)
        if id(p) in trainable:
            grads_full[unit] += int(p.numel() * p.element_size() * cast)
            grads_padded[unit] += chunk * shards * row_bytes
        for r, held in enumerate(ranks):
            padded = chunk * row_bytes
            own = max(0, min(chunk, rows - (r * chunk if shards > 1 else 0))) * row_bytes  # rank r's rows
            held["params"] += padded
            if id(p) in trainable:
                held["gradients"] += own if cfg.cpu_offload else padded
                held["optimizer_state"] += 2 * own + 4  # exp_avg, exp_avg_sq, step
    holders = [m for m in model.modules() if isinstance(m, NF4Experts)]
    for h in holders:
        add("nf4", nf4_expert_bytes(h.num_experts, h.out_features, h.in_features, h.double_quant))
    held = {id(b) for h in holders for b in h.buffers()}
    for b in model.buffers():
        if id(b) not in held:
            add(str(b.dtype).removeprefix("torch."), b.numel() * b.element_size())
    layer_grads = max((full + max(0, padded - whole) for full, padded, whole
                       in zip(grads_full[:root], grads_padded[:root], gathered[:root])), default=0)
    return {"ranks": ranks, "weights": {k: n for k, n in weights.items() if n}, "root": gathered[root],
            "layers": gathered[:root], "layer_grads": layer_grads,
            "root_grads": grads_full[root] + max(0, grads_padded[root] - gathered[root]), "shards": shards}


def grad_bytes(p: torch.Tensor) -> int:
    return p.numel() * p.element_size()


def gradients_in_backward(model: nn.Module, trainable: list) -> int:
    """The most gradient bytes alive at once when each parameter is stepped and its gradient freed as soon as backward
    completes it (`train.optimizer_in_backward`): one decoder layer's (a layer's backward may hand over all its weight
    gradients together, as memft's expert LoRA does), or the largest parameter outside the layers."""
    ids = {id(p) for p in trainable}
    inside, layers = set(), []
    for layer in layer_stack(model):
        mine = [p for p in layer.parameters() if id(p) in ids]
        inside |= {id(p) for p in mine}
        layers.append(sum(grad_bytes(p) for p in mine))
    outside = [grad_bytes(p) for p in trainable if id(p) not in inside]
    return max([*layers, *outside, 0])


def twin_measure(recipe: Recipe, autocast, seed: int = 0, vary: bool = True):
    """`measure(config, shapes, twin) -> [(bytes, grad tokens)]`: saved-tensor bytes of real training forwards
    of `config` with the recipe's strategies at each (batch, seq), on the CPU (`vary`: let strategies adjust
    their params for twin number `twin`, `Strategy.vary_for_profile`; the same twin at another depth gets the
    same params, so the difference of two depths is one layer's cost)."""

    def measure(config, shapes: list[tuple[int, int]], twin: int = 0) -> list[tuple[int, int | None]]:
        strategies = registry.compose(recipe)
        rng = random.Random(seed * 1_000_003 + twin)
        for s in strategies if vary else ():
            s.vary_for_profile(rng)
        quantization = registry.load_kwargs(strategies, recipe).get("quantization_config")
        model = build_model(config, recipe.model, quantization_config=quantization, device=torch.device("cpu"))
        ctx = BuildContext(recipe=recipe, device=torch.device("cpu"), is_moe=is_moe(config),
                           total_steps=recipe.train.max_steps)
        model = apply_strategies(model, strategies, ctx)
        model.train()
        out = []
        for batch, seq in shapes:
            inputs = synthetic_batch(recipe, config.vocab_size, batch, seq,
                                     torch.Generator().manual_seed(seed + batch * 1000 + seq))
            for s in strategies:
                inputs = s.on_step_start(0, inputs)
            with SavedTensorMeter(model) as meter, autocast:
                step_loss(strategies, model, inputs, recipe.model.task)
            out.append((meter.bytes, grad_tokens(strategies, inputs)))
        return out

    return measure


_FITS: dict[str, activations.Fit] = {}
"""Fits already made in this process: `--gpu-memory` profiles many variants, and a variant that changes only
the batch, the sequence length or the optimizer saves the same tensors per feature (its fit is reused)."""


def fit_activations(recipe: Recipe, config, strategies: list, autocast, partial_gradients: bool) -> activations.Fit:
    """Fit `recipe`'s activation bytes on twins (by depth when the layers and every strategy allow it)."""
    key = json.dumps([config.to_dict(), [s.model_dump(mode="json") for s in recipe.strategies],
                      recipe.model.model_dump(mode="json", include={"dtype", "attn_implementation", "task", "seed"}),
                      recipe.train.gradient_checkpointing, str(getattr(autocast, "fast_dtype", None)),
                      min(recipe.data.max_length, activations.MAX_TWIN_SEQ), partial_gradients],
                     sort_keys=True, default=str)
    if key not in _FITS:
        with one_thread():
            _FITS[key] = _fit_activations(recipe, config, strategies, autocast, partial_gradients)
    return _FITS[key]


@contextmanager
def one_thread():
    """Twins are a few dozen wide, so a second intra-op thread buys nothing; on a loaded machine its spin-waits
    made each tiny matmul tens of times slower (an advice table took minutes, not seconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fit_activations(recipe: Recipe, config, strategies: list, autocast, partial_gradients: bool) -> activations.Fit:
    leading = activations.leading_layers(config)
    blocks = {s.depth_block(config.num_hidden_layers) for s in strategies}
    block = max(blocks - {None}, default=1)
    # by depth: layers alike past the leading ones, and every strategy's costs repeat in blocks of one size
    by_depth = leading is not None and None not in blocks and blocks <= {1, block} and (block == 1 or leading == 0)
    return activations.fit(twin_measure(recipe, autocast), config, max_seq=recipe.data.max_length,
                           partial_gradients=partial_gradients, weight_casts=isinstance(autocast, torch.autocast),
                           by_depth=by_depth, leading=leading or 0, block=block if by_depth else 1)


def grad_tokens(strategies: list, batch: dict) -> int | None:
    """Tokens of `batch` that carry gradients, when a strategy chooses them (TokenTune); None: all."""
    return next((n for s in strategies if (n := s.grad_tokens(batch)) is not None), None)


def synthetic_batch(recipe: Recipe, vocab: int, batch: int, seq: int, generator: torch.Generator) -> dict:
    """Full-length random sequences (the worst case a batch of `data.max_length` can be)."""
    ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    labels = (torch.randint(0, recipe.model.num_labels or 2, (batch,), generator=generator)
              if recipe.model.task == "sequence_classification" else ids.clone())
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


PROFILE_DEVICES = ("cuda", "cpu")
"""What `profile` predicts for: the devices memft trains on."""
MAX_PROFILE_TOKENS = 2**26
"""Tokens per micro-batch `profile` models (64 x 1M); beyond, its synthetic batch alone would not fit in memory."""


def profile(recipe: Recipe, device: str | None = None, gpus: int = 1) -> Profile:
    """Predict `recipe`'s memory on `device`, `cuda` or `cpu` (default: what `model.device` resolves to here); with
    `gpus` > 1, one GPU's of a job training it in that many processes (`memft train --nproc`, FSDP2)."""
    if device is not None and device not in PROFILE_DEVICES:
        raise UserError(f"cannot profile for device `{device}`: memft trains on `cuda` or `cpu`; pass one of them")
    if gpus < 1:
        raise UserError(f"`--gpus {gpus}`: give the number of GPUs (processes) the recipe trains in, 1 or more")
    if gpus > 1:  # what `memft train --nproc N` would refuse, refused here in its words (one GPU: one process)
        check_world(recipe, gpus)
    target = torch.device(device) if device else resolve_device(recipe.model.device)
    kernel_note = []
    if recipe.model.attn_implementation in ("flash_attention_2", "flex_attention"):  # CUDA-only kernels
        kernel_note = [f"activations fitted with `sdpa` on the CPU twins (`{recipe.model.attn_implementation}` runs "
                       "on CUDA only; on CUDA, sdpa's fused kernels save as little as flash attention)"]
        recipe = recipe.model_copy(deep=True)
        recipe.model.attn_implementation = "sdpa"
    num_labels = recipe.model.num_labels or (2 if recipe.model.task == "sequence_classification" else None)
    resolved = resolve_config(recipe.model, num_labels=num_labels, fallback=shipped_config)
    config, model, strategies, quantized = cached_skeleton(recipe, resolved.config)
    states = state_bytes(model, quantized, recipe, double_quant=double_quantized(strategies, recipe))

    autocast = autocast_context(recipe, target) if target.type == "cpu" else _cpu_twin_autocast(recipe, target)
    seq = recipe.data.max_length
    batch = recipe.train.batch_size
    if batch * seq > MAX_PROFILE_TOKENS:
        raise UserError(f"cannot profile a micro-batch of {batch:,} x {seq:,} tokens (`train.batch_size` x "
                        f"`data.max_length`): memft models up to {MAX_PROFILE_TOKENS:,} tokens per micro-batch; "
                        "lower one of them (gradient accumulation, `train.grad_accum`, does not add memory)")
    real_batch = synthetic_batch(recipe, config.vocab_size, batch, seq, torch.Generator().manual_seed(0))
    for s in strategies:
        real_batch = s.on_step_start(0, real_batch)
    selected = grad_tokens(strategies, real_batch)
    fit = fit_activations(recipe, config, strategies, autocast, partial_gradients=selected is not None)
    widths = activations.Widths.of(config)
    total, logits = fit.predict(widths, batch, seq, selected)
    notes = []
    if selected is not None and fit.residual > RELIABLE_FIT:
        # the token-selection fit is not reliable yet (issue 7): show the bound without selection instead
        names = {s.name for s in strategies if s.grad_tokens(real_batch) is not None}
        plain = recipe.model_copy(deep=True)
        plain.strategies = [s for s in plain.strategies if s.name not in names]
        bound = fit_activations(plain, config, registry.compose(plain), autocast, partial_gradients=False)
        total, logits = bound.predict(widths, batch, seq)
        fit = bound
        notes.append(f"{', '.join(sorted(names))}: activations shown without token selection, an upper bound "
                     "(the fit with selection is not reliable yet)")
    head = model.get_output_embeddings() if recipe.model.task == "causal_lm" else None
    trained_head = head is not None and head.weight.requires_grad
    head_gradient = head.weight.numel() * head.weight.element_size() if trained_head else 0
    transient = loss_transient(recipe, model, strategies, autocast, batch * seq, widths, trained_head, selected)

    extra = MemoryEstimate()
    for s in strategies:
        extra.merge(s.estimate(model, recipe, batch * seq, target))
    per_gpu = {}
    if gpus > 1:
        per_gpu = sharded_fields(model, quantized, recipe, strategies, states, gpus)
        states = {**states, **per_gpu.pop("states")}
    return Profile(
        model=recipe.model.name, source=resolved.source, device=str(target), dtype=recipe.model.dtype,
        batch_size=batch, seq_len=seq, grad_accum=recipe.train.grad_accum,
        strategies=[s.name for s in strategies], gradient_checkpointing=recipe.train.gradient_checkpointing,
        optimizer=recipe.train.optimizer, moe=is_moe(config),
        optimizer_in_backward=recipe.train.optimizer_in_backward, params=states["params"],
        trainable_params=states["trainable_params"],
        weights=states["weights"], gradients=states["gradients"], optimizer_state=states["optimizer_state"],
        activations=int(round(total)), logits=int(round(logits)), layers=config.num_hidden_layers,
        backward_transient=transient, head_gradient=head_gradient, strategy_device=extra.device,
        host={**extra.host, **states["host"]},
        fit_residual=fit.residual, twins=fit.twins, notes=kernel_note + notes + extra.notes, **per_gpu)


def sharded_fields(model: nn.Module, quantized: set[int], recipe: Recipe, strategies: list, states: dict,
                   gpus: int) -> dict:
    """`Profile`'s per-GPU fields for `gpus` ranks (`shard_states`), and under `states` the per-GPU weights, gradients,
    optimizer state and host bytes that replace one process's."""
    cfg = recipe.distributed
    sharded = shard_states(model, quantized, recipe, double_quantized(strategies, recipe), gpus)
    ranks = sharded["ranks"]
    if sharded["shards"] == 1:  # ddp: whole tensors on every rank, stored as one process stores them
        for r in ranks:
            r["optimizer_state"] = states["optimizer_state"]
    layers = sorted(sharded["layers"], reverse=True)
    if not cfg.reshard_after_forward:  # every layer stays gathered from its forward to its backward
        at_loss = during_layer = sum(layers)
    elif sharded["shards"] > 1:  # the layer computed and the next one's all-gather output (backward prefetch)
        at_loss, during_layer = sum(layers[:1]), sum(layers[:2])
    else:  # ddp: a shard of one rank is copied into the unsharded parameter when its unit starts, no prefetch
        at_loss, during_layer = 0, sum(layers[:1])
    if cfg.cpu_offload and layers:  # the shards of the unit being gathered are copied to the device first
        at_loss += layers[0] // sharded["shards"]
        during_layer += layers[0] // sharded["shards"]
    first = ranks[0]  # rank 0 holds the largest shards (the last ranks hold padding only)
    host = dict(states["host"])
    if cfg.cpu_offload:
        host.update({"parameters (FSDP CPU offload)": first["params"],
                     "gradients (FSDP CPU offload)": first["gradients"],
                     "optimizer state (FSDP CPU offload)": first["optimizer_state"]})
    on_device = not cfg.cpu_offload
    return {"states": {"weights": sharded["weights"], "gradients": first["gradients"] if on_device else 0,
                       "optimizer_state": first["optimizer_state"] if on_device else 0, "host": host},
            "gpus": gpus, "distributed": cfg.mode, "cpu_offload": cfg.cpu_offload,
            "reshard_after_forward": cfg.reshard_after_forward, "gathered_root": sharded["root"],
            "gathered_at_loss": at_loss, "gathered_layers": during_layer, "layer_gradients": sharded["layer_grads"],
            "root_gradients": sharded["root_grads"],
            "model_weight_bytes": sum(states["weights"].values()), "ranks": ranks}


def loss_transient(recipe: Recipe, model: nn.Module, strategies: list, autocast, tokens: int, widths,
                   trained_head: bool, selected: int | None = None) -> int:
    """What the causal-LM loss's backward allocates on top of the saved activations. With memft's chunked losses
    (`memft.train.chunked_loss`, the default wherever the head is a plain linear layer): one chunk's logits, the
    hidden states' gradient and a trained bf16 head's float32 sum; over TokenTune's `selected` rows when its loss is
    on them; RevFFN's distillation adds the teacher's chunk (its recovery stage, the larger one). Else two float32
    logit-sized gradients."""
    if recipe.model.task != "causal_lm":
        return 0
    head = linear_head(model)
    if head is None:
        return 2 * tokens * widths.vocab * 4
    by_name = {s.name: s for s in strategies}
    tokentune, revffn = by_name.get("tokentune"), by_name.get("revffn")
    if any(type(s).loss is not registry.Strategy.loss for s in strategies if s not in (tokentune, revffn)):
        return 2 * tokens * widths.vocab * 4  # a strategy's own loss that memft does not chunk
    if tokentune is not None and tokentune.params.loss_on == "selected" and selected is not None:
        tokens = selected
    dtype = autocast.fast_dtype if isinstance(autocast, torch.autocast) else getattr(torch, recipe.model.dtype)
    args = (tokens, widths.vocab, head.in_features, dtype, head.weight.dtype, trained_head)
    if revffn is not None and revffn.params.recovery.steps > 0:
        return distill_transient_bytes(*args)
    return chunked_transient(*args)


def _cpu_twin_autocast(recipe: Recipe, target: torch.device):
    """On CUDA the loop autocasts to bf16 by default; the CPU twins do the same so they save what it saves."""
    from contextlib import nullcontext

    wanted = recipe.train.autocast
    if wanted == "bf16" or (wanted == "auto" and target.type == "cuda"):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def write_json(p: Profile, path: Path, extra: dict | None = None) -> None:
    """Write the prediction (and `extra` keys: the advice) to `path`, its folders created; one sentence when it
    cannot be written."""
    check_writable_file(path, "`--json`")
    write_text(path, json.dumps({**p.to_json(), **(extra or {})}, indent=2), "`--json`")


def stored_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters and buffers occupy, each storage once, with 4-bit quantization constants."""
    seen: dict[int, int] = {}

    def add(t: torch.Tensor) -> None:
        if torch.is_tensor(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    for t in [*model.parameters(), *model.buffers()]:
        add(t)
        state = getattr(t, "quant_state", None)
        if state is not None:
            for part in (state.absmax, state.code, state.offset,
                         *((state.state2.absmax, state.state2.code) if state.nested else ())):
                add(part)
    return sum(seen.values())


def measure(recipe: Recipe) -> dict:
    """Two real training steps of `recipe` here, on full-length synthetic micro-batches: the bytes autograd
    saved, the weights, gradients and optimizer state as stored, and on CUDA the peak allocated. The second
    step is the steady state a run repeats: its forward and backward run beside the optimizer state the
    first step created."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="memft-profile-") as tmp:
        t = Trainer(recipe.model_copy(deep=True), run_dir=tmp).setup()
        cuda = t.device.type == "cuda"
        peaks = []
        for step in range(2):
            if cuda:
                torch.cuda.reset_peak_memory_stats(t.device)
            batch = synthetic_batch(recipe, t.model.config.vocab_size, recipe.train.batch_size,
                                    recipe.data.max_length, torch.Generator().manual_seed(step))
            batch = {k: v.to(t.device) for k, v in batch.items()}
            for s in t.strategies:
                batch = s.on_step_start(step, batch)
            t.model.train()
            with SavedTensorMeter(t.model) as meter, t.autocast:
                out = t._loss(batch)
            (out.loss_sum / max(out.count, 1)).backward()
            for s in t.strategies:
                s.after_backward(step)
            if step == 0:
                saved = meter.bytes
                grads = sum(p.grad.numel() * p.grad.element_size() for p in t.model.parameters() if p.grad is not None)
            backward_peak = torch.cuda.max_memory_allocated(t.device) if cuda else None
            t.optimizer.step()
            for s in t.strategies:
                s.after_optimizer_step(step)
            t.optimizer.zero_grad(set_to_none=True)
            peaks.append((backward_peak, torch.cuda.max_memory_allocated(t.device) if cuda else None))
        states = {v.untyped_storage().data_ptr(): v.untyped_storage().nbytes()
                  for state in t.optimizer.state.values() for v in state.values() if torch.is_tensor(v)}
        return {"activation_bytes": saved, "weight_bytes": stored_bytes(t.model), "gradient_bytes": grads,
                "optimizer_bytes": sum(states.values()),
                "cuda_peak_bytes": max(p for _, p in peaks) if cuda else None,
                "cuda_peaks": [{"forward_backward": b, "step": p} for b, p in peaks] if cuda else None}
