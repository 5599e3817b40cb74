"""`memft train RECIPE --nproc N`: the same command again in N processes on this machine, under torchrun's launcher
(`torch.distributed.launcher`, what `torchrun --standalone --nproc_per_node N` runs), with a free port of its own.

Several machines: run `torchrun --nnodes M --nproc_per_node N --rdzv-endpoint HOST:PORT ... -m memft train RECIPE`
on each, as with any torchrun job. The launcher's own reports (a worker's exit table, a traceback of its own) are
replaced by one sentence, and its exit code is the job's: rank 0's, or 1 when another rank died first.

A rank that hangs (a deadlock, a stuck device, SIGSTOP) makes the others' next collective fail after
`distributed.timeout_s`; the first rank to fail ends the job. torchrun's agent then sends the ranks still running
SIGTERM and waits 30 s before SIGKILL, which a hung rank always needs (it never acts on SIGTERM). Here the wait is
`STOP_GRACE_S`; a rank the launcher had to kill that way is not the cause of the failure, the rank that failed first
is (its own sentence says why).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import uuid
from contextlib import contextmanager

from memft.errors import UserError
from memft.models.load import resolve_device
from memft.recipe import Recipe

STOP_GRACE_S = 5
"""Once a rank failed, how long the ranks still running get to end after SIGTERM before the launcher kills them
(SIGKILL). One that is well ends at once (its next collective finds the failed rank gone, or the signal ends it);
what it could still do is nothing the job can use, since a checkpoint needs every rank."""


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
    stopped: set[int] = set()
    try:
        with _short_stop(STOP_GRACE_S, stopped):
            elastic_launch(config, sys.executable)("-m", "memft", *argv)
    except ChildFailedError as exc:
        return _exit_code(exc.failures, stopped)
    finally:
        quiet.setLevel(level)
    return 0


@contextmanager
def _short_stop(grace: float, stopped: set[int]):
    """While it lasts, torchrun's agent gives the ranks still running `grace` s, not 30, to end after a rank
    failed, and the pids it then had to kill (SIGKILL) are added to `stopped`.

    The agent stops them through `PContext.close()` with its default timeout (`SubprocessContext._poll`, once a
    rank failed); its own shutdown (a signal to the launcher, ranks saving before they stop) passes
    `shutdown_timeout` and is left as it is."""
    from torch.distributed.elastic.multiprocessing import api

    original = api.PContext.close

    def close(self, death_sig=None, timeout=None):
        if timeout is not None:
            return original(self, death_sig, timeout)
        handlers = getattr(self, "subprocess_handlers", None) or {}
        running = [h.proc for h in handlers.values() if h.proc.poll() is None]
        original(self, death_sig, grace)
        stopped.update(p.pid for p in running if p.poll() == -signal.SIGKILL)

    api.PContext.close = close
    try:
        yield
    finally:
        api.PContext.close = original


def _exit_code(failures: dict, stopped: set[int] = frozenset()) -> int:
    """The job's exit code. A rank killed by a signal stopped the job: say which (1). Otherwise rank 0's own
    code, its message already printed (2 for a mistake in the input, which every rank found alike). `stopped`:
    the pids the launcher killed because they did not end in time after another rank failed."""
    # the launcher stops the other ranks once one failed (SIGTERM, then SIGKILL for one that hangs): not the cause
    causes = {r: f for r, f in failures.items()
              if f.exitcode != -signal.SIGTERM and not (f.exitcode == -signal.SIGKILL and f.pid in stopped)} or failures
    killed = {r: f for r, f in causes.items() if f.exitcode < 0}
    if not killed and 0 in causes:
        return causes[0].exitcode
    rank, failure = min((killed or causes).items(), key=lambda kv: (kv[1].timestamp, kv[0]))
    code = failure.exitcode
    try:
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    except ValueError:
        how = f"was killed by signal {-code}"
    hung = sorted(r for r, f in failures.items() if f.pid in stopped and f.exitcode == -signal.SIGKILL)
    also = ""
    if hung:
        ranks = " and ".join(f"rank {r}" for r in hung)
        also = (f"; {ranks} did not end within {STOP_GRACE_S} s after that (hung or stopped) and "
                f"{'was' if len(hung) == 1 else 'were'} killed")
    print(f"run failed: rank {rank} {how}, which stopped the job{also}; rerun the same command to resume from the "
          "last checkpoint", file=sys.stderr)
    return 1
