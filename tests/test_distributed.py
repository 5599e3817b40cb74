"""Several processes (torchrun, gloo on the CPU) train what one process trains with the same global batch.

Two ranks with `train.batch_size: 2` each read the rows one process with `batch_size: 4` reads; their loss
trajectory, gradient norms and evaluation equal it (float64, 1e-10) for full fine-tuning (FSDP and DDP), LoRA (with
checkpointing and accumulation), TokenTune, LCSB, a MoE model and a pretrained one with CPU offload; QLoRA (FSDP
shards the packed 4-bit weights) in float32, 1e-5. Rank 0 alone reads the weights (but for QLoRA) and sends rank 1
its shards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memft import recipe as recipe_mod
from memft.errors import UserError
from memft.train import distributed
from memft.train.loop import Trainer

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "quickstart.yaml")
SCRIPTS = Path(__file__).parent / "dist_scripts"
BASE = ["model.name=tiny-llama", "model.dtype=float64", "model.device=cpu", "data.max_length=128",
        "train.max_steps=3", "train.warmup_steps=0", "train.lr=3e-3", "train.eval_every=3", "train.eval_batches=2",
        "output.checkpoints=false", "output.plot=false"]
CASES = {
    "full-fsdp": ["distributed.mode=fsdp"],
    "full-ddp": ["distributed.mode=ddp"],
    "lora-checkpointing-accumulation": ["strategies=[{name: lora, params: {r: 4}}]", "train.gradient_checkpointing=true",
                                        "train.grad_accum=2"],
    "tokentune": ["strategies=[{name: full}, {name: tokentune, params: {fraction: 0.5}}]"],
    "lcsb": ["strategies=[{name: full}, {name: lcsb, params: {groups: 2}}]"],
    "moe": ["model.name=tiny-olmoe", "train.router_aux_loss=off"],
    "qlora-f32": ["model.dtype=float32", "strategies=[{name: qlora, params: {r: 4}}]"],
    # pretrained weights rank 0 reads and sends; the shards kept in host memory (CPU offload, without pinning)
    "pretrained-cpu-offload": ["model.name=stories260K", "distributed.cpu_offload=true"],
}
RANKS = 2


def torchrun(script_args: list[str], timeout: int = 600, nproc: int = RANKS) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 ...` (a free port of its own), failing instead of hanging."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", *script_args],
                          env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranks")
    cases = [{"recipe": RECIPE, "overrides": [*BASE, *extra, "train.batch_size=2"], "dir": str(root / name)}
             for name, extra in CASES.items()]
    done = torchrun([str(SCRIPTS / "train_matrix.py"), json.dumps(cases)])
    assert done.returncode == 0, done.stderr[-4000:]
    return root


def train_here(run_dir: Path, overrides: list[str]) -> Path:
    """`memft train` in this process (as the CLI drives `Trainer`)."""
    trainer = Trainer(recipe_mod.load(RECIPE, [*BASE, *overrides]), run_dir=run_dir)
    trainer.setup()
    trainer.train()
    return run_dir


def single_process(run_dir: Path, extra: list[str]) -> Path:
    """One process reading the two ranks' rows together."""
    return train_here(run_dir, [*extra, f"train.batch_size={2 * RANKS}"])


def close(a: float, b: float, tol: float) -> bool:
    return abs(a - b) <= tol * max(abs(b), 1.0)


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_train_what_one_process_trains_with_the_same_global_batch(case, sharded_runs, tmp_path):
    got = records(sharded_runs / case)
    want = records(single_process(tmp_path / "one", CASES[case]))
    tol = 1e-5 if case.endswith("f32") else 1e-10
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for mine, ref in zip(got, want):
        for key in ("loss", "grad_norm", "eval_loss", "lr"):
            assert (key in mine) == (key in ref), (case, key)
            if key in ref:
                assert close(mine[key], ref[key], tol), (case, mine["step"], key, mine[key], ref[key])
    summary = json.loads((sharded_runs / case / "summary.json").read_text())
    assert summary["world_size"] == RANKS and [r["rank"] for r in summary["ranks"]] == [0, 1]
    assert summary["peak_mem_bytes"] == max(r["peak_mem_bytes"] for r in summary["ranks"])
    # rank 0 alone read the weights and sent rank 1 its shards; bitsandbytes quantizes while loading, on every rank
    loads = [json.loads((sharded_runs / case / f"loads-rank-{r}.json").read_text())["load_model_calls"]
             for r in range(RANKS)]
    assert loads == ([1, 1] if "qlora" in case else [1, 0])


