"""Several processes, one per device, launched by torchrun: the same recipe, with PyTorch's FSDP2.

`memft train RECIPE --nproc N` re-launches itself as `torchrun --nproc_per_node N -m memft train RECIPE`; torchrun
(one node or several, through its usual variables) starts one process per device, and `join()` turns its
environment into a `World`. Each process then trains the same model with its weights managed by `fully_shard`
(`torch.distributed.fsdp`), one unit per decoder layer and one for the rest:

- `distributed.mode: fsdp` shards parameters, gradients and optimizer state over the ranks (about 1/N each);
  a layer's weights are all-gathered for its forward and backward and freed again after.
- `distributed.mode: ddp` keeps every weight whole on every rank and all-reduces the gradients: DDP's
  semantics, through the same engine (a mesh whose shard dimension has size 1), so both modes share the
  checkpoints, the state dicts and the loop.

Exactness: every rank reads the same global micro-batch of `train.batch_size x world size` rows (the batcher's
seeded order), lets the strategies draw on it whole (TokenTune's tokens per sequence, LCSB's group per step: the
same draws as one process would make) and then keeps its own rows. The loss is each rank's sum over the global
count of targets, so the gradients FSDP averages over the ranks are those of one process taking the whole
micro-batch (tests/test_distributed.py: float64, 1e-10).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from memft.errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from memft.recipe import Recipe

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
"""What torchrun sets for every process it starts."""


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting its variables)."""
    return all(v in os.environ for v in LAUNCH_VARIABLES)


def problems(recipe: Recipe) -> list[str]:
    """Why `recipe` cannot train in several processes, one sentence each (empty: it can)."""
    t, names = recipe.train, {s.name for s in recipe.strategies}
    mode = recipe.distributed.mode
    out = []
    if "revffn" in names:
        out.append("`revffn` rebuilds each layer's input inside one autograd function that spans the whole layer "
                   "stack, where FSDP's per-layer gathers and gradient reductions cannot run; train it in one "
                   "process, or use `full` with `train.gradient_checkpointing: true` across several")
    if "meft" in names:
        out.append("`meft` keeps its adapter and that adapter's optimizer in this process's host memory, outside "
                   "the model FSDP shards, so each rank would step its own copy; train it in one process")
    if t.optimizer_in_backward:
        out.append("`train.optimizer_in_backward` steps each weight inside backward, before FSDP has reduced its "
                   "gradient over the ranks; set it to false (sharding already spreads the gradients and optimizer "
                   "state over the ranks)")
    if t.optimizer_state == "host":
        out.append("`train.optimizer_state: host` steps memft's own host copies, which FSDP's shards bypass; use "
                   "`distributed.cpu_offload: true` (FSDP keeps parameters, gradients and optimizer state in host "
                   "memory and steps there) instead")
    if t.autocast == "fp16":
        out.append("`train.autocast: fp16` needs a loss scaler that agrees over the ranks whether a gradient "
                   "overflowed, which memft does not have yet; use `train.autocast: bf16`")
    if recipe.eval is not None:
        out.append("`eval:` scores the trained model at the end in one process; leave it out and run `memft eval "
                   "RUN_DIR ...` on the finished run instead")
    if recipe.distributed.param_dtype == "bfloat16" and "qlora" in names:
        out.append("`distributed.param_dtype: bfloat16` would cast QLoRA's packed 4-bit weights as it gathers them; "
                   "leave it at `model` (the LoRA adapters compute under `train.autocast: bf16` all the same)")
    if recipe.distributed.param_dtype == "bfloat16" and recipe.model.dtype not in ("float32", "float64"):
        out.append(f"`distributed.param_dtype: bfloat16` computes with bfloat16 copies of higher-precision weights, "
                   f"but `model.dtype` is `{recipe.model.dtype}` already; leave it at `model`")
    if mode == "fsdp" and t.optimizer == "adamw_8bit":
        out.append("`train.optimizer: adamw_8bit` (bitsandbytes) steps whole tensors, not FSDP's shards; use "
                   "`train.optimizer: adamw` (its state is sharded over the ranks already) or `distributed.mode: ddp`")
    if mode == "fsdp" and t.precision == "bf16_stochastic_rounding":
        out.append("`train.precision: bf16_stochastic_rounding` draws its rounding noise per whole tensor, which "
                   "FSDP's shards would not reproduce; use `train.precision: model` or `distributed.mode: ddp`")
    return out


def check(recipe: Recipe, world_size: int) -> None:
    """Refuse, in one message, a recipe that cannot train in a torchrun job of `world_size` processes (one too:
    FSDP shards it all the same)."""
    found = problems(recipe)
    if found:
        job = f"{world_size} processes" if world_size > 1 else "a torchrun job"
        raise UserError(f"this recipe cannot train in {job}: " + "; ".join(found))


