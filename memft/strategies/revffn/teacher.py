"""RevFFN's recovery teacher: a frozen copy of the original model, kept on the device or in host memory.

The teacher only ever runs forward, under no_grad, and its weights never change. So on a GPU its decoder layers
can live in (pinned) host memory and be copied to the device one layer at a time, just for that layer's forward:
the device holds the teacher's embeddings, final norm and head plus one decoder layer, instead of a second copy of
the whole model (for OLMoE-1B-7B in bf16, 0.8 GiB instead of 12.9 GiB). The layer computes on exactly the same
weights, so the teacher's outputs are bitwise those of the resident copy; the price is one host-to-device copy of
the decoder layers per recovery step.
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn

from memft.models.blocks import decoder_body


def frozen_copy(model: nn.Module, on_host: bool) -> nn.Module:
    """A frozen eval-mode copy of `model`. With `on_host`, its decoder layers' weights are copied straight into host
    memory (pinned when a GPU is present; never a second time on the device) and streamed to the model's device
    for each layer's forward (`stream_layers`)."""
    memo = {}
    layers = decoder_body(model).layers
    if on_host:
        device = next(layers.parameters()).device
        for t in [*layers.parameters(), *layers.buffers()]:
            host = t.detach().to("cpu", copy=True)
            host = host.pin_memory() if torch.cuda.is_available() else host
            memo[id(t)] = nn.Parameter(host, requires_grad=False) if isinstance(t, nn.Parameter) else host
    teacher = copy.deepcopy(model, memo).eval().requires_grad_(False)
    if on_host:
        stream_layers(decoder_body(teacher).layers, device)
    return teacher


def stream_layers(layers: nn.ModuleList, device: torch.device) -> None:
    """Each layer's weights (resident in host memory) are put on `device` just before its forward and dropped right
    after it: at most one layer's weights are on the device at a time."""
    for layer in layers:
        params = [(p, p.data) for p in layer.parameters()]
        buffers = [(m, name, b) for m in layer.modules() for name, b in m._buffers.items() if b is not None]
        layer.register_forward_pre_hook(functools.partial(_upload, params, buffers, device))
        layer.register_forward_hook(functools.partial(_release, params, buffers))


def _copy_to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    # pinned host memory: the copy is queued on the current stream, ahead of the layer's kernels
    return t.to(device, non_blocking=True)


def _upload(params, buffers, device, module, args) -> None:
    for p, host in params:
        p.data = _copy_to(host, device)
    for owner, name, host in buffers:
        owner._buffers[name] = _copy_to(host, device)


def _release(params, buffers, module, args, output) -> None:
    for p, host in params:
        p.data = host  # the device copy is freed (the caching allocator reuses it in stream order)
    for owner, name, host in buffers:
        owner._buffers[name] = host


def placement_bytes(teacher: nn.Module, on_host: bool) -> tuple[int, int]:
    """(device bytes, host bytes) of `teacher`: with `on_host`, the device keeps all but the decoder layers plus
    the largest layer (streamed one at a time), and the host the layers."""
    def size(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    total = size([*teacher.parameters(), *teacher.buffers()])
    if not on_host:
        return total, 0
    layers = decoder_body(teacher).layers
    each = [size([*layer.parameters(), *layer.buffers()]) for layer in layers]
    return total - sum(each) + max(each, default=0), sum(each)
