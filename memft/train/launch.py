"""`memft train RECIPE --nproc N`: the same command again in N processes on this machine, under torchrun's launcher
(`torch.distributed.launcher`, what `torchrun --standalone --nproc_per_node N` runs), with a free port of its own.

Several machines: run `torchrun --nnodes M --nproc_per_node N --rdzv-endpoint HOST:PORT ... -m memft train RECIPE`
on each, as with any torchrun job. The launcher's own reports (a worker's exit table, a traceback of its own) are
replaced by one sentence, and its exit code is the job's: rank 0's, or 1 when another rank died first.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import uuid

from memft.errors import UserError
from memft.models.load import resolve_device
from memft.recipe import Recipe


def launch(nproc: int, argv: list[str], recipe: Recipe) -> int:
    """Run `python -m memft *argv` in `nproc` processes; the exit code of the job."""
    import torch
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    device = resolve_device(recipe.model.device)
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise UserError(f"`--nproc {nproc}` asks for one process per GPU, but this machine has "
                        f"{torch.cuda.device_count()}; use `--nproc {torch.cuda.device_count()}` or fewer")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if device.type == "cpu" and nproc > cores:
        raise UserError(f"`--nproc {nproc}` on the CPU would share {cores} core(s) among {nproc} processes; use "
                        f"`--nproc {cores}` or fewer")
    # each rank its share of the cores (torchrun would give each one thread)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // nproc)))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"memft-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2)
    quiet = logging.getLogger("torch.distributed.elastic")
    level, quiet.level = quiet.level, logging.CRITICAL
    try:
        elastic_launch(config, sys.executable)("-m", "memft", *argv)
    except ChildFailedError as exc:
        return _exit_code(exc.failures)
    finally:
        quiet.setLevel(level)
    return 0


def _exit_code(failures: dict) -> int:
    """The job's exit code. A rank killed by a signal stopped the job: say which (1). Otherwise rank 0's own
    code, its message already printed (2 for a mistake in the input, which every rank found alike)."""
    # the launcher stops the other ranks with SIGTERM once one failed: theirs is not the cause
    causes = {r: f for r, f in failures.items() if f.exitcode != -signal.SIGTERM} or failures
    killed = {r: f for r, f in causes.items() if f.exitcode < 0}
    if not killed and 0 in causes:
        return causes[0].exitcode
    rank, failure = min((killed or causes).items(), key=lambda kv: (kv[1].timestamp, kv[0]))
    code = failure.exitcode
    try:
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    except ValueError:
        how = f"was killed by signal {-code}"
    print(f"run failed: rank {rank} {how}, which stopped the job; rerun the same command to resume from the last "
          "checkpoint", file=sys.stderr)
    return 1
