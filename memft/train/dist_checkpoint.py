"""Sharded training checkpoints for a torchrun job: every rank writes its own shards, any number of ranks resumes.

`save()` is collective: every rank of the default process group calls it, at the same step. The model is an
FSDP2 module (`fully_shard`: its parameters are DTensors), a `DistributedDataParallel` wrapper or a plain module;
its state is keyed by the unwrapped module's parameter names (no `module.` prefix), so a checkpoint does not depend
on the number of ranks that wrote it. `load()` restores it in a process group of any size (PyTorch's distributed
checkpoint reads each rank's slices of every tensor from whichever shards hold them) or in one plain process with
no process group at all. `memft.train.checkpoint` reads both layouts: its `check` / `usable` / `latest` /
`is_finite` / `load_tensors` / `load` take a sharded step dir as they take a single-process one.

Layout of one sharded checkpoint (`run_dir/checkpoints/step-000050/`)::

    model/shard-0000K-model-00001-of-00001.safetensors
                            the slices rank K-1 holds of every trainable parameter, by parameter name; the
                            header's metadata (`DCP_SHARDING_INFO`) gives each slice's offset in the whole
                            tensor. A replicated tensor (DDP) is written once, by one of the ranks
    optimizer/shard-...     the same for every optimizer tensor (moments, and the 0-dim `step` counters), under
                            keys like "state.model.layers.0.mlp.up_proj.weight.exp_avg"
    optimizer.json          the optimizer state_dict keyed by parameter name, tensors replaced by {"__tensor__": key}
    scheduler.json          as in the single-process layout
    strategies.safetensors  strategies' tensors kept outside the model (replicated; rank 0's)
    rng/rank-0000R.safetensors
                            rank R's torch CPU RNG state ("cpu") and its current GPU's ("cuda")
    adapter/                (PEFT models only) the whole adapter in peft format, gathered to rank 0
    state.json              written last, by rank 0: as in the single-process layout (format version 2) plus
                            `"sharded": true` and `"world_size"`; `files` lists every shard and RNG file

What PyTorch's safetensors storage (`HuggingFaceStorageWriter`) cannot hold stays out of it: the optimizer's
non-tensor state (param groups, hyperparameters) is JSON, and the rest is memft's own files. Its reader takes
every `.safetensors` file of a dir for part of the checkpoint and does not notice a slice that no file holds, so
`check` compares the shard files with the ones `state.json` lists and adds up each tensor's slices from their
headers: a deleted, truncated or stray shard marks the checkpoint damaged before anything is read.

Guarantees, as in `memft.train.checkpoint`: atomic (all ranks write into one `.tmp-*` dir that rank 0 names, and
rank 0 renames it in one `os.replace` after the others are done), fsynced, finite (each rank checks its own shards
and all ranks raise `NonFiniteState` together, before anything is written), exact (float64 resumes in any number
of ranks give the same weights; tests/test_dist_checkpoint.py), damage reported as `CheckpointDamaged` by every
rank at once, and only safetensors and JSON are read back. A rank that fails makes every rank raise: no rank waits
for a collective the others never reach.

The per-rank torch RNG is restored from `rng/rank-R` of the same rank, or rank 0's when the saving job had fewer
ranks; the Python and NumPy RNGs are rank 0's, restored on every rank (memft's ranks draw the same from them).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from memft.errors import UserError
from memft.train import checkpoint
from memft.train.checkpoint import (
    ADAPTER_DIR,
    CHECKPOINTS_DIR,
    OPTIMIZER_JSON_FILE,
    SCHEDULER_FILE,
    STATE_FILE,
    STRATEGY_TENSORS_FILE,
    CheckpointDamaged,
    CheckpointWriteFailed,
    NonFiniteState,
    _clear_leftovers,
    _decode,
    _encode,
    _find_peft_model,
    _fsync_path,
    _meta,
    _name_list,
    _newest_complete,
    _prune,
    _read_json,
    _restore_rng,
    _seal,
    _write_json,
    step_dir_name,
)

FORMAT_VERSION = 2
"""The `format_version` of a sharded checkpoint (a memft that reads only version 1 refuses it with a sentence)."""
MODEL_DIR = "model"
OPTIMIZER_DIR = "optimizer"
RNG_DIR = "rng"
SHARD_DIRS = (MODEL_DIR, OPTIMIZER_DIR)
"""The dirs PyTorch's safetensors storage writes, one shard file per rank that held a slice of something."""
_SHARDING_KEY = "DCP_SHARDING_INFO"  # the safetensors header metadata where PyTorch's writer keeps slice offsets
# What reading a damaged shard raises: safetensors' parser, the OS, the storage reader's own checks.
_READ_ERRORS = (SafetensorError, OSError, ValueError, KeyError, TypeError, AssertionError, CheckpointException)


