"""Atomic, exact training checkpoints, in safetensors and JSON only.

Layout of one checkpoint (`run_dir/checkpoints/step-000050/`)::

    trainable.safetensors   every parameter with requires_grad, by named_parameters() name
    optimizer.safetensors   the optimizer state_dict's tensors, under keys like "state.3.exp_avg"
    optimizer.json          the rest of the optimizer state_dict, tensors replaced by {"__tensor__": key}
    scheduler.json          the LR scheduler state_dict (only when a scheduler was given)
    strategies.safetensors  strategies' tensors kept outside the model (only when there are any)
    rng.safetensors         torch CPU RNG state ("cpu") and CUDA RNG states ("cuda.0", ...)
    state.json              written last: format version, the caller's `state`, python and numpy RNG
                            states, the optimizer class and the list of files above
    adapter/                (PEFT models only) the adapter in peft format, for PeftModel.from_pretrained

Exactness: weights, optimizer moments, scheduler counters and every RNG are restored bit for bit, so
a resumed run computes the same losses as one that never stopped (tests/test_checkpoint.py checks
`==`, not closeness).

Atomicity: everything is written into `checkpoints/.tmp-step-000050-<pid>/`, fsynced, then renamed
to `step-000050` in one `os.replace`. A checkpoint is therefore whole or absent. Leftover `.tmp-*` /
`.old-*` dirs from a killed run are ignored and removed by the next `save()`. One process writes to a
run directory at a time (`memft.train.lock`). A write that fails (a full disk) removes its `.tmp-*`
dir and raises `CheckpointWriteFailed`, naming the previous checkpoint, which is untouched.

Only finite state is saved: `save()` checks every tensor it would write (one `isfinite` pass each) and
raises `NonFiniteState` without writing anything, so a checkpoint never holds weights a run has blown up.

Damage: `usable()` / `latest()` skip a step dir that cannot be read back (no or bad `state.json`, a
missing key, a listed file missing, a JSON file or a safetensors header that does not parse), each with
a note; `load()` raises `CheckpointDamaged` for what only reading the data shows (a non-finite value).
When step dirs exist but none is usable, `latest()` refuses with a sentence: memft never deletes a
user's checkpoints to get past damage (`_prune` removes damaged ones only when it writes a new one).

Sharded checkpoints: a torchrun job writes its checkpoints with `memft.train.dist_checkpoint.save`, each rank
its own shards (`model/`, `optimizer/`, `rng/` in the step dir; its docstring has the layout), with the same
atomicity, finiteness and damage rules. Their `state.json` says `"sharded": true`; `check`, `usable`, `survey`,
`latest`, `is_finite`, `load_tensors` and `load` take such a dir as they take the one above (`load` hands it to
`dist_checkpoint.load`, which restores it in one process or in a job of any number of ranks).

Safety: only safetensors and JSON are read back; nothing that can run code on load.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from memft.errors import RunFailed, UserError

FORMAT_VERSION = 1
"""The `format_version` `save` writes; sharded checkpoints (`dist_checkpoint`) are version 2."""
CHECKPOINTS_DIR = "checkpoints"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_TENSORS_FILE = "optimizer.safetensors"
OPTIMIZER_JSON_FILE = "optimizer.json"
SCHEDULER_FILE = "scheduler.json"
STRATEGY_TENSORS_FILE = "strategies.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FILE = "state.json"
ADAPTER_DIR = "adapter"

_STEP_DIR = re.compile(r"^step-(\d+)$")
# Markers of the JSON encoding of values JSON cannot hold as-is (see _encode).
_TENSOR, _TUPLE, _INT_DICT = "__tensor__", "__tuple__", "__int_dict__"
_MARKERS = {_TENSOR, _TUPLE, _INT_DICT}
# state.json keys `load` relies on; a state.json without one of them is damaged, not a checkpoint.
_REQUIRED_META = ("format_version", "step", "optimizer_class", "files", "state", "python_random", "numpy_random")
# What reading back a damaged file raises: safetensors' parser, the OS, json (ValueError), a dangling reference.
_READ_ERRORS = (SafetensorError, OSError, ValueError, KeyError, TypeError)


class CheckpointDamaged(UserError):
    """A checkpoint dir that cannot be used: a damaged or missing file, a missing key, non-finite values."""

    def __init__(self, ckpt_dir: Path, reason: str):
        self.ckpt_dir, self.reason = Path(ckpt_dir), reason
        super().__init__(f"checkpoint {ckpt_dir} cannot be used: {reason}")


class NonFiniteState(ValueError):
    """`save()` was given NaN or infinite values; nothing was written."""

    def __init__(self, names: list[str]):
        self.names = names
        super().__init__(f"non-finite values (nan or inf) in {len(names)} tensor{'s' if len(names) != 1 else ''} "
                         f"({_name_list(names, shown=2)})")


class CheckpointWriteFailed(RunFailed):
    """The OS refused to write a checkpoint (a full disk, a permission); its temporary dir was removed."""


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter with `requires_grad`, by `named_parameters()` name, as contiguous CPU clones.

    Frozen weights (the base model under LoRA, 4-bit QLoRA weights) are not included: they come back
    from the model source, so checkpoints stay the size of what is trained.
    """
    return {
        name: p.detach().to("cpu", copy=True).contiguous()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


# --- JSON encoding of state_dicts ------------------------------------------------------------------


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able form of `obj`; tensors go to `tensors[path]` and are replaced by a reference.

    Tuples and int-keyed dicts (optimizer `state` is keyed by parameter index, AdamW's `betas` is a
    tuple) are tagged so `_decode` gives back the same types, which `load_state_dict` relies on.
    """
    if isinstance(obj, torch.Tensor):
        if path in tensors:
            raise ValueError(f"two optimizer state entries flatten to the same key {path!r}")
        tensors[path] = obj.detach().to("cpu", copy=True).contiguous()
        return {_TENSOR: path}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {_TUPLE: [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        prefix = f"{path}." if path else ""
        if all(isinstance(k, str) for k in obj):
            if len(obj) == 1 and next(iter(obj)) in _MARKERS:
                raise ValueError(f"state entry {path!r} uses a reserved key {next(iter(obj))!r}")
            return {k: _encode(v, prefix + k, tensors) for k, v in obj.items()}
        if all(isinstance(k, int) and not isinstance(k, bool) for k in obj):
            return {_INT_DICT: {str(k): _encode(v, f"{prefix}{k}", tensors) for k, v in obj.items()}}
    raise TypeError(f"cannot checkpoint {type(obj).__name__} at {path!r}: only tensors and JSON values are supported")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `_encode`."""
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if len(obj) == 1:
            [(key, value)] = obj.items()
            if key == _TENSOR:
                return tensors[value]
            if key == _TUPLE:
                return tuple(_decode(v, tensors) for v in value)
            if key == _INT_DICT:
                return {int(k): _decode(v, tensors) for k, v in value.items()}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


# --- RNG ----------------------------------------------------------------------------------------------


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda.{i}"] = s
    return out


def _python_numpy_rng() -> dict[str, Any]:
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python_random": [version, list(internal), gauss_next],
        "numpy_random": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached_gaussian)],
    }