def test_rows_split_a_global_batch_and_a_rank_without_rows_gets_a_zero_weight_stand_in():
    import torch

    batch = {"input_ids": torch.arange(6).reshape(3, 2), "labels": torch.arange(6).reshape(3, 2)}
    worlds = [distributed.World(rank=r, size=2, local_rank=r, mode="fsdp", device=torch.device("cpu"))
              for r in range(2)]
    (a, real_a), (b, real_b) = (w.rows(batch) for w in worlds)
    assert real_a and real_b
    assert torch.equal(torch.cat([a["input_ids"], b["input_ids"]]), batch["input_ids"])
    one = {k: v[:1] for k, v in batch.items()}
    stand_in, real = worlds[1].rows(one)
    assert not real and torch.equal(stand_in["input_ids"], one["input_ids"])


@pytest.mark.parametrize("extra, says", [
    (["strategies=[{name: full}, {name: revffn}]", "model.name=tiny-olmoe"], "`revffn` rebuilds"),
    (["train.optimizer_in_backward=true", "train.max_grad_norm=null"], "`train.optimizer_in_backward`"),
    (["train.optimizer_state=host"], "`distributed.cpu_offload: true`"),
    (["train.optimizer=adamw_8bit"], "`distributed.mode: ddp`"),
    (["strategies=[{name: qlora}]", "model.dtype=float32", "distributed.param_dtype=bfloat16"],
     "would cast QLoRA's packed 4-bit weights"),
    (["model.dtype=bfloat16", "distributed.param_dtype=bfloat16"], "is `bfloat16` already"),
])
def test_what_cannot_be_sharded_is_refused_with_a_reason(extra, says):
    recipe = recipe_mod.load(RECIPE, [*BASE, *extra])
    with pytest.raises(UserError, match="cannot train in 2 processes") as err:
        distributed.check(recipe, 2)
    assert says in str(err.value)
    assert distributed.problems(recipe_mod.load(RECIPE, BASE)) == []  # plain full fine-tuning shards


@pytest.mark.parametrize("nproc", [1, 2])
def test_bfloat16_gathers_compute_what_bfloat16_copies_of_the_weights_compute(nproc, tmp_path):
    """`distributed.param_dtype: bfloat16` against one process computing through a bfloat16 cast of each float32
    weight (tests/dist_scripts/mixed_precision.py): one rank is bitwise the reference, 2 AdamW steps; two ranks
    compute the same first loss, then differ by bfloat16 rounding only: each rank's gradient is rounded to bfloat16
    on its own rows before the ranks sum them in float32."""
    import torch
    from safetensors.torch import load_file

    done = torchrun([str(SCRIPTS / "mixed_precision.py"), str(tmp_path)], nproc=nproc)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads((tmp_path / f"losses-{nproc}.json").read_text())
    assert got["gathered_dtype"] == "torch.bfloat16" and got["shard_dtype"] == "torch.float32"
    job, ref = (load_file(tmp_path / f"{who}-{nproc}.safetensors") for who in ("job", "reference"))
    assert job.keys() == ref.keys() and all(t.dtype == torch.float32 for t in job.values())
    if nproc == 1:
        assert got["job"] == got["reference"] and all(torch.equal(job[k], ref[k]) for k in ref)
    else:
        assert got["job"][0] == got["reference"][0]
        assert close(got["job"][1], got["reference"][1], 1e-3) and got["job"][1] != got["reference"][1]


def test_a_skeleton_unlike_rank_0s_model_is_refused_before_anything_is_sent():
    import torch

    loaded, skeleton = torch.nn.Linear(2, 3).double(), torch.nn.Linear(2, 3, device="meta")  # rank 1: float32
    theirs = distributed.tensor_signature(skeleton)
    replies = iter([distributed.digest(theirs), theirs])
    world = distributed.World(rank=0, size=2, local_rank=0, mode="fsdp", device=torch.device("cpu"))
    world.gather = lambda value: [value, next(replies)]  # rank 0's own value, then rank 1's
    with pytest.raises(UserError, match=r"rank 1 built the model .*'weight \(3, 2\) torch.float64 True' against "
                                        r"'weight \(3, 2\) torch.float32 True'.*load_on_rank0: false"):
        world._check_same_modules(loaded)
    same = iter([distributed.digest(distributed.tensor_signature(loaded))])
    world.gather = lambda value: [value, next(same)]
    world._check_same_modules(loaded)  # the same modules pass


def test_nproc_runs_the_same_command_under_torchrun_and_rank_0_alone_speaks(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "memft", "train", RECIPE, *BASE, "train.batch_size=2",
                           f"output.dir={run}", "--nproc", "2"], env=env, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("Plan") == 1 and done.stdout.count("Done:") == 1  # not once per rank
    assert "per rank x 2 ranks (fsdp)" in done.stdout
    lines = records(run)  # written once, not once per rank
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3]
    assert [r["step"] for r in lines if "eval_loss" in r] == [0, 3]


