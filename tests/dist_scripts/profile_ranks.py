"""What each rank of a torchrun job really holds in training (tests/test_profile_gpus.py), for several recipes in one
job (the process group and the imports are paid once).

argv[1]: a JSON list of {"name", "recipe", "overrides", "dir", "track"}; argv[2]: rank r writes its JSON list of
records to `<argv[2]>.<r>.json`. Each recipe is set up by `Trainer` as `memft train` does (its model sharded by
`World.shard`, its optimizer over the shards) and takes one optimizer step (`Trainer._optimizer_step`) on a
full-length synthetic global micro-batch (`train.batch_size` rows per rank). In a step post-hook of the optimizer,
after its step and before `zero_grad` frees the gradients, it records the bytes of the parameters' local shards, of
the gradients' local shards and of the optimizer state, each storage once (the gradient shards of one FSDP unit are
views of one reduce-scatter output). With "track", a second step runs under torch's `FSDPMemTracker` (every
tensor's storage, by category) and its peak is recorded as well.
"""

import json
import sys

import torch

from memft import recipe as recipe_mod
from memft.profile.predict import synthetic_batch
from memft.train.loop import Trainer


def storage_bytes(tensors) -> dict[str, int]:
    """Bytes of the tensors' (local shards') storages by device type, each storage once."""
    seen = {}
    for t in tensors:
        s = (t.to_local() if hasattr(t, "to_local") else t).untyped_storage()
        seen[(s.device.type, s.data_ptr(), s.nbytes())] = (s.device.type, s.nbytes())
    out: dict[str, int] = {}
    for device, n in seen.values():
        out[device] = out.get(device, 0) + n
    return out


def step(trainer: Trainer, seed: int) -> None:
    r = trainer.recipe
    rows = r.train.batch_size * trainer.world.size  # the global micro-batch; each rank keeps its own rows
    batch = synthetic_batch(r, trainer.model.config.vocab_size, rows, r.data.max_length,
                            torch.Generator().manual_seed(seed))
    trainer._optimizer_step([trainer._on_step_start(batch) for _ in range(r.train.grad_accum)])


def tracked_peak(trainer: Trainer) -> dict | None:
    """The peak of one more step by `FSDPMemTracker` (a private torch tool: None where it is missing)."""
    try:
        from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    except ImportError:
        return None
    tracker = FSDPMemTracker(trainer.model, trainer.optimizer)
    with tracker:
        step(trainer, seed=1)
    return {str(device): parts for device, parts in tracker.get_tracker_snapshot("peak").items()}


records, rank = [], None
for case in json.loads(sys.argv[1]):
    trainer = Trainer(recipe_mod.load(case["recipe"], case["overrides"]), run_dir=case["dir"])
    trainer.setup()
    rank = trainer.world.rank
    held = {}

    def read(optimizer, args, kwargs, trainer=trainer, held=held):
        params = list(trainer.model.parameters())
        held["params"] = storage_bytes(params)
        held["gradients"] = storage_bytes(p.grad for p in params if p.grad is not None)
        held["optimizer_state"] = storage_bytes(v for state in optimizer.state.values() for v in state.values()
                                                if torch.is_tensor(v))

    hook = trainer.optimizer.register_step_post_hook(read)
    step(trainer, seed=0)
    hook.remove()
    record = {"name": case["name"], "rank": rank, **held}
    if case.get("track"):
        record["peak"] = tracked_peak(trainer)
    records.append(record)

with open(f"{sys.argv[2]}.{rank}.json", "w") as f:
    json.dump(records, f)
