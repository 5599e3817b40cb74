"""Sharded checkpoints (memft.train.dist_checkpoint): written by 2 ranks under FSDP2, DDP and LoRA, resumed exactly
by 2 ranks, resharded to 3 and 1, by one plain process, and read back for export; a single process's checkpoint
resumed by 2 ranks; damage is found and refused by
every rank at once. The ranks run tests/dist_scripts/dcp_scenarios.py under torchrun (gloo, CPU), four launches in
all, each with a timeout so that a rank waiting forever fails the test instead of blocking it."""

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from memft.errors import UserError
from memft.train import checkpoint, dist_checkpoint

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "dist_scripts" / "dcp_scenarios.py"
_spec = importlib.util.spec_from_file_location("dcp_scenarios", SCRIPT)
scenarios = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scenarios)


def torchrun(nproc: int, *args: str, timeout: float = 240) -> None:
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(port), str(SCRIPT), *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and the ranks it started: their own session
        out, _ = proc.communicate()
        pytest.fail(f"torchrun {' '.join(args)} with {nproc} ranks hung (> {timeout} s):\n{out[-4000:]}")
    assert proc.returncode == 0, f"torchrun {' '.join(args)} with {nproc} ranks failed:\n{out[-6000:]}"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("dcp")
    torchrun(2, "train", str(work))
    # A copy of the FSDP checkpoint that passes `check` but holds a NaN in rank 1's slices of one weight.
    shutil.copytree(work / "fsdp", work / "damaged")
    shard = work / "damaged" / "checkpoints" / "step-000002" / "model" / "shard-00002-model-00001-of-00001.safetensors"
    with safe_open(shard, framework="pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    next(iter(tensors.values())).view(-1)[0] = float("nan")
    save_file(tensors, shard, metadata=header)
    for mode in ("fsdp", "lora"):  # a single process's checkpoints, and what its run did next
        reference = scenarios.whole_reference(work, mode)
        save_file(reference["weights"], work / f"whole-{mode}-reference.safetensors")
        (work / f"whole-{mode}-reference.json").write_text(json.dumps(reference["losses"]))
    torchrun(2, "resume", str(work), "damaged,fsdp,hsdp,ddp,lora,whole-fsdp,whole-hsdp,whole-lora")
    torchrun(3, "resume", str(work), "fsdp,hsdp,lora")
    torchrun(1, "resume", str(work), "fsdp")
    return work


def result(work: Path, name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    out = work / "out"
    return json.loads((out / f"{name}.json").read_text()), load_file(out / f"{name}.safetensors")


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= tol, worst


def step_dir(work: Path, mode: str) -> Path:
    return work / mode / "checkpoints" / "step-000002"


# --- resume ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["fsdp", "hsdp", "ddp", "lora"])
def test_two_rank_resume_is_bitwise_exact(work, mode):
    ref, ref_weights = result(work, f"{mode}-train")
    got, weights = result(work, f"{mode}-resume2")
    assert got["losses"] == ref["losses"]
    assert ref_weights.keys() == weights.keys() and all(torch.equal(ref_weights[k], weights[k]) for k in weights)
    assert got["draws"] == ref["draws"]  # each rank's own torch RNG (they differ) and python's
    assert ref["draws"][0][0] != ref["draws"][1][0]
    assert got["state"] == {"step": 2, "mode": mode}
    assert got["tensors"] == ({"counter": [0.0, 1.0, 2.0]} if mode == "fsdp" else {})


@pytest.mark.parametrize("mode", ["fsdp", "hsdp", "lora"])
def test_resume_in_three_ranks_reshards(work, mode):
    ref, ref_weights = result(work, f"{mode}-train")
    got, weights = result(work, f"{mode}-resume3")
    assert got["losses"] == pytest.approx(ref["losses"], abs=1e-12)
    assert_close(weights, ref_weights, 1e-12)
    # ranks 0 and 1 restore their own torch RNG; rank 2 (no such rank saved) rank 0's
    assert got["draws"] == ref["draws"] + [ref["draws"][0]]


def test_resume_in_one_rank(work):
    ref, ref_weights = result(work, "fsdp-train")
    got, weights = result(work, "fsdp-resume1")
    assert got["losses"] == pytest.approx(ref["losses"], abs=1e-12)
    assert_close(weights, ref_weights, 1e-12)
    assert got["draws"] == ref["draws"][:1]


@pytest.mark.parametrize("mode", ["fsdp", "hsdp", "lora"])
def test_two_ranks_resume_a_single_process_checkpoint(work, mode):
    """Each rank reads the whole files and keeps its slices of the weights and of the AdamW moments."""
    reference = "lora" if mode == "lora" else "fsdp"
    losses = json.loads((work / f"whole-{reference}-reference.json").read_text())
    got, weights = result(work, f"whole-{mode}-resume2")
    assert got["state"] == {"step": 2, "mode": reference}
    assert got["losses"] == pytest.approx(losses, abs=1e-12)
    assert_close(weights, load_file(work / f"whole-{reference}-reference.safetensors"), 1e-12)


@pytest.mark.parametrize("mode", ["fsdp", "ddp", "lora"])
def test_plain_process_resumes_a_sharded_checkpoint(work, mode):
    """No process group: a plain model and a plain AdamW, every rank's rows in one batch."""
    ref, ref_weights = result(work, f"{mode}-train")
    model = scenarios.build(mode)
    opt, sched = scenarios.optimizer_and_scheduler(model)
    state = checkpoint.load(checkpoint.latest(work / mode), model=model, optimizer=opt, scheduler=sched)
    assert state == {"step": 2, "mode": mode}
    assert torch.rand(3, dtype=torch.float64).tolist() == ref["draws"][0][0]  # rank 0's RNG
    losses = scenarios.train(model, opt, sched, scenarios.batches()[2:])
    assert losses == pytest.approx(ref["losses"], abs=1e-10)
    assert_close(scenarios.full_trainable(model), ref_weights, 1e-10)


def test_a_checkpoint_of_another_model_or_optimizer_is_a_user_error(work):
    model = scenarios.build("fsdp")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match="different model/strategy: missing lm_head.weight, model.embed_tokens.weight"):
        checkpoint.load(step_dir(work, "lora"), model=model)
    with pytest.raises(UserError, match="optimizer AdamW but this run uses SGD"):
        checkpoint.load(step_dir(work, "fsdp"), model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing was restored


def test_ddp_names_have_no_module_prefix(work):
    names = set(dist_checkpoint.consolidated_trainable(step_dir(work, "ddp")))
    assert names == set(dist_checkpoint.consolidated_trainable(step_dir(work, "fsdp")))
    assert not any(n.startswith("module.") for n in names)


def test_lora_checkpoint_holds_only_the_adapter(work):
    peft = pytest.importorskip("peft")
    ckpt = step_dir(work, "lora")
    saved = dist_checkpoint.consolidated_trainable(ckpt)
    model = scenarios.build("lora")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(saved) == trainable and all("lora_" in n for n in saved)
    optimizer_keys = json.loads((ckpt / "optimizer.json").read_text())["state"].keys()
    assert set(optimizer_keys) == trainable
    # the adapter/ dir is the whole adapter, in peft's format
    reloaded = peft.PeftModel.from_pretrained(scenarios.build("fsdp"), ckpt / "adapter")
    for name, p in reloaded.named_parameters():
        if "lora_" in name:
            assert torch.equal(p.detach(), saved[name])


# --- collective refusals ---------------------------------------------------------------------------------


def test_nonfinite_shard_on_one_rank_is_refused_by_every_rank(work):
    info, _ = result(work, "fsdp-train")
    assert [r["raised"] for r in info["nonfinite"]] == ["NonFiniteState", "NonFiniteState"]
    assert all("model.embed_tokens.weight" in r["message"] for r in info["nonfinite"])
    assert info["left"] == ["step-000002"]  # nothing written, no .tmp-* left


@pytest.mark.parametrize("where", ["shards", "rng"])
def test_write_failing_on_one_rank_fails_every_rank(work, where):
    """In PyTorch's shard writer (it gathers the error to every rank) or in memft's own per-rank file."""
    info, _ = result(work, "fsdp-train")
    failed = info[f"write_failed_{where}"]
    assert [r["raised"] for r in failed] == ["CheckpointWriteFailed", "CheckpointWriteFailed"]
    assert failed[0]["message"] == failed[1]["message"]
    assert "rank 1: No space left on device" in failed[0]["message"] and "step-000002 is intact" in failed[0]["message"]
    assert "rank 0" not in failed[0]["message"]


def test_damaged_data_is_refused_by_every_rank(work):
    info, _ = result(work, "damaged-resume2")
    assert [r["raised"] for r in info["damaged"]] == ["CheckpointDamaged", "CheckpointDamaged"]
    assert all("non-finite" in r["message"] for r in info["damaged"])
    assert not checkpoint.is_finite(step_dir(work, "damaged"))
    assert checkpoint.is_finite(step_dir(work, "fsdp"))


# --- reading a sharded dir in one process ----------------------------------------------------------------


def test_consolidated_trainable_is_the_whole_state(work):
    _, saved = result(work, "fsdp-saved")
    got = dist_checkpoint.consolidated_trainable(step_dir(work, "fsdp"))
    assert got.keys() == saved.keys() and all(torch.equal(got[k], saved[k]) for k in got)
    with pytest.raises(checkpoint.CheckpointDamaged, match="non-finite"):
        dist_checkpoint.consolidated_trainable(step_dir(work, "damaged"))


def test_layout_and_load_tensors(work):
    ckpt = step_dir(work, "fsdp")
    meta = checkpoint.check(ckpt)
    assert meta["sharded"] is True and meta["world_size"] == 2 and meta["format_version"] == 2
    assert {f.split("/")[0] for f in meta["files"]} >= {"model", "optimizer", "rng", "optimizer.json"}
    assert checkpoint.load_tensors(ckpt)["counter"].tolist() == [0.0, 1.0, 2.0]


def damaged_copies(work: Path, tmp_path: Path):
    """(run dir, what was done) for copies of the FSDP run with one thing broken in its newest step dir, each
    holding an intact older copy too."""
    def shard(d):
        return d / "model" / "shard-00002-model-00001-of-00001.safetensors"

    def truncate(d):
        data = shard(d).read_bytes()
        shard(d).write_bytes(data[: len(data) - 100])

    breaks = {
        "deleted": lambda d: shard(d).unlink(),
        "truncated": truncate,
        "stray": lambda d: shutil.copy(shard(d), d / "model" / "shard-00003-model-00001-of-00001.safetensors"),
        "replaced": lambda d: shutil.copy(d / "model" / "shard-00001-model-00001-of-00001.safetensors", shard(d)),
    }
    for what, brk in breaks.items():
        run = tmp_path / what
        shutil.copytree(work / "fsdp", run)
        shutil.copytree(run / "checkpoints" / "step-000002", run / "checkpoints" / "step-000001")
        brk(run / "checkpoints" / "step-000002")
        yield run, what


def test_check_and_usable_flag_a_damaged_shard(work, tmp_path):
    assert checkpoint.usable(work / "fsdp") == [step_dir(work, "fsdp")]
    for run, what in damaged_copies(work, tmp_path):
        newest = run / "checkpoints" / "step-000002"
        with pytest.raises(checkpoint.CheckpointDamaged) as exc:
            checkpoint.check(newest)
        assert {"deleted": "is missing", "truncated": "is damaged", "stray": "not listed",
                "replaced": "do not hold"}[what] in exc.value.reason, (what, exc.value.reason)
        notes: list[str] = []
        assert checkpoint.latest(run, notes) == run / "checkpoints" / "step-000001", what
        assert len(notes) == 1 and "step-000002" in notes[0]
        with pytest.raises(checkpoint.CheckpointDamaged):
            checkpoint.load(newest, model=scenarios.build("fsdp"))
    shutil.rmtree(run / "checkpoints" / "step-000001")
    with pytest.raises(UserError, match="none can be used"):
        checkpoint.usable(run)


# --- one process, no process group --------------------------------------------------------------------------


class TwoHeads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8).double(), torch.nn.Linear(8, 8).double()

    def forward(self, x, use_b: bool):
        return (self.b(self.a(x)) if use_b else self.a(x)).square().mean()


def test_without_a_process_group_saves_the_optimizer_state_as_it_is(tmp_path):
    """A save before the first step leaves the optimizer stateless (PyTorch's `get_optimizer_state_dict` would
    step it once to create its state), and a parameter never stepped stays without state after a resume."""
    x = torch.randn(4, 8, dtype=torch.float64)
    plan = [False, True, True]  # step 1 trains `a` only, so `b` has no AdamW state in the step-1 checkpoint

    def fresh():
        torch.manual_seed(0)
        model = TwoHeads()
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    def step(model, opt, use_b):
        model(x, use_b).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    model, opt = fresh()
    dist_checkpoint.save(tmp_path, 0, model=model, optimizer=opt, state={"step": 0}, keep_last=3)
    assert not opt.state
    step(model, opt, plan[0])
    dist_checkpoint.save(tmp_path, 1, model=model, optimizer=opt, state={"step": 1}, keep_last=3)
    for use_b in plan[1:]:
        step(model, opt, use_b)
    for done, stepped in ((0, 0), (1, 2)):
        again, opt2 = fresh()
        ckpt = tmp_path / "checkpoints" / checkpoint.step_dir_name(done)
        assert checkpoint.load(ckpt, model=again, optimizer=opt2) == {"step": done}
        assert len(opt2.state) == stepped
        for use_b in plan[done:]:
            step(again, opt2, use_b)
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))
    assert [p.name for p in checkpoint.usable(tmp_path)] == ["step-000001", "step-000000"]


def test_module_loads_no_pickles():
    source = Path(dist_checkpoint.__file__).read_text()
    assert "torch.load(" not in source and "FileSystemReader" not in source and "pickle" not in source.lower()