def test_two_nodes_train_what_one_process_trains(sharded_runs, tmp_path):
    """torchrun's multi-node variables, with two launchers on this machine, one node of one process each: rank 1
    is local rank 0 of its node. (`output.dir` must be on a filesystem every node sees, as here.)"""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "two-nodes"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                               f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}", "-m",
                               "memft", "train", RECIPE, *BASE, "train.batch_size=2", f"output.dir={run}"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for node in range(2)]
    try:
        outputs = [node.communicate(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert "Done:" in outputs[0][0] and "Done:" not in outputs[1][0]  # rank 0, on node 0, alone speaks
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2
    want = records(sharded_runs / "full-fsdp")  # the same job on one node, equal to one process (test above)
    got = records(run)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    assert all(close(a["loss"], b["loss"], 1e-10) for a, b in zip(got, want) if "loss" in b)


def rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    """The pid of the job's process with RANK=`rank` (torchrun's workers are children of the launcher)."""
    for child in Path("/proc").iterdir():
        if not child.name.isdigit():
            continue
        try:
            environ = (child / "environ").read_bytes().split(b"\0")
            parent = int((child / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if f"RANK={rank}".encode() in environ and parent == launcher.pid:
            return int(child.name)
    return None


def step_lines(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [r for r in records(run_dir) if "loss" in r] if path.exists() else []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the ranks through /proc")
def test_a_killed_rank_stops_the_job_and_the_run_resumes_on_two_ranks_or_one_to_the_same_result(tmp_path):
    """...and a single process's checkpoint resumes on two ranks to the same result as well."""
    import shutil
    import signal
    import time

    steps = ["train.max_steps=20", "output.save_every=5", "output.keep_last=4", "train.eval_every=null",
             "output.checkpoints=true"]
    reference = single_process(tmp_path / "uninterrupted", steps)
    run = tmp_path / "killed"
    command = [sys.executable, "-m", "memft", "train", RECIPE, *BASE, *steps, "train.batch_size=2",
               f"output.dir={run}", "--nproc", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.monotonic() + 300
    while len(step_lines(run)) < 12 and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    victim = rank_pid(launcher, 1)
    assert victim is not None and launcher.poll() is None, "the job ended before rank 1 could be killed"
    os.kill(victim, signal.SIGKILL)
    out, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 1
    assert "rank 1 was killed by SIGKILL, which stopped the job" in err
    assert "rank 0 lost the other ranks" in err and "Traceback" not in err
    assert (run / "checkpoints" / "step-000010").is_dir()

    # the same command resumes on two ranks; one process resumes with twice the accumulation (the same rows)
    one = tmp_path / "one-process"
    shutil.copytree(run, one)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout
    train_here(one, [*steps, "train.batch_size=2", "train.grad_accum=2"])
    want = {r["step"]: r["loss"] for r in step_lines(reference)}
    for resumed in (run, one):
        got = {r["step"]: r["loss"] for r in step_lines(resumed)}
        assert got.keys() == want.keys()
        assert all(close(got[k], want[k], 1e-10) for k in want), resumed.name

    # the sharded run exports to the model the single-process run exports
    from safetensors.torch import load_file

    from memft.export import export_run
    from memft.train import checkpoint

    assert checkpoint.check(checkpoint.latest(run))["sharded"]
    exported = [load_file(str(export_run(r, tmp_path / f"export-{r.name}") / "model.safetensors"))
                for r in (run, reference)]
    assert exported[0].keys() == exported[1].keys()
    assert all(torch_close(exported[0][k], exported[1][k]) for k in exported[1])

    # a single process's checkpoint goes on in a job of two ranks (each keeps its slices) to the same result
    started = tmp_path / "started-alone"
    shutil.copytree(reference, started)
    for late in sorted((started / "checkpoints").glob("step-*"))[2:]:  # keep steps 5 and 10
        shutil.rmtree(late)
    (started / "summary.json").unlink()
    done = subprocess.run([*command[:-4], "train.batch_size=2", f"output.dir={started}", "--nproc", "2"], env=env,
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout
    written = {p.name: checkpoint.check(p).get("sharded", False) for p in (started / "checkpoints").glob("step-*")}
    assert written["step-000010"] is False and written["step-000020"] is True  # one process's, then the job's
    got = {r["step"]: r["loss"] for r in step_lines(started)}
    assert got.keys() == want.keys() and all(close(got[k], want[k], 1e-10) for k in want)


def torch_close(a, b) -> bool:
    import torch

    return bool(torch.allclose(a, b, rtol=1e-10, atol=1e-12))
