"""A rank that hangs (SIGSTOP: alive, never answering, deaf to SIGTERM) never hangs the job: the rank waiting on
it fails its collective after `distributed.timeout_s`, says so in one sentence, and the launcher ends the stopped
rank and exits 1 within a few seconds more, with no traceback. It hangs in the middle of a checkpoint (the
collectives of a save fail otherwise than a step's); the one saved before is intact."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from memft.errors import UserError
from memft.train import checkpoint, launch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "quickstart.yaml")
TIMEOUT_S = 10  # the least `distributed.timeout_s` allows


def job_ranks(run: Path) -> dict[int, int]:
    """rank -> pid of the live processes of the job writing to `run` (found by its `output.dir=` argument, which
    is unique to this test: whatever their parent is now)."""
    mark = f"output.dir={run}".encode()
    found = {}
    for child in Path("/proc").iterdir():
        if not child.name.isdigit():
            continue
        try:
            if mark not in (child / "cmdline").read_bytes().split(b"\0"):
                continue
            environ = (child / "environ").read_bytes().split(b"\0")
            state = (child / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        rank = [v for v in environ if v.startswith(b"RANK=")]
        if rank and state != "Z":
            found[int(rank[0][5:])] = int(child.name)
    return found


def saved_so_far(run: Path) -> Path | None:
    """The newest usable checkpoint of a job still running, or None (read while rank 0 renames one into place or
    aside, the directory can look like it has none usable: ask again later)."""
    try:
        return checkpoint.latest(run) if (run / "checkpoints").is_dir() else None
    except UserError:
        return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the ranks through /proc")
def test_a_hung_rank_ends_the_job_after_the_collective_timeout_with_one_sentence(tmp_path):
    data = tmp_path / "rows.jsonl"  # a few rows: reading the whole sample on every rank costs seconds
    data.write_text("".join((ROOT / "recipes" / "data" / "gsm8k_sample.jsonl").read_text().splitlines(True)[:40]))
    run = tmp_path / "run"
    command = [sys.executable, "-m", "memft", "train", RECIPE, "model.name=tiny-llama", "model.device=cpu",
               f"data.source={data}", "data.max_length=128", "train.batch_size=2", "train.max_steps=100000",
               "train.warmup_steps=0", "train.eval_every=null", "output.save_every=2", "output.plot=false",
               f"distributed.timeout_s={TIMEOUT_S}", f"output.dir={run}", "--nproc", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "1000"}  # COLUMNS: each message on one line
    with open(tmp_path / "stdout", "w") as out, open(tmp_path / "stderr", "w") as err_file:
        launcher = subprocess.Popen(command, env=env, stdout=out, stderr=err_file, cwd=ROOT)
    try:
        deadline = time.monotonic() + 240
        while saved_so_far(run) is None and launcher.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.1)
        ranks = job_ranks(run)
        assert launcher.poll() is None and sorted(ranks) == [0, 1], (tmp_path / "stderr").read_text()[-3000:]
        deadline = time.monotonic() + 60
        while not any((run / "checkpoints").glob(".tmp-step-*")):  # the next save (every 2 steps) is under way
            assert time.monotonic() < deadline and launcher.poll() is None, "no save began within 60 s"
            time.sleep(0.002)
        before = saved_so_far(run)  # sealed before this save began (pruned only after two more, never now)
        os.kill(ranks[1], signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            launcher.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("the job still runs 120 s after rank 1 hung")
        took = time.monotonic() - stopped
        err = (tmp_path / "stderr").read_text()

        # rank 0's collective waited `distributed.timeout_s` for rank 1; the launcher then gave rank 1 (deaf to its
        # SIGTERM) `STOP_GRACE_S` before SIGKILL
        assert launcher.returncode == 1, err[-3000:]
        assert TIMEOUT_S - 2 <= took < TIMEOUT_S + launch.STOP_GRACE_S + 20, took  # torchrun alone waits 30 s more
        assert job_ranks(run) == {}, "a rank of the job outlived the launcher"

        # one sentence: who lost whom, the timeout by its recipe field, where to resume; no traceback, and no
        # second one from the launcher about the stopped rank it had to kill (SIGKILL): that is not the cause
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, err
        after = checkpoint.latest(run)  # nothing writes any more
        said = re.fullmatch(r"run failed: rank 0 lost the other ranks in saving step (\d+): .* did not answer within "
                            rf"`distributed\.timeout_s` \({TIMEOUT_S} s\); rerun the same command to resume from (.+)",
                            lines[0])
        assert said, lines[0]
        assert Path(said[2]) == after

        # the checkpoint saved before the hang is whole (one being written when rank 1 stopped is never sealed,
        # or sealed whole), and no half-written step dir is left in the way of a resume
        assert after is not None and before is not None and after.name >= before.name
        assert int(said[1]) >= checkpoint.check(after)["step"] >= checkpoint.check(before)["step"] >= 2
        assert checkpoint.check(after)["sharded"] and checkpoint.survey(run)[1] == []
    finally:  # whatever failed: no process of the job is left, the stopped one included (SIGKILL ends it)
        for pid in job_ranks(run).values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if launcher.poll() is None:
            launcher.kill()
        launcher.wait(timeout=60)