def _restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["cpu"])
    cuda_states = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda_states:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda_states):
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            warnings.warn(
                f"the checkpoint holds {len(cuda_states)} CUDA RNG state(s) but this machine has "
                f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} GPU(s); CUDA RNG not restored, "
                "so dropout after resume will differ from the original run",
                stacklevel=3,
            )
    version, internal, gauss_next = meta["python_random"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, cached_gaussian = meta["numpy_random"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached_gaussian))


# --- file helpers ------------------------------------------------------------------------------------


def _fsync_path(path: Path) -> None:
    """Flush a file or a directory entry to disk (directories: so a rename survives a power cut)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _find_peft_model(model: nn.Module) -> nn.Module | None:
    """The PeftModel in `model` (itself or wrapped by a strategy), or None; peft is optional here."""
    try:
        from peft import PeftModel
    except ImportError:
        return None
    return next((m for m in model.modules() if isinstance(m, PeftModel)), None)


def _read_meta(ckpt_dir: Path) -> dict[str, Any] | None:
    """state.json of a complete checkpoint, or None if the dir is not one (see `_meta_problem`)."""
    try:
        return _checked_meta(ckpt_dir)
    except CheckpointDamaged:
        return None


def _checked_meta(ckpt_dir: Path) -> dict[str, Any]:
    """state.json of `ckpt_dir`, with every key `load` needs and every listed file present.

    Raises:
        CheckpointDamaged: saying what is wrong.
    """
    path = ckpt_dir / STATE_FILE
    if not path.exists():
        raise CheckpointDamaged(ckpt_dir, f"it has no {STATE_FILE} (a save that never finished)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointDamaged(ckpt_dir, f"its {STATE_FILE} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise CheckpointDamaged(ckpt_dir, f"its {STATE_FILE} is not a JSON object")
    missing = [key for key in _REQUIRED_META if key not in meta]
    if missing:
        raise CheckpointDamaged(ckpt_dir, f"its {STATE_FILE} lacks " + ", ".join(f"`{k}`" for k in missing))
    if not isinstance(meta["state"], dict) or not isinstance(meta["files"], list):
        raise CheckpointDamaged(ckpt_dir, f"its {STATE_FILE} has a `state` or `files` of the wrong type")
    absent = [name for name in meta["files"] if not (ckpt_dir / name).exists()]
    if absent:
        raise CheckpointDamaged(ckpt_dir, f"{_name_list(absent)} listed in its {STATE_FILE} is missing")
    return meta


def check(ckpt_dir: Path) -> dict[str, Any]:
    """The checkpoint's state.json after a cheap check of every file: each JSON file parses and each
    safetensors header is whole (safetensors compares it with the file size, so a truncated file fails);
    in a sharded checkpoint, also that the shards hold every tensor whole (`dist_checkpoint.shard_problem`).
    Tensor values are not read; `load` checks those.

    Raises:
        CheckpointDamaged: saying which file is damaged and how.
    """
    ckpt_dir = Path(ckpt_dir)
    meta = _checked_meta(ckpt_dir)
    for name in meta["files"]:
        path = ckpt_dir / name
        try:
            if name.endswith(".safetensors"):
                with safe_open(path, framework="pt"):
                    pass
            elif name.endswith(".json"):
                json.loads(path.read_text())
        except _READ_ERRORS as exc:
            raise CheckpointDamaged(ckpt_dir, f"{name} is damaged ({exc})") from None
    if meta.get("sharded"):
        from memft.train import dist_checkpoint

        why = dist_checkpoint.shard_problem(ckpt_dir, meta)
        if why is not None:
            raise CheckpointDamaged(ckpt_dir, why)
    return meta


def _nonfinite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity (one `isfinite` pass each)."""
    return [name for name, t in tensors.items()
            if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all())]


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """`(step, dir)` for every `step-N` dir under `root`, oldest first, complete or not."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


# --- public API --------------------------------------------------------------------------------------


def save(
    run_dir: Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None,
    state: dict,
    keep_last: int,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint of `step` atomically and keep only the newest `keep_last` ones.

    Args:
        run_dir: the run's output directory; checkpoints go to `run_dir/checkpoints/step-NNNNNN/`.
        step: optimizer steps done so far.
        model, optimizer, scheduler: what to save (`scheduler` may be None).
        state: the loop's own JSON-able state (e.g. `{"step": 50, "epoch": 0, "batch_index": 400}`),
            given back by `load`.
        keep_last: how many step checkpoints to keep (>= 1); the one just written is always kept.
        tensors: strategies' tensor state that lives outside the model (e.g. MEFT's host adapter and its
            optimizer moments), by name; given back by `load_tensors`.

    Returns:
        The checkpoint directory.
    """
    if keep_last < 1:
        raise ValueError("keep_last must be >= 1")
    run_dir = Path(run_dir)
    root = run_dir / CHECKPOINTS_DIR
    name = step_dir_name(step)

    # Everything is gathered and checked before the first byte is written: a non-finite value means
    # the run has blown up, and such a checkpoint would only lead a resume back into the same NaN.
    trainable = trainable_state_dict(model)
    opt_tensors: dict[str, torch.Tensor] = {}
    opt_json = _encode(optimizer.state_dict(), "", opt_tensors)
    sched_json = None
    if scheduler is not None:
        sched_tensors: dict[str, torch.Tensor] = {}
        sched_json = _encode(scheduler.state_dict(), "", sched_tensors)
        if sched_tensors:
            raise TypeError(f"{type(scheduler).__name__}.state_dict() holds tensors; only JSON values are supported")
    strategy_tensors = {k: v.contiguous() for k, v in (tensors or {}).items()}
    bad = (_nonfinite(trainable) + [f"optimizer state {k}" for k in _nonfinite(opt_tensors)]
           + [f"strategy tensor {k}" for k in _nonfinite(strategy_tensors)])
    if bad:
        raise NonFiniteState(bad)

    tmp = root / f".tmp-{name}-{os.getpid()}"
    try:
        _clear_leftovers(root)
        tmp.mkdir()
        files = _write_files(tmp, model, trainable, opt_tensors, opt_json, sched_json, strategy_tensors)
        final = _seal(tmp, root / name, _meta(step, optimizer, files, state))
    except (OSError, SafetensorError) as exc:  # safetensors reports its own write errors as SafetensorError
        shutil.rmtree(tmp, ignore_errors=True)
        previous = _newest_complete(root)
        intact = (f"the previous checkpoint {previous} is intact" if previous is not None
                  else "no earlier checkpoint exists")
        reason = getattr(exc, "strerror", None) or exc
        raise CheckpointWriteFailed(f"could not write checkpoint {name} in {root}: {reason}; "
                                    f"its partial files were removed and {intact}") from exc

    _prune(root, keep=final, keep_last=keep_last)
    return final


