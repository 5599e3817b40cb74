"""Scenarios for tests/test_dist_checkpoint.py, run by torchrun (gloo, CPU): `train` saves, `resume` loads.

    torchrun --nproc_per_node N tests/dist_scripts/dcp_scenarios.py train|resume WORK_DIR [MODE,MODE,...]

`train` (2 ranks), for each wrapping in MODES: build the tiny float64 Llama, wrap it, train 2 steps, save; check that a
non-finite shard on one rank and a write failing on one rank make every rank raise (nothing written); then draw from
the RNGs and train 2 more steps, recording what a resume must reproduce. `resume` (any number of ranks): with
`damaged` among the modes, refuse a damaged checkpoint on every rank; then load each mode's checkpoint, draw and
train the same 2 steps; `whole-MODE` loads a single process's checkpoint (`whole_reference`) instead. Rank 0 writes `WORK_DIR/out/<mode>-<phase>.{json,safetensors}` (losses, draws, flags; the
whole trainable weights after training).
The same helpers build the single-process reference in the test itself (`build`, `batches`, `train`).
"""

from __future__ import annotations

import json
import os
import random
import sys
import types
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

MODES = ("fsdp", "hsdp", "ddp", "lora")
"""`fsdp`: fully_shard per decoder layer, then the model. `hsdp`: the same over a (ranks, 1) mesh, memft's
`distributed.mode: ddp`. `ddp`: torch's DistributedDataParallel. `lora`: peft LoRA on a frozen base, under fsdp."""
ROWS, SEQ, VOCAB = 6, 8, 128  # 6 rows split evenly over 1, 2 or 3 ranks


def build(mode: str) -> nn.Module:
    """The same model on every rank and in every process (seeded), in float64, not yet wrapped."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float64)
    for module in model.modules():  # transformers' RMSNorm computes in float32 even in a float64 model
        if type(module).__name__ == "LlamaRMSNorm":
            module.forward = types.MethodType(_rms_norm_in_float64, module)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    return model


def _rms_norm_in_float64(self, x: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm in the input's dtype: with it the model is float64 throughout, so one process taking all the
    rows and N ranks taking their share agree to rounding (1e-12), not to float32's 1e-7."""
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def wrap(model: nn.Module, mode: str) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    world = dist.get_world_size()
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    if mode == "hsdp":
        mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("shard",))
    layers = model.base_model.model.model.layers if mode == "lora" else model.model.layers
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def optimizer_and_scheduler(model: nn.Module):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 3))
    return opt, sched


def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, VOCAB, (ROWS, SEQ), generator=g) for _ in range(4)]