# --- the process group, or none -------------------------------------------------------------------


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _world_size() -> int:
    return dist.get_world_size() if _distributed() else 1


def _gather(value: Any) -> list[Any]:
    """`value` from every rank, in rank order (small JSON-like values: names, reasons)."""
    if not _distributed():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _write_shards(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Each rank's slices of `tensors` into its own safetensors file in `path` (collective)."""
    with warnings.catch_warnings():  # without a process group PyTorch says it assumes one process: it is one
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(path), save_distributed=True),
                 no_dist=not _distributed())


def _read_shards(targets: dict[str, torch.Tensor], path: Path, no_dist: bool = False) -> None:
    """Fill `targets` (this rank's slices, or whole tensors) from the shards in `path` (collective unless
    `no_dist` or there is no process group)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(targets, storage_reader=HuggingFaceStorageReader(str(path)), no_dist=no_dist or not _distributed())


def _rng_file(rank: int) -> str:
    return f"{RNG_DIR}/rank-{rank:05d}.safetensors"


# --- names: the unwrapped module's, whatever wraps it ------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    """The module whose parameter names the checkpoint uses: inside DDP and torch.compile wrappers."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in _unwrap(model).named_parameters() if p.requires_grad}


def _model_state(model: nn.Module, **options) -> dict[str, torch.Tensor]:
    """The trainable parameters by name, from PyTorch's state-dict API (DTensors under FSDP: this rank's shards)."""
    names = _trainable(model)
    full = get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True, **options))
    return {name: full[name] for name in names if name in full}


