"""`distributed.param_dtype: bfloat16` against its naive reference (tests/test_distributed.py), under torchrun.

The reference is one plain process whose float32 weights are used through a cast: every parameter is registered
with a bfloat16 parametrization (`torch.nn.utils.parametrize`), so the forward computes with bfloat16 copies and
autograd carries each weight's bfloat16 gradient back through the cast to float32. memft's sharded model is built
by `World.shard` as a run builds it, from the same seeded float32 weights. Both take 2 AdamW steps on the same
rows; rank 0 writes each step's loss and the whole float32 weights after, for reference and job, to argv[1].
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize

from memft import recipe as recipe_mod
from memft.train.distributed import World

VOCAB, ROWS, SEQ = 128, 4, 8


class ToBfloat16(nn.Module):
    def forward(self, weight):
        return weight.to(torch.bfloat16)


def build() -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def train(model, rows_of, ranks: int) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(1234)
    losses = []
    for _ in range(2):
        ids = torch.randint(0, VOCAB, (ROWS, SEQ), generator=g)
        rows = rows_of(ids)
        logits = model(input_ids=rows).logits.float()
        # each rank's sum over the job's targets, times the ranks (FSDP averages): one process's mean
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), rows[:, 1:].reshape(-1),
                                           reduction="sum") / (ids.size(0) * (SEQ - 1)) * ranks
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        total = loss.detach().clone() / ranks
        if ranks > 1:
            dist.all_reduce(total)
        losses.append(total.item())
    return losses


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    recipe = recipe_mod.load(str(Path(__file__).parents[2] / "recipes" / "quickstart.yaml"),
                             ["model.dtype=float32", "distributed.param_dtype=bfloat16"])
    world = World(rank=rank, size=size, local_rank=rank, mode="fsdp", device=torch.device("cpu"))
    sharded = world.shard(build(), recipe)
    gathered = []  # the dtype each layer's weight has inside its forward
    sharded.model.layers[0].mlp.register_forward_pre_hook(lambda m, a: gathered.append(m.up_proj.weight.dtype))
    job = train(sharded, lambda ids: ids.chunk(size)[rank], size)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    job_weights = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        reference_model = build()
        for module in list(reference_model.modules()):
            for name, p in list(module.named_parameters(recurse=False)):
                parametrize.register_parametrization(module, name, ToBfloat16(), unsafe=True)
        reference = train(reference_model, lambda ids: ids, 1)
        ref_weights = {n.replace(".parametrizations", "").replace(".original", ""): p.detach()
                       for n, p in reference_model.named_parameters()}
        save_file({k: v.contiguous() for k, v in job_weights.items()}, out / f"job-{size}.safetensors")
        save_file({k: v.contiguous() for k, v in ref_weights.items()}, out / f"reference-{size}.safetensors")
        (out / f"losses-{size}.json").write_text(json.dumps({
            "job": job, "reference": reference, "gathered_dtype": str(gathered[0]),
            "shard_dtype": str(next(sharded.parameters()).dtype)}))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