def train(model, opt, sched, steps: list[torch.Tensor], rank: int = 0, world: int = 1) -> list[float]:
    """One optimizer step per global batch; each rank takes its rows. Every rank has as many targets, so the
    ranks' mean losses averaged (FSDP and DDP average gradients) are the loss of one process taking them all."""
    losses = []
    for ids in steps:
        rows = ids.chunk(world)[rank]
        logits = model(input_ids=rows).logits  # the loss in float64 (transformers' own casts logits to float32)
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), rows[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        total = loss.detach().clone()
        if world > 1:
            dist.all_reduce(total)
        losses.append(total.item() / world)
    return losses


def full_trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter, whole, by the unwrapped name (collective under FSDP)."""
    from torch.distributed.tensor import DTensor

    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for name, p in inner.named_parameters() if p.requires_grad}


def draws() -> list:
    """What each rank's RNGs give next, gathered to every rank: torch per rank, python the same."""
    mine = [torch.rand(3, dtype=torch.float64).tolist(), random.random()]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out


def record(out: Path, name: str, rank: int, info: dict, weights: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps(info))
        save_file({k: v.contiguous() for k, v in weights.items()}, out / f"{name}.safetensors")


def raises_everywhere(fn, kind) -> dict:
    try:
        fn()
    except kind as exc:
        return {"raised": type(exc).__name__, "message": str(exc)}
    except Exception as exc:  # noqa: BLE001 - reported to the test, which expects `kind`
        return {"raised": type(exc).__name__, "message": str(exc)}
    return {"raised": None}


def phase_train(work: Path, rank: int, world: int) -> None:
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    from memft.train import checkpoint, dist_checkpoint

    data = batches()
    for mode in MODES:
        run_dir = work / mode
        model = wrap(build(mode), mode)
        opt, sched = optimizer_and_scheduler(model)
        train(model, opt, sched, data[:2], rank, world)
        torch.manual_seed(100 + rank)  # a different torch RNG per rank: the resume must restore each one's
        random.seed(7)
        tensors = {"counter": torch.arange(3, dtype=torch.float64)} if mode == "fsdp" else None
        dist_checkpoint.save(run_dir, 2, model=model, optimizer=opt, scheduler=sched, state={"step": 2, "mode": mode},
                             keep_last=2, tensors=tensors)
        saved = full_trainable(model)
        info: dict = {"world_size": world}

        if mode == "fsdp":
            # A NaN in rank 1's shard only: every rank raises, nothing is written, nobody hangs.
            rng = torch.get_rng_state(), random.getstate()
            p = next(p for p in model.parameters() if p.requires_grad)
            local = p.to_local()
            keep = local.view(-1)[0].item()
            with torch.no_grad():
                if rank == 1:
                    local.view(-1)[0] = float("nan")
            info["nonfinite"] = _gathered(raises_everywhere(lambda: dist_checkpoint.save(
                run_dir, 3, model=model, optimizer=opt, scheduler=sched, state={}, keep_last=2),
                checkpoint.NonFiniteState))
            with torch.no_grad():
                local.view(-1)[0] = keep
            # A write failing on rank 1 only (a full disk), in PyTorch's shard writer and in memft's own RNG file:
            # every rank raises, the partial dir is removed.
            def full_disk(*args, **kwargs):
                raise OSError(28, "No space left on device")

            for where, owner, attr in (("shards", HuggingFaceStorageWriter, "write_data"),
                                       ("rng", dist_checkpoint, "save_file")):
                real = getattr(owner, attr)
                if rank == 1:
                    setattr(owner, attr, full_disk)
                info[f"write_failed_{where}"] = _gathered(raises_everywhere(lambda: dist_checkpoint.save(
                    run_dir, 3, model=model, optimizer=opt, scheduler=sched, state={}, keep_last=2),
                    checkpoint.CheckpointWriteFailed))
                setattr(owner, attr, real)
            info["left"] = sorted(path.name for path in (run_dir / "checkpoints").iterdir())
            torch.set_rng_state(rng[0])
            random.setstate(rng[1])

        info["draws"] = draws()
        info["losses"] = train(model, opt, sched, data[2:], rank, world)
        record(work / "out", f"{mode}-saved", rank, {}, saved)
        record(work / "out", f"{mode}-train", rank, info, full_trainable(model))
        dist.barrier()


def _gathered(value):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def phase_resume(work: Path, rank: int, world: int, modes: list[str]) -> None:
    from memft.train import checkpoint

    data = batches()
    if "damaged" in modes:
        # A checkpoint that passes `check` but holds a NaN in one rank's slices (the test wrote it): all ranks refuse.
        model = wrap(build("fsdp"), "fsdp")
        opt, sched = optimizer_and_scheduler(model)
        info = {"damaged": _gathered(raises_everywhere(
            lambda: checkpoint.load(work / "damaged" / "checkpoints" / "step-000002", model=model, optimizer=opt,
                                    scheduler=sched), checkpoint.CheckpointDamaged))}
        record(work / "out", f"damaged-resume{world}", rank, info, {})
    for name in [m for m in modes if m.removeprefix("whole-") in MODES]:
        # `whole-MODE`: a single process's checkpoint (`whole_reference` wrote it) resumed by the wrapped ranks
        mode = name.removeprefix("whole-")
        model = wrap(build(mode), mode)
        opt, sched = optimizer_and_scheduler(model)
        ckpt = checkpoint.latest(work / (("whole-lora" if mode == "lora" else "whole") if name != mode else mode))
        state = checkpoint.load(ckpt, model=model, optimizer=opt, scheduler=sched)
        info = {"state": state, "tensors": {k: v.tolist() for k, v in checkpoint.load_tensors(ckpt).items()},
                "draws": draws(), "losses": train(model, opt, sched, data[2:], rank, world)}
        record(work / "out", f"{name}-resume{world}", rank, info, full_trainable(model))
        dist.barrier()


def whole_reference(work: Path, mode: str) -> dict:
    """One plain process trains 2 steps, saves a single-process checkpoint in `work/whole[-lora]`, and trains the
    2 steps a resume must reproduce: their losses and the whole weights after."""
    from memft.train import checkpoint

    model = build(mode)
    opt, sched = optimizer_and_scheduler(model)
    data = batches()
    train(model, opt, sched, data[:2])
    checkpoint.save(work / ("whole-lora" if mode == "lora" else "whole"), 2, model=model, optimizer=opt,
                    scheduler=sched, state={"step": 2, "mode": mode}, keep_last=1)
    return {"losses": train(model, opt, sched, data[2:]), "weights": full_trainable(model)}


def main() -> None:
    phase, work = sys.argv[1], Path(sys.argv[2])
    modes = sys.argv[3].split(",") if len(sys.argv) > 3 else list(MODES)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    try:
        if phase == "train":
            phase_train(work, rank, world)
        else:
            phase_resume(work, rank, world, modes)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