@dataclass
class World:
    """This process's place among the ranks of a torchrun job, and the collectives the loop needs."""

    rank: int
    size: int
    local_rank: int
    mode: str
    """`fsdp` or `ddp` (see the module docstring)."""
    device: torch.device

    @property
    def main(self) -> bool:
        """Rank 0: the one process that logs, writes the run's files and draws progress."""
        return self.rank == 0

    def rows(self, batch: dict) -> tuple[dict, bool]:
        """This rank's rows of a global micro-batch, and whether they are real. Rank r keeps rows r*k ... where
        k = ceil(rows / size); a rank left without rows (a short last batch) gets the first row as a stand-in
        whose loss the caller multiplies by zero: every rank must run the same forwards and backwards."""
        n = next(iter(batch.values())).size(0)
        per = -(-n // self.size)
        start = self.rank * per
        real = start < n
        picked = slice(start, min(start + per, n)) if real else slice(0, 1)
        return {k: v[picked] for k, v in batch.items()}, real

    def sum(self, *values: float) -> list[float]:
        """Each value summed over the ranks."""
        return self._reduce(values, "SUM")

    def max(self, *values: float) -> list[float]:
        """Each value's largest over the ranks."""
        return self._reduce(values, "MAX")

    def _reduce(self, values: tuple[float, ...], op: str) -> list[float]:
        """All-reduce `values` as float64 on this rank's device (NCCL reduces on the GPU, gloo on the host)."""
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
        return t.tolist()

    def gather(self, record: dict) -> list[dict]:
        """Every rank's `record` (small, JSON-like), in rank order, on every rank."""
        import torch.distributed as dist

        out = [None] * self.size
        dist.all_gather_object(out, record)
        return out

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def loads_from_rank0(self, recipe: Recipe, quantized: bool, notes: list[str]) -> bool:
        """Whether rank 0 alone reads the weights and sends the other ranks theirs (`shard(from_rank0=True)`); when
        not, every rank loads the whole model and rank 0 notes why."""
        why = every_rank_loads(recipe, quantized, self.device)
        if why is not None and self.main:
            notes.append(f"model: every rank loads the weights into host memory, because {why}")
        return why is None

    def shard(self, model: nn.Module, recipe: Recipe, *, from_rank0: bool = False) -> nn.Module:
        """`fully_shard` each decoder layer, then the model (its embeddings, final norm and head, tied or not, in
        the root unit). In place; the optimizer must be built after, over the sharded parameters.

        `from_rank0`: rank 0 holds the loaded model and every other rank the same modules on the meta device
        (`memft.models.load.skeleton_model`). As each unit is sharded, the others give it storage and rank 0
        broadcasts its weights one tensor at a time, of which every rank keeps its slice; rank 0 then drops its whole
        copy of them, so its host memory holds the model once, not the model and its shards. The ranks start from
        rank 0's weights exactly (its random LoRA init too)."""
        import torch
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        from memft.models.blocks import layer_stack

        cfg = recipe.distributed
        if from_rank0:
            self._check_same_modules(model)
        # rank 0's tensors, by name, before sharding replaces them (sending drops each: then it is freed)
        whole = dict([*model.named_parameters(), *model.named_buffers()]) if from_rank0 and self.main else {}
        prefix, sent = {id(m): f"{n}." for n, m in model.named_modules()}, set()
        if self.mode == "ddp":  # every weight whole on every rank, gradients all-reduced over the ranks
            mesh = init_device_mesh(self.device.type, (self.size, 1), mesh_dim_names=("replicate", "shard"))
        else:
            mesh = init_device_mesh(self.device.type, (self.size,), mesh_dim_names=("shard",))
        # pinned host memory needs a GPU; on a CPU-only job the shards simply stay in host memory
        offload = CPUOffloadPolicy(pin_memory=self.device.type == "cuda") if cfg.cpu_offload else OffloadPolicy()
        # bfloat16 gathers: each layer computes with bfloat16 copies; gradients are summed over the ranks in the
        # shards' own precision (float32, or float64)
        reduce = torch.float64 if recipe.model.dtype == "float64" else torch.float32
        precision = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=reduce)
                     if cfg.param_dtype == "bfloat16" else MixedPrecisionPolicy())
        kwargs = {"mesh": mesh, "reshard_after_forward": cfg.reshard_after_forward, "offload_policy": offload,
                  "mp_policy": precision}
        for layer in layer_stack(model):
            fully_shard(layer, **kwargs)
            if from_rank0:
                self._send_from_rank0(layer, prefix[id(layer)], whole, sent)
        fully_shard(model, **kwargs)
        if from_rank0:  # the root unit's weights (embeddings, norm, head) and the buffers left
            self._send_from_rank0(model, "", whole, sent)
        return model

    def _check_same_modules(self, model: nn.Module) -> None:
        """Refuse before any weight is sent when a rank's skeleton differs from rank 0's loaded model (a name, shape,
        dtype or trainability): rank 0 could not fill it, or would fill it converted."""
        mine = tensor_signature(model)
        digests = self.gather(digest(mine))
        odd = [r for r, d in enumerate(digests) if d != digests[0]]
        if odd:
            first = self.gather(mine if self.rank in (0, odd[0]) else None)
            diff = next((f"{a!r} against {b!r}" for a, b in zip(first[0], first[odd[0]]) if a != b),
                        f"{len(first[0])} against {len(first[odd[0]])} tensors")
            raise UserError(f"rank {odd[0]} built the model (on the meta device) unlike rank 0 loaded it ({diff}), so "
                            "rank 0 cannot send it the weights; set `distributed.load_on_rank0: false`")

    def _send_from_rank0(self, module: nn.Module, prefix: str, whole: dict, sent: set[str]) -> None:
        """Give `module`'s tensors still on the meta device storage on this rank, then fill each of its tensors not
        in `sent` with rank 0's values (rank 0's whole copies, by name, in `whole`, dropped once sent): every rank
        keeps its slice of a sharded parameter (rank 0's shards hold it already) and the whole of a buffer."""
        import torch
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor, distribute_tensor

        for m in module.modules():  # FSDP's parameters keep their identity (and ties) through `to_empty`
            if any(t.device.type == "meta" for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]):
                m.to_empty(device=self.device, recurse=False)
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            name = prefix + name
            if name in sent:
                continue
            sent.add(name)
            if self.main:
                full = whole.pop(name).detach().to(self.device)
            else:
                full = torch.empty(t.shape, dtype=t.dtype, device=self.device)
            dist.broadcast(full, src=0)
            if self.main:
                continue
            with torch.no_grad():
                if isinstance(t, DTensor):
                    t.to_local().copy_(distribute_tensor(full, t.device_mesh, t.placements, src_data_rank=None)
                                       .to_local())
                else:
                    t.copy_(full)

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def tensor_signature(model: nn.Module) -> list[str]:
    """Every parameter's and buffer's name, shape, dtype and trainability, one line each."""
    return [f"{n} {tuple(t.shape)} {t.dtype} {getattr(t, 'requires_grad', False)}"
            for n, t in [*model.named_parameters(), *model.named_buffers()]]


