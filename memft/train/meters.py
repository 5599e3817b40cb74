"""Measured, never assumed: activation bytes, peak memory and throughput.

- `SavedTensorMeter` counts the bytes autograd keeps for backward (the activation memory every
  strategy claims to save). It is exact and needs no GPU.
- `peak_memory` / `reset_peak_memory` read the allocator's peak on CUDA and the process's peak
  resident set size on CPU.
- `StepTimer` times one optimizer step (synchronizing CUDA so the time is the device's, not the
  launch queue's) and turns it into tokens/s and samples/s.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

# ru_maxrss is in KiB on Linux (bytes on macOS, where this module is not used for reported numbers).
_BYTES_PER_KIB = 1024
# Highest CPU peak RSS read since the last reset (see peak_memory).
_cpu_peak_bytes = 0


def _storage_key(t: torch.Tensor) -> tuple[int, int] | None:
    """`(data_ptr, nbytes)` of the storage behind `t`, or None for tensors without one (sparse, meta, nested)."""
    try:
        storage = t.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    if ptr == 0:  # meta tensors and empty storages hold no memory
        return None
    return ptr, nbytes


def _storage_keys(t: torch.Tensor) -> list[tuple[int, int]]:
    """The storages that hold `t`: its own, or a sparse COO tensor's indices and values."""
    if t.layout == torch.sparse_coo:
        parts = [t._indices(), t._values()]
    else:
        parts = [t]
    return [key for key in map(_storage_key, parts) if key is not None]


class SavedTensorMeter:
    """Bytes autograd saves for backward while active (each storage counted once, parameters and buffers excluded).

    Use it around the forward pass (and the loss), before backward runs::

        with SavedTensorMeter(model) as meter:
            loss = model(**batch).loss
        meter.bytes  # activation memory of this forward, in bytes
        loss.backward()

    A `saved_tensors_hooks` pack hook sees every tensor that an autograd node stores for backward
    (`ctx.save_for_backward`, the inputs of `mm`, the output of `exp`, ...). The meter records the
    *storage* behind it: a view of a saved tensor and the tensor itself share one storage and are
    counted once, and a tensor saved by several nodes is counted once. The whole storage is counted
    (a saved slice of a big tensor keeps the big tensor alive). A sparse COO tensor counts its
    indices and values; tensors with no storage of their own (meta, nested, some subclasses) count 0. Tensors are returned unchanged: the
    meter copies nothing and changes no numerics.

    Excluded: every parameter and buffer of `model` (matched by storage, so `weight.t()` saved by a
    Linear and bitsandbytes' 4-bit `Params4bit` are both excluded), any `nn.Parameter`, and the
    tensors in `exclude` (e.g. the input batch, which the caller holds anyway).

    Interaction with `torch.utils.checkpoint` (measured on an 8-layer tiny Llama, see
    tests/test_meters.py and docs):

    - `use_reentrant=True`: the checkpointed layer runs under `no_grad` (it saves nothing) and
      `CheckpointFunction` keeps the layer's tensor inputs with `ctx.save_for_backward`, which this
      hook sees. The count is what backward truly holds.
    - `use_reentrant=False`: checkpoint installs its own `saved_tensors_hooks` inside the layer, which
      shadow ours, and its pack hook stores a placeholder instead of the tensor, so nothing inside the
      layer is held. The layer's tensor inputs are kept by `_CheckpointFrame.save_inputs` through
      `torch._C._autograd._make_saved_tensor`, which runs *outside* checkpoint's hooks and so goes
      through ours: they are counted. Both modes therefore give honest, near-equal counts.
    - In both modes, tensors passed to the layer as *keyword* arguments (transformers passes
      `position_embeddings` and `attention_mask` through `functools.partial`) are kept alive by the
      recompute closure, not by autograd, and are not counted. They are shared by all layers and tiny
      (`2 x seq x head_dim` for RoPE), so the undercount is a few KiB, not per-layer activations.

    The meter must not outlive the tensors it saw: storage pointers are reused after a free, so wrap
    the forward only, not a whole training loop.

    Attributes:
        bytes: total bytes of the distinct storages saved for backward.
        count: number of distinct storages saved.
    """

    def __init__(self, model: nn.Module | None = None, exclude: Iterable[torch.Tensor] = ()):
        tensors = list(exclude)
        if model is not None:
            tensors += list(model.parameters()) + list(model.buffers())
        self._excluded = {ptr for t in tensors for ptr, _ in _storage_keys(t)}
        self._seen: dict[int, int] = {}
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())

    @property
    def count(self) -> int:
        return len(self._seen)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, nn.Parameter):
            for ptr, nbytes in _storage_keys(t):
                if ptr not in self._excluded:
                    self._seen[ptr] = max(self._seen.get(ptr, 0), nbytes)
        return t  # no copy: the meter only observes

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def __enter__(self) -> SavedTensorMeter:
        self._seen = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        assert self._hooks is not None
        self._hooks.__exit__(*exc)
        self._hooks = None


