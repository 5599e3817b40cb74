"""Meters report measured numbers: saved-for-backward bytes, peak memory, throughput; and the plot."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from memft.train.meters import (
    SavedTensorMeter,
    StepTimer,
    current_rss_bytes,
    peak_memory,
    reset_peak_memory,
)
from memft.train.plot import plot_metrics

F32 = 4  # bytes per float32 element


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(16)


# --- SavedTensorMeter on cases computed by hand --------------------------------------------------------


def test_mul_saves_the_other_operand():
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(4, 8)
    # d(x*w)/dx = w, so mul keeps w; x is not needed (w needs no grad); sum keeps only a shape.
    with SavedTensorMeter() as meter:
        (x * w).sum()
    assert (meter.bytes, meter.count) == (4 * 8 * F32, 1)

    # Both need grad: both are kept.
    w.requires_grad_(True)
    with SavedTensorMeter() as meter:
        (x * w).sum()
    assert (meter.bytes, meter.count) == (2 * 4 * 8 * F32, 2)

    # `exclude` drops tensors the caller holds anyway.
    with SavedTensorMeter(exclude=[w]) as meter:
        (x * w).sum()
    assert (meter.bytes, meter.count) == (4 * 8 * F32, 1)


def test_linear_saves_its_input_not_its_weight():
    lin = nn.Linear(8, 16)
    x = torch.randn(2, 8, requires_grad=True)
    # addmm keeps the input (for the weight's grad) and weight.t() (for the input's grad); the
    # transpose is a view of the weight's storage, so passing the model excludes it.
    with SavedTensorMeter(lin) as meter:
        lin(x)
    assert (meter.bytes, meter.count) == (2 * 8 * F32, 1)
    with SavedTensorMeter() as meter:  # without the model the weight view is counted
        lin(x)
    assert meter.bytes == 2 * 8 * F32 + 16 * 8 * F32


def test_a_storage_saved_twice_is_counted_once():
    x = torch.randn(3, 5, requires_grad=True)
    with SavedTensorMeter() as meter:
        (x.sin() + x.cos()).sum()  # sin and cos both keep x
    assert (meter.bytes, meter.count) == (3 * 5 * F32, 1)

    big = torch.randn(10, 10, requires_grad=True)
    with SavedTensorMeter() as meter:
        (big[0].sin() + big[1].sin()).sum()  # two views of one storage: the whole storage is held
    assert (meter.bytes, meter.count) == (10 * 10 * F32, 1)


def test_outputs_saved_by_the_op_are_counted():
    x = torch.randn(6, 7, requires_grad=True)
    with SavedTensorMeter() as meter:
        x.exp().sum()  # exp keeps its result: d exp(x) = exp(x)
    assert (meter.bytes, meter.count) == (6 * 7 * F32, 1)


def test_parameters_are_excluded_even_through_views():
    class SaveBoth(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            ctx.save_for_backward(x, w)
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad, None

    model = nn.Linear(8, 8)
    x = torch.randn(3, 8, requires_grad=True)
    with SavedTensorMeter(model) as meter:
        SaveBoth.apply(x, model.weight.view(-1))  # a view, not the Parameter object itself
        SaveBoth.apply(x, model.weight)  # the Parameter
    assert (meter.bytes, meter.count) == (3 * 8 * F32, 1)
    with SavedTensorMeter() as meter:  # a bare Parameter is excluded even without the model
        SaveBoth.apply(x, model.weight)
    assert meter.bytes == 3 * 8 * F32


def test_bitsandbytes_4bit_weight_is_excluded():
    bnb = pytest.importorskip("bitsandbytes")

    class SaveBoth(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            ctx.save_for_backward(x, w)
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad, None

    # Moving the layer to a device is what quantizes its weight into a packed uint8 Params4bit.
    lin = bnb.nn.Linear4bit(64, 32, quant_type="nf4", compute_dtype=torch.float32).to("cpu")
    packed = lin.weight.view(-1)
    assert packed.dtype == torch.uint8
    x = torch.randn(2, 64, requires_grad=True)
    with SavedTensorMeter(lin) as meter:
        SaveBoth.apply(x, packed)
        lin(x)
    assert meter.bytes == 2 * 64 * F32  # x only; the packed 4-bit weight is a parameter


def test_tensors_without_plain_storage():
    dense = torch.randn(2, 3, requires_grad=True)
    sparse = torch.sparse_coo_tensor(
        torch.tensor([[0, 1], [1, 0]]), torch.tensor([1.0, 2.0]), (2, 2), requires_grad=True, check_invariants=True
    )
    with SavedTensorMeter() as meter:
        torch.sparse.mm(sparse, dense).sum()
    # dense (24 B) + the sparse tensor's int64 indices (32 B) and float values (8 B).
    assert meter.bytes == 2 * 3 * F32 + 2 * 2 * 8 + 2 * F32

    meta = torch.randn(4, device="meta", requires_grad=True)
    with SavedTensorMeter() as meter:
        (meta * meta).sum()  # meta tensors hold no memory
    assert meter.bytes == 0


def test_no_grad_saves_nothing_and_numerics_are_unchanged():
    model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 4))
    x = torch.randn(5, 8)
    with torch.no_grad(), SavedTensorMeter(model) as meter:
        model(x)
    assert (meter.bytes, meter.count) == (0, 0)

    model(x).sum().backward()
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with SavedTensorMeter(model) as meter:
        loss = model(x).sum()
    loss.backward()
    assert meter.bytes > 0
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), reference))


# --- activation checkpointing on an 8-layer tiny Llama --------------------------------------------------


def _llama_saved_bytes(checkpointing: str) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).train()
    if checkpointing != "none":
        kwargs = {"use_reentrant": checkpointing == "reentrant"}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    ids = torch.randint(0, 128, (2, 32))
    with SavedTensorMeter(model, exclude=[ids]) as meter:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()  # the graph the meter saw is a working one
    return meter.bytes


def test_checkpointing_is_measured_honestly():
    plain = _llama_saved_bytes("none")
    reentrant = _llama_saved_bytes("reentrant")
    non_reentrant = _llama_saved_bytes("non_reentrant")
    # Measured with torch 2.13 / transformers 5.23: 2,712,324 / 213,764 / 213,764 bytes.
    assert reentrant < plain / 5 and non_reentrant < plain / 5
    # Honest, not zero: both modes really keep each layer's input hidden states
    # (8 layers x batch 2 x seq 32 x hidden 64 x fp32), and the meter sees them in both.
    layer_inputs = 8 * 2 * 32 * 64 * F32
    assert reentrant >= layer_inputs and non_reentrant >= layer_inputs
    assert reentrant == non_reentrant


# --- peak memory and timing -----------------------------------------------------------------------------


def test_peak_memory_cpu_is_positive_and_monotone():
    cpu = torch.device("cpu")
    before = peak_memory(cpu)["peak_mem_bytes"]
    assert before > 0 and current_rss_bytes() > 0
    big = torch.ones(64 * 1024 * 1024 // F32)  # 64 MiB, written so its pages are resident
    rss_with_big = current_rss_bytes()
    during = peak_memory(cpu)["peak_mem_bytes"]
    del big
    after = peak_memory(cpu)["peak_mem_bytes"]
    assert rss_with_big > 64 * 1024 * 1024
    assert before <= during <= after
    assert during >= rss_with_big - 1024 * 1024  # RSS counters are read approximately by the kernel


def test_reset_peak_memory_cpu():
    cpu = torch.device("cpu")
    big = torch.ones(128 * 1024 * 1024 // F32)  # 128 MiB
    high = peak_memory(cpu)["peak_mem_bytes"]
    del big
    reset_peak_memory(cpu)
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("peak RSS cannot be reset here (/proc/self/clear_refs not writable)")
    now = current_rss_bytes()
    after = peak_memory(cpu)["peak_mem_bytes"]
    # the new peak starts from the resident set as it is now, not from the old high
    assert after <= now + 4 * 1024 * 1024
    if now < high - 96 * 1024 * 1024:  # the allocator gave `big` back (it may keep freed pages resident)
        assert after < high - 64 * 1024 * 1024


def test_step_timer_gives_positive_rates():
    timer = StepTimer(torch.device("cpu"))
    timer.start()
    time.sleep(0.02)
    rates = timer.stop(tokens=1000, samples=8)
    assert rates["step_time_s"] >= 0.02
    assert rates["tokens_per_s"] == pytest.approx(1000 / rates["step_time_s"])
    assert rates["samples_per_s"] == pytest.approx(8 / rates["step_time_s"])
    assert 0 < rates["tokens_per_s"] <= 1000 / 0.02
    with pytest.raises(RuntimeError, match="before start"):
        timer.stop(tokens=1, samples=1)


# --- plot -----------------------------------------------------------------------------------------------


def test_plot_metrics_writes_a_png(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    lines = [
        {"step": s, "loss": 3.0 / (1 + 0.1 * s), "lr": 1e-4, "grad_norm": 0.5, "tokens_per_s": 1000.0,
         "samples_per_s": 10.0, "peak_mem_bytes": 100 * 1024**2 + s * 1024**2}
        for s in range(1, 61)
    ]
    lines.insert(25, {"step": 25, "eval_loss": 2.2})
    lines.append({"step": 60, "eval_loss": 1.9})
    metrics.write_text("\n".join(json.dumps(line) for line in lines) + "\n")

    out = plot_metrics(metrics, tmp_path / "plots" / "loss.png", title="quickstart (lora)")
    assert out == tmp_path / "plots" / "loss.png"
    data = Path(out).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1024


def test_the_memory_panel_starts_at_zero_for_a_flat_line_and_a_classifier_plots_its_accuracy(tmp_path):
    from memft.train.plot import memory_limits, plot_series

    flat = [1000.0, 1003.0, 1004.5]  # a 0.45% rise: allocator jitter, not a climb
    assert memory_limits(flat) == (0.0, pytest.approx(1004.5 * 1.05))
    assert memory_limits([100.0, 150.0]) is None  # a real change keeps matplotlib's own zoom
    rows = [{"step": 0, "eval_loss": 0.7, "eval_accuracy": 0.5}, {"step": 1, "loss": 0.69, "peak_mem_bytes": 2**20},
            {"step": 2, "eval_loss": 0.6, "eval_accuracy": 0.75}]
    assert plot_series(rows)["eval accuracy"] == ([0, 2], [0.5, 0.75])
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert plot_metrics(metrics, tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
