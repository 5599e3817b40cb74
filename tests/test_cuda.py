"""The CUDA paths the CPU suite cannot reach: skipped without a GPU (CI has none).

On a GPU machine: `pytest tests/test_cuda.py`. What it checks:
* MEFT's pinned host memory and side-stream copies give the CPU run's loss and gradients;
* every strategy trains on CUDA under bf16 autocast and reports its peak;
* `memft profile`'s predicted peak is within 15% of `torch.cuda.max_memory_allocated` of a real step.
"""

import json

import pytest
import torch
from test_meft import MEFT, REPO, batch_of, build

from memft.recipe import load
from memft.train.loop import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _exact_matmuls():
    """TF32 would round float32 products to 10 mantissa bits and hide real differences."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def meft_gradients(device: str, model: str, cap: int | None):
    meft = MEFT if cap is None else MEFT.replace("topk: 8", f"topk: 8, device_rows: {cap}")
    t = build(model, f"[{meft}]", f"model.device={device}")
    t.model.train()
    s = t.strategies[-1]
    g = torch.Generator().manual_seed(7)
    for h in s.hosts:  # non-zero values, or key and router gradients would be trivially zero
        h.params["values"].copy_(torch.randn(h.params["values"].shape, generator=g) * 0.05)
    out = t._loss({k: v.to(t.device) for k, v in batch_of().items()})
    (out.loss_sum / out.count).backward()
    s.after_backward(0)
    pinned = all(h.params["keys"].is_pinned() and h.params["values"].is_pinned() for h in s.hosts)
    return (out.loss_sum / out.count).item(), s, pinned


@pytest.mark.parametrize("model,cap", [("tiny-llama", None), ("tiny-mixtral", None), ("tiny-llama", 64)])
def test_meft_on_cuda_gives_the_cpu_runs_loss_and_gradients(model, cap):
    cpu_loss, cpu, _ = meft_gradients("cpu", model, cap)
    gpu_loss, gpu, pinned = meft_gradients("cuda", model, cap)
    assert pinned and gpu.copy_stream is not None  # the CUDA path: pinned host state, copies on a side stream
    assert abs(gpu_loss - cpu_loss) <= 1e-5 * abs(cpu_loss)
    for hc, hg in zip(cpu.hosts, gpu.hosts):
        for name in ("keys", "values"):
            want, got = hc.grads[name], hg.grads[name]
            assert want.abs().max() > 0
            assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    for rc, rg in zip(cpu.routers, gpu.routers):
        assert (rg.grad.cpu() - rc.grad).abs().max() <= 1e-4 * rc.grad.abs().max()


STRATEGIES = ["[{name: full}]", "[{name: lora}]", "[{name: qlora}]",
              "[{name: full}, {name: tokentune, params: {fraction: 0.25}}]",
              "[{name: lora}, {name: lcsb, params: {groups: 2}}]", "[{name: full}, {name: revffn}]",
              "[{name: meft, params: {width: 1024, experts: 16, device_rows: 256}}]"]


@pytest.mark.parametrize("strategies", STRATEGIES)
def test_every_strategy_trains_on_cuda_under_bf16_autocast(tmp_path, strategies):
    r = load(REPO / "recipes" / "bench_moe.yaml", [
        f"strategies={strategies}", "train.max_steps=4", "train.batch_size=2", "data.max_length=256",
        "train.eval_every=null", "log.progress=false", "output.plot=false"])
    summary = Trainer(r, run_dir=tmp_path).setup().train()
    assert summary["device"].startswith("cuda")
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert summary["peak_mem_bytes"] > 0


@pytest.mark.parametrize("strategies,extra", [("[{name: full}]", []), ("[{name: lora}]", ["model.dtype=bfloat16"]),
                                              ("[{name: full}]", ["train.gradient_checkpointing=true"])])
def test_the_predicted_peak_is_within_15_percent_of_cuda_max_memory_allocated(strategies, extra):
    from memft.profile import predict

    widths = ("{hidden_size: 1024, intermediate_size: 2816, num_hidden_layers: 4, num_attention_heads: 16, "
              "num_key_value_heads: 8, head_dim: 64, vocab_size: 32000}")
    r = load(REPO / "recipes" / "lora.yaml", ["model.name=tiny-llama", f"model.config_overrides={widths}",
                                              f"strategies={strategies}", "train.batch_size=4",
                                              "data.max_length=1024", *extra])
    p = predict.profile(r, "cuda")
    measured = predict.measure(r)["cuda_peak_bytes"]
    assert abs(p.peak / measured - 1) <= 0.15, (p.peak, measured)