def current_rss_bytes() -> int:
    """Resident set size of this process now, from /proc/self/statm (0 where /proc is unavailable)."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return resident_pages * resource.getpagesize()


def _vm_hwm_bytes() -> int | None:
    """Peak RSS since the last reset ("VmHWM" in /proc/self/status), None where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * _BYTES_PER_KIB
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_memory(device: torch.device | str) -> dict[str, int]:
    """Peak memory since the last `reset_peak_memory` (or process start).

    Returns:
        cuda: `{"peak_mem_bytes": max_memory_allocated, "peak_mem_reserved_bytes": max_memory_reserved}`
        (allocated is what tensors used; reserved adds the caching allocator's slack).
        cpu: `{"peak_mem_bytes": peak resident set size of the whole process}`: weights, activations,
        the Python heap and loaded libraries alike, so compare differences, not absolute values.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return {
            "peak_mem_bytes": torch.cuda.max_memory_allocated(device),
            "peak_mem_reserved_bytes": torch.cuda.max_memory_reserved(device),
        }
    # VmHWM is the same number as ru_maxrss but can be reset (clear_refs); fall back to ru_maxrss.
    hwm = _vm_hwm_bytes()
    if hwm is None:
        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _BYTES_PER_KIB
    # The kernel reads its RSS counters approximately (per-CPU batches), so two readings can go down
    # by a few hundred KiB; a running maximum keeps "peak" monotone between resets.
    global _cpu_peak_bytes
    _cpu_peak_bytes = max(_cpu_peak_bytes, hwm, current_rss_bytes())
    return {"peak_mem_bytes": _cpu_peak_bytes}


def reset_peak_memory(device: torch.device | str) -> None:
    """Start a new peak: CUDA's allocator statistics, or the process's peak RSS on Linux CPU.

    On CPU, writing "5" to /proc/self/clear_refs resets VmHWM to the current RSS (Linux >= 4.0);
    where that is not permitted the peak simply keeps counting from process start.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    global _cpu_peak_bytes
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return  # cannot reset: keep the process-wide peak
    _cpu_peak_bytes = 0


class StepTimer:
    """Wall-clock time of one optimizer step, with rates.

    On CUDA the timer synchronizes at start and stop: kernels run asynchronously, so without it the
    time would measure how fast Python queues work, not how fast the GPU does it.

    Example::

        timer = StepTimer(device)
        timer.start()
        ...  # forward, backward, optimizer.step()
        rates = timer.stop(tokens=n_tokens, samples=batch_size)
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self._t0: float | None = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # a host-device sync point, on purpose

    def start(self) -> None:
        self._sync()
        self._t0 = time.perf_counter()

    def stop(self, tokens: int, samples: int) -> dict[str, float]:
        """Returns `{"step_time_s", "tokens_per_s", "samples_per_s"}` for the step since `start()`."""
        if self._t0 is None:
            raise RuntimeError("StepTimer.stop() called before start()")
        self._sync()
        elapsed = max(time.perf_counter() - self._t0, 1e-9)  # a clock tick can be coarser than a tiny step
        self._t0 = None
        return {
            "step_time_s": elapsed,
            "tokens_per_s": tokens / elapsed,
            "samples_per_s": samples / elapsed,
        }