def _optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict:
    """`optimizer.state_dict()` with parameter indices replaced by parameter names.

    PyTorch's `get_optimizer_state_dict` does the same, but first steps an optimizer that has no state yet (to
    create it), which would start the run's AdamW counters one step early; this reads the state as it is.
    """
    names = {id(p): name for name, p in _unwrap(model).named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    unknown = [i for i, p in enumerate(params) if id(p) not in names]
    if unknown:
        raise ValueError(f"the optimizer steps {len(unknown)} tensor(s) that are not parameters of the model; build "
                         "it after wrapping the model (fully_shard replaces the parameters) and over its parameters")
    fqn = [names[id(p)] for p in params]
    sd = optimizer.state_dict()
    return {**sd, "state": {fqn[i]: value for i, value in sd["state"].items()},
            "param_groups": [{**group, "params": [fqn[i] for i in group["params"]]} for group in sd["param_groups"]]}


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _nonfinite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors whose slice on this rank holds a NaN or an infinity."""
    return checkpoint._nonfinite({name: _local(t) for name, t in tensors.items()})


# --- save ----------------------------------------------------------------------------------------------


def save(
    run_dir: Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None = None,
    state: dict,
    keep_last: int,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a sharded checkpoint of `step` atomically and keep only the newest `keep_last` ones. Collective.

    The arguments mean what they mean for `memft.train.checkpoint.save`; every rank passes its own `model` and
    `optimizer` (built after the model was wrapped) and the same `step`, `state` and `tensors`.

    Raises:
        NonFiniteState: on every rank, when any rank's shards hold a NaN or an infinity; nothing was written.
        CheckpointWriteFailed: on every rank, when a rank could not write; the partial dir was removed.
    """
    if keep_last < 1:
        raise ValueError("keep_last must be >= 1")
    rank, world = _rank(), _world_size()
    root = Path(run_dir) / CHECKPOINTS_DIR
    name = step_dir_name(step)

    # Gather and check everything before the first byte is written (every rank the same way, so a type error is
    # raised by all ranks here, before any collective).
    weights = _model_state(model, cpu_offload=True)
    opt_tensors: dict[str, torch.Tensor] = {}
    opt_json = _encode(_optimizer_state(optimizer, model), "", opt_tensors)
    sched_json = None
    if scheduler is not None:
        sched_tensors: dict[str, torch.Tensor] = {}
        sched_json = _encode(scheduler.state_dict(), "", sched_tensors)
        if sched_tensors:
            raise TypeError(f"{type(scheduler).__name__}.state_dict() holds tensors; only JSON values are supported")
    json.dumps(state)  # a TypeError now, on every rank, rather than on rank 0 alone after the others have written
    strategy_tensors = {k: v.contiguous() for k, v in (tensors or {}).items()}
    bad = (_nonfinite(weights) + [f"optimizer state {k}" for k in _nonfinite(opt_tensors)]
           + [f"strategy tensor {k}" for k in _nonfinite(strategy_tensors)])
    bad = list(dict.fromkeys(n for names in _gather(bad) for n in names))  # every rank learns of every rank's
    if bad:
        raise NonFiniteState(bad)
    peft_model = _find_peft_model(model)
    adapter = _model_state(model, full_state_dict=True, cpu_offload=True) if peft_model is not None else {}

    # 1. Rank 0 clears a killed run's leftovers and makes the dir; the others learn its name (or why not).
    if rank == 0:
        try:
            _clear_leftovers(root)
            tmp = root / f".tmp-{name}-{os.getpid()}"
            tmp.mkdir()
            (tmp / RNG_DIR).mkdir()
            made: Any = tmp.name
        except OSError as exc:
            made = {"error": _reason(exc)}
    else:
        made = None
    made = _broadcast(made)
    if isinstance(made, dict):
        _raise_write_failed(root, name, [made["error"]])
    tmp = root / made

    # 2. Every rank writes its shards and its RNG file.
    failure = None
    try:
        _write_shards(weights, tmp / MODEL_DIR)
        if opt_tensors:
            _write_shards(opt_tensors, tmp / OPTIMIZER_DIR)
        save_file(_rng_tensors(), tmp / _rng_file(rank))
        _fsync_path(tmp / _rng_file(rank))
    except (Exception, CheckpointException) as exc:  # any failure must reach the others, or they would wait forever
        failure = _reason(exc)
    _finish_or_fail(root, name, tmp, _gather(failure))

    # 3. Rank 0 writes the JSON parts and state.json last, then renames the dir into place and prunes.
    final = root / name
    failure = None
    if rank == 0:
        try:
            files = _shard_files(tmp) + [OPTIMIZER_JSON_FILE] + [_rng_file(r) for r in range(world)]
            _write_json(tmp / OPTIMIZER_JSON_FILE, opt_json)
            if sched_json is not None:
                _write_json(tmp / SCHEDULER_FILE, sched_json)
                files.append(SCHEDULER_FILE)
            if strategy_tensors:
                save_file({k: v.detach().cpu().contiguous() for k, v in strategy_tensors.items()},
                          tmp / STRATEGY_TENSORS_FILE)
                files.append(STRATEGY_TENSORS_FILE)
            if peft_model is not None:
                prefix = _prefix_of(_unwrap(model), peft_model)
                peft_model.save_pretrained(tmp / ADAPTER_DIR, state_dict={
                    k[len(prefix):]: v for k, v in adapter.items() if k.startswith(prefix)})
                files.append(ADAPTER_DIR)
            _seal(tmp, final, _meta(step, optimizer, files, state, format_version=FORMAT_VERSION, sharded=True,
                                    world_size=world))
        except Exception as exc:  # as above: the other ranks wait for this one's verdict
            failure = _reason(exc)
    _finish_or_fail(root, name, tmp, _gather(failure))
    if rank == 0:
        _prune(root, keep=final, keep_last=keep_last)
    if _distributed():
        dist.barrier()  # nobody returns (and, say, resumes from it) before the checkpoint is in place and pruned
    return final


def _broadcast(value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    if not _distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _reason(exc: BaseException) -> str:
    """One line for `exc`; PyTorch's loader and saver raise a `CheckpointException` holding every rank's error."""
    if isinstance(exc, CheckpointException):
        return "; ".join(dict.fromkeys(f"rank {r}: {_reason(e)}" for r, (e, _) in sorted(exc.failures.items())))
    return str(getattr(exc, "strerror", None) or exc) or type(exc).__name__


def _finish_or_fail(root: Path, name: str, tmp: Path, failures: list[str | None]) -> None:
    """After every rank has reported: go on when none failed, else (all ranks) remove `tmp` and raise."""
    several = len(failures) > 1
    reasons = list(dict.fromkeys(why if why.startswith("rank ") or not several else f"rank {r}: {why}"
                                 for r, why in enumerate(failures) if why is not None))
    if not reasons:
        return
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    if _distributed():
        dist.barrier()  # the partial dir is gone before any rank reports that it is
    _raise_write_failed(root, name, reasons)


def _raise_write_failed(root: Path, name: str, reasons: list[str]) -> None:
    previous = _newest_complete(root)
    intact = f"the previous checkpoint {previous} is intact" if previous is not None else "no earlier checkpoint exists"
    raise CheckpointWriteFailed(f"could not write checkpoint {name} in {root}: {'; '.join(reasons)}; "
                                f"its partial files were removed and {intact}")


def _shard_files(ckpt_dir: Path) -> list[str]:
    """The shard files in `ckpt_dir`'s shard dirs, relative to it."""
    return [f"{sub}/{path.name}" for sub in SHARD_DIRS if (ckpt_dir / sub).is_dir()
            for path in sorted((ckpt_dir / sub).glob("*.safetensors"))]


def _prefix_of(root: nn.Module, module: nn.Module) -> str:
    name = next(n for n, m in root.named_modules() if m is module)
    return f"{name}." if name else ""


def _rng_tensors() -> dict[str, torch.Tensor]:
    """This rank's torch RNG: the CPU's and its own GPU's (not every GPU's: that would start a context on each)."""
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


# --- check ---------------------------------------------------------------------------------------------


def shard_problem(ckpt_dir: Path, meta: dict[str, Any]) -> str | None:
    """Why the shards of a sharded checkpoint cannot be read back whole, or None; reads only their headers.

    The storage reader takes every shard file it finds and reads each tensor's slices from wherever they are,
    so a shard file that `state.json` does not list, or a tensor whose slices do not add up to the whole
    tensor, is damage (a missing or truncated listed file is found by `checkpoint.check`).
    """
    ckpt_dir = Path(ckpt_dir)
    listed = {name for name in meta["files"] if name.split("/")[0] in SHARD_DIRS}
    stray = sorted(set(_shard_files(ckpt_dir)) - listed)
    if stray:
        return f"{_name_list(stray)} is not listed in its {STATE_FILE}"
    for sub in SHARD_DIRS:
        covered: dict[str, int] = {}
        size: dict[str, list[int]] = {}
        for name in sorted(n for n in listed if n.startswith(f"{sub}/")):
            try:
                with safe_open(ckpt_dir / name, framework="pt") as f:
                    offsets = json.loads((f.metadata() or {}).get(_SHARDING_KEY, "{}"))
                    for key in f.keys():
                        shape = f.get_slice(key).get_shape()
                        start = offsets.get(key, {}).get("saved_offsets", [0] * len(shape))
                        end = [a + b for a, b in zip(start, shape)]
                        size[key] = [max(a, b) for a, b in zip(size.get(key, end), end)]
                        covered[key] = covered.get(key, 0) + math.prod(shape)
            except _READ_ERRORS as exc:
                return f"{name} is damaged ({exc})"
        gaps = [key for key in size if covered[key] != math.prod(size[key])]
        if gaps:
            return (f"the shards in {sub}/ do not hold {_name_list(gaps, shown=2)} whole "
                    "(a shard file is missing or was replaced)")
    return None


def is_finite(ckpt_dir: Path, meta: dict[str, Any]) -> bool:
    """Whether every weight, optimizer and strategy tensor of a sharded checkpoint is finite (reads them all)."""
    names = [n for n in meta["files"] if n.split("/")[0] in SHARD_DIRS or n == STRATEGY_TENSORS_FILE]
    try:
        return not any(checkpoint._nonfinite(load_file(Path(ckpt_dir) / name)) for name in names)
    except _READ_ERRORS:
        return False


# --- load ----------------------------------------------------------------------------------------------


def _agree(ckpt_dir: Path, verdict: tuple[str, str] | None, error: BaseException | None = None) -> None:
    """Every rank raises when any rank found a problem (`verdict`: "damaged", "user" or "error", and a sentence):
    its own `error` when it has one, else the first rank's, so that no rank goes on to a collective alone."""
    found = [(r, v) for r, v in enumerate(_gather(verdict)) if v is not None]
    if not found:
        return
    if error is not None:
        raise error
    r, (kind, text) = found[0]
    if kind == "damaged":
        raise CheckpointDamaged(ckpt_dir, f"{text} (found by rank {r})")
    if kind == "user":
        raise UserError(text)
    raise RuntimeError(f"rank {r} could not load checkpoint {ckpt_dir}: {text}")


def load(
    ckpt_dir: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
) -> dict:
    """Restore a sharded checkpoint into this job's ranks (collective; any number of them) or, with no process
    group, into one plain process; return the saved `state`.

    Build `model` (wrapped as this job wraps it), then `optimizer` over its parameters, and `scheduler`, as for the
    original run. Everything is read and checked before anything is restored, so a damaged checkpoint changes
    nothing: the data goes first into new tensors laid out as this job's (on each parameter's device, so a load
    needs the trainable shards' memory once more for a moment).

    Raises:
        CheckpointDamaged: on every rank, when a file is damaged or missing or a value is not finite.
        UserError: on every rank, when the checkpoint was written for a different model, strategy or optimizer.
    """
    ckpt_dir = Path(ckpt_dir)
    meta, weights, opt_tensors, opt_state, sched_state, rng = _on_every_rank(
        ckpt_dir, lambda: _prepare(ckpt_dir, model, optimizer, scheduler))

    # The reads are collective: PyTorch's loader plans them together and raises on every rank when one fails.
    verdict = None
    try:
        _read_shards(weights, ckpt_dir / MODEL_DIR)
        if opt_tensors:
            _read_shards(opt_tensors, ckpt_dir / OPTIMIZER_DIR)
    except _READ_ERRORS as exc:
        verdict = ("damaged", f"its shards cannot be read ({_reason(exc)})")
    if verdict is None:
        bad = _nonfinite(weights) + _nonfinite(opt_tensors)
        if bad:
            verdict = ("damaged", f"it holds non-finite values (nan or inf) in {_name_list(bad)}, "
                                  "written after the run had blown up")
    _agree(ckpt_dir, verdict)

    # Nothing below is collective, and nothing can fail on one rank alone: every check was made above.
    set_model_state_dict(model, weights, options=StateDictOptions(strict=False))
    if optimizer is not None:
        optimizer.load_state_dict(opt_state)
    if scheduler is not None:
        scheduler.load_state_dict(sched_state)

    # RNG last, so nothing above consumes random numbers after the restore.
    checkpoint._read(ckpt_dir, STATE_FILE, lambda _: _restore_rng({"cpu": rng["cpu"]}, meta))
    if "cuda" in rng:
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        else:
            warnings.warn("the checkpoint holds a CUDA RNG state but this machine has no GPU; CUDA RNG not restored, "
                          "so dropout after resume will differ from the original run", stacklevel=2)
    return meta["state"]


def _on_every_rank(ckpt_dir: Path, prepare):
    """`prepare()` (this rank's own checks and reads, no collective), raised on every rank when it fails on any,
    so that no rank goes on to a collective alone."""
    verdict = error = result = None
    try:
        result = prepare()
    except CheckpointDamaged as exc:
        verdict, error = ("damaged", exc.reason), exc
    except UserError as exc:
        verdict, error = ("user", str(exc)), exc
    except Exception as exc:  # a bug here must not leave the other ranks waiting in a collective
        verdict, error = ("error", _reason(exc)), exc
    _agree(ckpt_dir, verdict, error)
    return result


def load_whole(
    ckpt_dir: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
) -> dict:
    """Restore a single-process checkpoint (`memft.train.checkpoint`'s layout) into this job's sharded `model`
    (collective): every rank reads the whole files and keeps its own slices, so a run started in one process goes
    on in N; return the saved `state`. Every rank restores the CPU RNG the process saved (and its GPU the first
    GPU's), as when a sharded checkpoint resumes on more ranks than wrote it.

    Raises, on every rank, what `load` raises."""
    ckpt_dir = Path(ckpt_dir)
    meta, weights, opt_state, sched_state, rng = _on_every_rank(
        ckpt_dir, lambda: _prepare_whole(ckpt_dir, model, optimizer, scheduler))
    set_model_state_dict(model, weights, options=StateDictOptions(strict=False))
    if optimizer is not None:
        optimizer.load_state_dict(opt_state)
    if scheduler is not None:
        scheduler.load_state_dict(sched_state)
    if "cuda.0" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda.0"])  # the process's first GPU's onto this rank's own
    checkpoint._read(ckpt_dir, STATE_FILE, lambda _: _restore_rng({"cpu": rng["cpu"]}, meta))
    return meta["state"]


def _prepare_whole(ckpt_dir: Path, model: nn.Module, optimizer, scheduler):
    """This rank's part of `load_whole` before anything is restored: the files read, checked against this job's
    model and optimizer, and cut into this rank's shards."""
    meta = checkpoint.check(ckpt_dir)
    weights, opt_state, sched_state, rng = checkpoint.read(ckpt_dir, meta, optimizer=optimizer, scheduler=scheduler)
    live = _model_state(model)
    _check_same_trainable(ckpt_dir, live, {name: t.shape for name, t in weights.items()})
    weights = {name: _shard_like(weights[name], t) for name, t in live.items()}
    if optimizer is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        sizes = [len(group["params"]) for group in opt_state["param_groups"]]
        if sizes != [len(group["params"]) for group in optimizer.param_groups]:
            raise UserError(f"checkpoint {ckpt_dir} was written for a different model/strategy: its optimizer steps "
                            f"{sum(sizes)} parameters in {len(sizes)} group(s), this run's {len(params)} in "
                            f"{len(optimizer.param_groups)}")
        for index, values in opt_state["state"].items():
            for key, value in values.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    values[key] = _moment_like(value, params[int(index)], ckpt_dir, f"{index}.{key}")
    return meta, weights, opt_state, sched_state, rng


def _check_same_trainable(ckpt_dir: Path, live: dict[str, torch.Tensor], saved: dict[str, torch.Size]) -> None:
    """Refuse a checkpoint whose trainable tensors are not this model's, by name and shape."""
    missing, unexpected = sorted(live.keys() - saved.keys()), sorted(saved.keys() - live.keys())
    if missing or unexpected:
        raise UserError(f"checkpoint {ckpt_dir} was written for a different model/strategy: "
                        f"missing {_name_list(missing)}, unexpected {_name_list(unexpected)}")
    for name, t in live.items():
        if tuple(saved[name]) != tuple(t.shape):
            raise UserError(f"checkpoint {ckpt_dir} was written for a different model/strategy: {name} has shape "
                            f"{tuple(saved[name])} in the checkpoint but {tuple(t.shape)} in the model")


def _shard_like(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`whole` laid out as `like`: this rank's slice of it when `like` is a DTensor (every rank holds `whole`, so
    nothing is sent)."""
    if not isinstance(like, DTensor):
        return whole.to(like.device)
    return distribute_tensor(whole.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def _moment_like(value: torch.Tensor, param: torch.Tensor, ckpt_dir: Path, key: str) -> torch.Tensor:
    """An optimizer tensor sharded as its parameter (moments have its shape); any other shape cannot be."""
    if tuple(value.shape) == tuple(param.shape):
        return _shard_like(value, param)
    if isinstance(param, DTensor):
        raise _unshardable(ckpt_dir, key, value.shape, param)
    return value


def _unshardable(ckpt_dir: Path, key: str, size: torch.Size, param: torch.Tensor) -> UserError:
    return UserError(f"checkpoint {ckpt_dir}: optimizer state {key} has shape {tuple(size)}, not its parameter's "
                     f"{tuple(param.shape)}, so memft cannot tell how to shard it; resume in one process")


def _prepare(ckpt_dir: Path, model: nn.Module, optimizer, scheduler):
    """This rank's own part of `load`, before any collective: every check, the small files, and the new tensors
    the shards are read into (the optimizer state_dict already refers to them)."""
    meta = checked_meta(ckpt_dir)
    if optimizer is not None and meta["optimizer_class"] != type(optimizer).__name__:
        raise UserError(f"checkpoint {ckpt_dir} was written with optimizer {meta['optimizer_class']} but this run "
                        f"uses {type(optimizer).__name__}; use the same optimizer to resume")
    if scheduler is not None and SCHEDULER_FILE not in meta["files"]:
        raise UserError(f"checkpoint {ckpt_dir} has no learning-rate scheduler state to resume from")
    rng_file = _rng_file(_rank()) if _rng_file(_rank()) in meta["files"] else _rng_file(0)
    rng = checkpoint._read(ckpt_dir, rng_file, load_file)
    if "cpu" not in rng:
        raise CheckpointDamaged(ckpt_dir, f"{rng_file} holds no CPU RNG state")

    saved = _saved_tensors(ckpt_dir, MODEL_DIR, meta)
    live = _model_state(model)
    _check_same_trainable(ckpt_dir, live, {name: size for name, (size, _) in saved.items()})
    weights = {name: torch.empty_like(t) for name, t in live.items()}

    opt_tensors: dict[str, torch.Tensor] = {}
    opt_state = sched_state = None
    if optimizer is not None:
        layout = checkpoint._read(ckpt_dir, OPTIMIZER_JSON_FILE, _read_json)
        refs = checkpoint._read(ckpt_dir, OPTIMIZER_JSON_FILE, lambda _: _refs(layout))
        saved = _saved_tensors(ckpt_dir, OPTIMIZER_DIR, meta)
        params = _trainable(model)
        for owner, key in refs:
            if key not in saved:
                raise CheckpointDamaged(ckpt_dir, f"the optimizer tensor {key} named in {OPTIMIZER_JSON_FILE} is in "
                                                  f"no shard of {OPTIMIZER_DIR}/")
            opt_tensors[key] = _target(*saved[key], params.get(owner), ckpt_dir, key)
        named = checkpoint._read(ckpt_dir, OPTIMIZER_JSON_FILE, lambda _: _decode(layout, opt_tensors))
        opt_state = _by_index(named, optimizer, model, ckpt_dir)
    if scheduler is not None:
        sched_state = checkpoint._read(ckpt_dir, SCHEDULER_FILE, lambda path: _decode(_read_json(path), {}))
    return meta, weights, opt_tensors, opt_state, sched_state, rng


def checked_meta(ckpt_dir: Path) -> dict[str, Any]:
    """The state.json of a sharded checkpoint whose files all pass `checkpoint.check`.

    Raises:
        CheckpointDamaged: saying what is wrong.
        UserError: the checkpoint was written by a newer memft.
    """
    meta = checkpoint.check(ckpt_dir)
    if not meta.get("sharded"):
        raise CheckpointDamaged(ckpt_dir, f"its {STATE_FILE} does not describe a sharded checkpoint")
    if meta["format_version"] > FORMAT_VERSION:
        raise UserError(f"checkpoint {ckpt_dir} has format version {meta['format_version']}, newer than this memft "
                        f"supports ({FORMAT_VERSION}); upgrade memft")
    return meta


def _saved_tensors(ckpt_dir: Path, sub: str, meta: dict) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Shape and dtype of every whole tensor in a shard dir, from the shards' headers."""
    if not any(name.startswith(f"{sub}/") for name in meta["files"]):
        return {}
    try:
        found = HuggingFaceStorageReader(str(ckpt_dir / sub)).read_metadata().state_dict_metadata
    except _READ_ERRORS as exc:
        raise CheckpointDamaged(ckpt_dir, f"the shards in {sub}/ are damaged ({exc})") from None
    return {key: (md.size, md.properties.dtype) for key, md in found.items()}


def _refs(layout: dict) -> list[tuple[str | None, str]]:
    """(parameter name, tensor key) for every tensor in an encoded optimizer state_dict; None for a tensor that
    belongs to no parameter's state."""
    owned = [(name, key) for name, sub in layout["state"].items() for key in _tensor_keys(sub)]
    return owned + [(None, key) for k, sub in layout.items() if k != "state" for key in _tensor_keys(sub)]


def _tensor_keys(obj: Any) -> list[str]:
    if isinstance(obj, dict):
        if len(obj) == 1 and checkpoint._TENSOR in obj:
            return [obj[checkpoint._TENSOR]]
        return [key for sub in obj.values() for key in _tensor_keys(sub)]
    if isinstance(obj, list):
        return [key for sub in obj for key in _tensor_keys(sub)]
    return []


def _target(size: torch.Size, dtype: torch.dtype, param: torch.Tensor | None, ckpt_dir: Path, key: str):
    """A new tensor to read optimizer state `key` into: sharded like its parameter when it has the parameter's
    shape (moments), else whole (`step` counters stay on the CPU, where torch's optimizers keep them)."""
    if param is not None and tuple(size) == tuple(param.shape):
        return torch.empty_like(param, dtype=dtype)
    if param is not None and isinstance(param, DTensor) and len(size) > 0:
        raise _unshardable(ckpt_dir, key, size, param)
    device = param.device if param is not None and len(size) > 0 else torch.device("cpu")
    return torch.empty(size, dtype=dtype, device=device)


def _by_index(saved: dict, optimizer: torch.optim.Optimizer, model: nn.Module, ckpt_dir: Path) -> dict:
    """A name-keyed optimizer state_dict turned back into `optimizer`'s own, keyed by parameter index."""
    names = {id(p): name for name, p in _unwrap(model).named_parameters()}
    groups = [[names.get(id(p)) for p in group["params"]] for group in optimizer.param_groups]
    saved_groups = [group["params"] for group in saved["param_groups"]]
    if groups != saved_groups:
        raise UserError(f"checkpoint {ckpt_dir} was written for a different model/strategy: its optimizer steps "
                        f"{sum(map(len, saved_groups))} parameters in {len(saved_groups)} group(s), this run's "
                        f"{sum(map(len, groups))} in {len(groups)}, or the same ones in another order")
    index = {name: i for i, name in enumerate(n for group in groups for n in group)}
    unknown = sorted(saved["state"].keys() - index.keys())
    if unknown:
        raise UserError(f"checkpoint {ckpt_dir} holds optimizer state for {_name_list(unknown)}, which this run's "
                        "optimizer does not step")
    return {**saved, "state": {index[name]: value for name, value in saved["state"].items()},
            "param_groups": [{**group, "params": [index[n] for n in group["params"]]}
                             for group in saved["param_groups"]]}


# --- export --------------------------------------------------------------------------------------------


def consolidated_trainable(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """The whole trainable tensors of a sharded checkpoint, by parameter name, on the CPU (one process, no process
    group: for `memft export`).

    Raises:
        CheckpointDamaged: a shard is damaged or missing, or a value is not finite.
    """
    ckpt_dir = Path(ckpt_dir)
    meta = checked_meta(ckpt_dir)
    saved = _saved_tensors(ckpt_dir, MODEL_DIR, meta)
    out = {key: torch.empty(size, dtype=dtype) for key, (size, dtype) in saved.items()}
    if out:
        try:
            _read_shards(out, ckpt_dir / MODEL_DIR, no_dist=True)
        except _READ_ERRORS as exc:
            raise CheckpointDamaged(ckpt_dir, f"its shards cannot be read ({_reason(exc)})") from None
    checkpoint._refuse_nonfinite(ckpt_dir, out)
    return out