def _write_files(tmp: Path, model: nn.Module, trainable, opt_tensors, opt_json, sched_json,
                 strategy_tensors) -> list[str]:
    """Every file of a checkpoint but state.json, into `tmp`; the names written."""
    files = [TRAINABLE_FILE, OPTIMIZER_TENSORS_FILE, OPTIMIZER_JSON_FILE, RNG_FILE]
    save_file(trainable, tmp / TRAINABLE_FILE)
    save_file(opt_tensors, tmp / OPTIMIZER_TENSORS_FILE)
    _write_json(tmp / OPTIMIZER_JSON_FILE, opt_json)
    if sched_json is not None:
        _write_json(tmp / SCHEDULER_FILE, sched_json)
        files.append(SCHEDULER_FILE)
    save_file(_rng_tensors(), tmp / RNG_FILE)
    if strategy_tensors:
        save_file(strategy_tensors, tmp / STRATEGY_TENSORS_FILE)
        files.append(STRATEGY_TENSORS_FILE)
    peft_model = _find_peft_model(model)
    if peft_model is not None:
        peft_model.save_pretrained(tmp / ADAPTER_DIR)
        files.append(ADAPTER_DIR)
    return files


def _clear_leftovers(root: Path) -> None:
    """Make the checkpoints dir and drop the leftovers of a run killed mid-save: never complete, safe to drop (one
    writer per run dir)."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in list(root.glob(".tmp-*")) + list(root.glob(".old-*")):
        shutil.rmtree(stale, ignore_errors=True)


def _meta(step: int, optimizer: torch.optim.Optimizer, files: list[str], state: dict, **extra) -> dict[str, Any]:
    """The contents of state.json."""
    return {"format_version": FORMAT_VERSION, "step": step, "optimizer_class": type(optimizer).__name__,
            "files": files, "state": state, **extra, **_python_numpy_rng()}


def _seal(tmp: Path, final: Path, meta: dict[str, Any]) -> Path:
    """Write state.json last (its presence, listing files that exist, is what marks a checkpoint complete), fsync
    everything in `tmp`, and rename it to `final`."""
    _write_json(tmp / STATE_FILE, meta)
    for path in tmp.rglob("*"):
        _fsync_path(path)
    _fsync_path(tmp)
    return _move_into_place(tmp, final)


def _move_into_place(tmp: Path, final: Path) -> Path:
    """Rename the finished `tmp` dir to `final` atomically and flush the rename to disk."""
    if final.exists():
        # Re-saving a step (after a resume): os.replace cannot overwrite a non-empty dir, so move the
        # old one aside first; between the two renames the step is absent, never half-written.
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        try:
            os.replace(tmp, final)
        except OSError:
            os.replace(old, final)  # put the old one back rather than leave the step missing
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_path(final.parent)
    return final


def _newest_complete(root: Path) -> Path | None:
    return next((path for _, path in reversed(_step_dirs(root)) if _read_meta(path) is not None), None)


def _prune(root: Path, keep: Path, keep_last: int) -> None:
    """Remove incomplete or damaged step dirs and all but the newest `keep_last` complete ones (never `keep`).

    A damaged dir must not count as one of the newest: it would push out the good one a resume fell back to.
    """
    complete = []
    for _, path in _step_dirs(root):
        if path != keep and _problem(path) is not None:
            _remove(path)
        elif path != keep:
            complete.append(path)
    for path in complete[: max(len(complete) - (keep_last - 1), 0)]:
        _remove(path)


def _remove(path: Path) -> None:
    """Delete a step dir so that no reader ever sees it half-deleted: renamed aside first (a `.old-*` name, which
    `usable` never reads and the next save clears if this one is killed), then removed."""
    aside = path.with_name(f".old-{path.name}-{os.getpid()}")
    try:
        os.replace(path, aside)
    except OSError:
        aside = path
    shutil.rmtree(aside, ignore_errors=True)


def _problem(ckpt_dir: Path) -> str | None:
    """Why `ckpt_dir` cannot be used, or None when `check` finds nothing wrong."""
    try:
        check(ckpt_dir)
    except CheckpointDamaged as exc:
        return exc.reason
    return None


def usable(run_dir: Path, notes: list[str] | None = None) -> list[Path]:
    """Every checkpoint dir under `run_dir/checkpoints` that passes `check`, newest first.

    Each step dir that does not pass adds a note to `notes`: one sentence naming it and why.

    Raises:
        UserError: step dirs exist but none is usable (nothing is deleted: the user decides).
    """
    found, damaged = survey(run_dir)
    if notes is not None:
        notes += [f"skipped checkpoint {path.name}: {why}" for path, why in damaged]
    if damaged and not found:
        raise unusable_error(Path(run_dir) / CHECKPOINTS_DIR, damaged)
    return found


def survey(run_dir: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The step dirs under `run_dir/checkpoints`, newest first: those that pass `check`, and (dir, why) for
    those that do not."""
    found, damaged = [], []
    for _, path in reversed(_step_dirs(Path(run_dir) / CHECKPOINTS_DIR)):
        why = _problem(path)
        if why is None:
            found.append(path)
        else:
            damaged.append((path, why))
    return found, damaged