def digest(lines: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def every_rank_loads(recipe: Recipe, quantized: bool, device: torch.device) -> str | None:
    """Why each rank of a job must read the weights itself (None: rank 0 alone reads them, `World.shard`)."""
    if not recipe.distributed.load_on_rank0:
        return "`distributed.load_on_rank0` is false"
    if quantized:
        return "bitsandbytes quantizes the 4-bit weights as it loads them"
    if recipe.model.upcycle is not None:
        return "`model.upcycle` builds the experts from the loaded dense weights"
    if recipe.distributed.cpu_offload and device.type == "cuda":
        return "`distributed.cpu_offload` on GPUs keeps the shards in host memory, where NCCL's broadcast cannot write"
    return None


def lost_rank(exc: BaseException) -> bool:
    """Whether `exc` is a collective that failed because another rank is gone or stuck (killed, crashed, past
    `distributed.timeout_s`): NCCL raises `DistError`s, gloo a RuntimeError naming its transport."""
    import torch.distributed as dist

    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    # gloo's transport: a peer gone ("Connection reset/closed"), past the timeout ("Timed out"), or a pair the
    # timeout already closed, which the next collective meets ("caused pair closure")
    return isinstance(exc, RuntimeError) and any(s in text for s in (
        "gloo", "Connection reset", "Connection closed", "Timed out", "timed out", "caused pair closure",
        "Pair is not connected", "Socket closed"))


def state_bytes(model: nn.Module, optimizer) -> dict[str, int]:
    """What this rank itself stores of the weights and the optimizer state: its shards' bytes (a DTensor's local
    tensor), each storage once. FSDP divides both by about the world size; `ddp` keeps them whole."""
    import torch

    seen: set = set()

    def local(tensors) -> int:
        total = 0
        for t in tensors:
            t = t.to_local() if hasattr(t, "to_local") else t
            key = (t.untyped_storage().data_ptr(), t.device)
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
        return total

    moments = [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return {"weight_bytes": local(model.parameters()), "optimizer_state_bytes": local(moments)}


def join(recipe: Recipe, device: torch.device) -> World | None:
    """Start this process's part of a torchrun job (None when not launched by one). `device`: what
    `model.device` resolved to; on CUDA each process takes the GPU of its local rank."""
    if not launched():
        return None
    import torch
    import torch.distributed as dist

    rank, size, local = (int(os.environ[v]) for v in LAUNCH_VARIABLES)
    check(recipe, size)
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise UserError(f"this node runs {os.environ.get('LOCAL_WORLD_SIZE', local + 1)} processes but sees "
                            f"{torch.cuda.device_count()} GPU(s); lower `--nproc` (torchrun's `--nproc_per_node`)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=recipe.distributed.timeout_s)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout,
                                **({"device_id": device} if device.type == "cuda" else {}))
    return World(rank=rank, size=size, local_rank=local, mode=recipe.distributed.mode, device=device)