def unusable_error(root: Path, damaged: list[tuple[Path, str]]) -> UserError:
    """The refusal for a run directory whose checkpoints all fail, newest first in `damaged`."""
    each = "; ".join(f"{path.name}: {why}" for path, why in damaged)
    return UserError(f"{root} holds checkpoints but none can be used ({each}); memft does not delete them: "
                     "delete them or choose another `output.dir`")


def latest(run_dir: Path, notes: list[str] | None = None) -> Path | None:
    """The newest usable checkpoint dir under `run_dir/checkpoints` (see `usable`), or None when there is none.

    Raises:
        UserError: step dirs exist but none is usable.
    """
    found = usable(run_dir, notes)
    return found[0] if found else None


def is_finite(ckpt_dir: Path) -> bool:
    """Whether every weight, optimizer and strategy tensor of a checkpoint is finite (reads them all).

    Older memft could write a checkpoint with NaN weights; `save` now refuses to."""
    ckpt_dir = Path(ckpt_dir)
    meta = _read_meta(ckpt_dir)
    if meta is not None and meta.get("sharded"):
        from memft.train import dist_checkpoint

        return dist_checkpoint.is_finite(ckpt_dir, meta)
    try:
        return not any(_nonfinite(load_file(ckpt_dir / name))
                       for name in (TRAINABLE_FILE, OPTIMIZER_TENSORS_FILE, STRATEGY_TENSORS_FILE)
                       if (ckpt_dir / name).exists())
    except _READ_ERRORS:
        return False


def _name_list(names: list[str], shown: int = 5) -> str:
    if not names:
        return "none"
    more = f" (+{len(names) - shown} more)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _load_trainable(ckpt_dir: Path, model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(params.keys() - saved.keys())
    unexpected = sorted(saved.keys() - params.keys())
    if missing or unexpected:
        raise UserError(
            f"checkpoint {ckpt_dir} was written for a different model/strategy: "
            f"missing {_name_list(missing)}, unexpected {_name_list(unexpected)}"
        )
    for name, p in params.items():
        if saved[name].shape != p.shape:
            raise UserError(
                f"checkpoint {ckpt_dir} was written for a different model/strategy: {name} has shape "
                f"{tuple(saved[name].shape)} in the checkpoint but {tuple(p.shape)} in the model"
            )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])


def _read(ckpt_dir: Path, name: str, reader) -> Any:
    """`reader(ckpt_dir / name)`, with a damaged file reported as `CheckpointDamaged`."""
    try:
        return reader(ckpt_dir / name)
    except _READ_ERRORS as exc:
        raise CheckpointDamaged(ckpt_dir, f"{name} is damaged ({exc})") from None


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _refuse_nonfinite(ckpt_dir: Path, tensors: dict[str, torch.Tensor]) -> None:
    bad = _nonfinite(tensors)
    if bad:
        raise CheckpointDamaged(ckpt_dir, f"it holds non-finite values (nan or inf) in {_name_list(bad)}, "
                                          "written after the run had blown up")


def load_tensors(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """The strategies' tensor state saved with `save(tensors=...)` (empty when there was none).

    Raises:
        CheckpointDamaged: the file is damaged or holds non-finite values.
    """
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / STRATEGY_TENSORS_FILE).exists():
        return {}
    tensors = _read(ckpt_dir, STRATEGY_TENSORS_FILE, load_file)
    _refuse_nonfinite(ckpt_dir, tensors)
    return tensors


def _sharded(model: nn.Module) -> bool:
    """Whether `model`'s parameters are FSDP's (DTensors): a torchrun job's model."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def read(ckpt_dir: Path, meta: dict[str, Any], *, optimizer=None, scheduler=None) -> tuple[dict, Any, Any, dict]:
    """Every file a single-process `load` restores from, read and checked, restoring nothing: the trainable
    weights, the optimizer state_dict (when `optimizer` is given), the scheduler's and the RNG tensors."""
    if meta["format_version"] > FORMAT_VERSION:
        raise UserError(
            f"checkpoint {ckpt_dir} has format version {meta['format_version']}, newer than this memft "
            f"supports ({FORMAT_VERSION}); upgrade memft"
        )
    if optimizer is not None and meta["optimizer_class"] != type(optimizer).__name__:
        raise UserError(
            f"checkpoint {ckpt_dir} was written with optimizer {meta['optimizer_class']} but this run "
            f"uses {type(optimizer).__name__}; use the same optimizer to resume"
        )
    if scheduler is not None and not (ckpt_dir / SCHEDULER_FILE).exists():
        raise UserError(f"checkpoint {ckpt_dir} has no learning-rate scheduler state to resume from")

    weights = _read(ckpt_dir, TRAINABLE_FILE, load_file)
    _refuse_nonfinite(ckpt_dir, weights)
    opt_state = sched_state = None
    if optimizer is not None:
        opt_tensors = _read(ckpt_dir, OPTIMIZER_TENSORS_FILE, load_file)
        _refuse_nonfinite(ckpt_dir, opt_tensors)
        layout = _read(ckpt_dir, OPTIMIZER_JSON_FILE, _read_json)
        opt_state = _read(ckpt_dir, OPTIMIZER_JSON_FILE, lambda _: _decode(layout, opt_tensors))
    if scheduler is not None:
        sched_state = _read(ckpt_dir, SCHEDULER_FILE, lambda path: _decode(_read_json(path), {}))
    return weights, opt_state, sched_state, _read(ckpt_dir, RNG_FILE, load_file)


def load(
    ckpt_dir: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
) -> dict:
    """Restore trainable weights, optimizer, scheduler and all RNGs from `ckpt_dir`; return the saved `state`.

    Build `model`, `optimizer` and `scheduler` exactly as for the original run (same strategy, same
    parameter order) before calling. `optimizer` / `scheduler` may be None to restore weights only.
    Every file is read and checked before anything is restored, so a damaged checkpoint changes nothing.
    A sharded checkpoint goes to `dist_checkpoint.load`, a single-process one into a job's sharded model to
    `dist_checkpoint.load_whole` (in a torchrun job, every rank must call this then).

    Raises:
        CheckpointDamaged: a file is damaged or missing, a key is missing, or a value is not finite;
            an older checkpoint may still be used.
        UserError: the checkpoint was written for a different model, strategy or optimizer, or by a
            newer memft.
    """
    ckpt_dir = Path(ckpt_dir)
    try:
        meta = _checked_meta(ckpt_dir)
    except CheckpointDamaged as exc:
        raise CheckpointDamaged(ckpt_dir, f"not a complete memft checkpoint: {exc.reason}") from None
    if meta.get("sharded") or _sharded(model):
        from memft.train import dist_checkpoint

        if meta.get("sharded"):
            return dist_checkpoint.load(ckpt_dir, model=model, optimizer=optimizer, scheduler=scheduler)
        return dist_checkpoint.load_whole(ckpt_dir, model=model, optimizer=optimizer, scheduler=scheduler)
    weights, opt_state, sched_state, rng = read(ckpt_dir, meta, optimizer=optimizer, scheduler=scheduler)
    _load_trainable(ckpt_dir, model, weights)
    if optimizer is not None:
        try:
            optimizer.load_state_dict(opt_state)
        except (ValueError, KeyError) as exc:
            raise UserError(f"checkpoint {ckpt_dir} was written for a different model/strategy: {exc}") from exc
    if scheduler is not None:
        scheduler.load_state_dict(sched_state)

    # RNG last, so nothing above consumes random numbers after the restore.
    _read(ckpt_dir, STATE_FILE, lambda _: _restore_rng(rng, meta))
    return meta["state"]
