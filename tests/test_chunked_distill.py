"""The two losses that used to form full logits, now chunked (`memft/train/chunked_loss.py`): RevFFN's distillation
KL and TokenTune's selected-rows cross-entropy. Each equals the full-logits formula (float64, 1e-10) and keeps no
rows x vocabulary tensor for backward."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_revffn import build, padded_batch
from torch import nn

from memft.recipe import load
from memft.registry import at_least_float32
from memft.strategies.revffn import distill as revffn_distill
from memft.strategies.tokentune import POSITIONS_KEY
from memft.strategies.tokentune import rows as tokentune_rows
from memft.train import chunked_loss
from memft.train.chunked_loss import linear_kl_divergence
from memft.train.loop import Trainer
from memft.train.meters import SavedTensorMeter

REPO = Path(__file__).resolve().parents[1]


def naive_distill(student_hidden, student_head, teacher_hidden, teacher_head, mask, t):
    """RevFFN's full-logits formula: t^2 KL(teacher || student) at temperature t, summed over the masked rows."""
    with torch.no_grad():
        teacher = F.log_softmax(at_least_float32(teacher_head(teacher_hidden)) / t, dim=-1)
    student = F.log_softmax(at_least_float32(student_head(student_hidden)) / t, dim=-1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1) * (t * t)
    return kl[mask].sum()


def random_head(width, vocab, bias, dtype, g):
    head = nn.Linear(width, vocab, bias=bias).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g, dtype=dtype))
        if bias:
            head.bias.copy_(torch.randn(vocab, generator=g, dtype=dtype))
    return head


def distill_case(dtype, bias, vocab=37, width=16):
    g = torch.Generator().manual_seed(0)
    student, teacher = random_head(width, vocab, bias, dtype, g), random_head(width, vocab, bias, dtype, g)
    teacher.requires_grad_(False)
    hidden = torch.randn(2, 7, width, generator=g, dtype=dtype).requires_grad_()
    teacher_hidden = torch.randn(2, 7, width, generator=g, dtype=dtype)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, -2:] = False  # padding
    mask[1, -4:] = False
    return hidden, student, teacher_hidden, teacher, mask


@pytest.fixture
def rows_per_chunk(monkeypatch):
    """Set the chunk byte budget to n rows of float32 logits, so that the loss runs several chunks."""
    def rows(n, vocab):
        monkeypatch.setattr(chunked_loss, "CHUNK_BYTES", n * 4 * vocab)
        assert chunked_loss.chunk_tokens(vocab) == n
    return rows


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_distillation_and_gradients_equal_the_full_logits_formula(rows_per_chunk, dtype, tol, bias, temperature):
    rows_per_chunk(3, 37)  # 8 masked rows: chunks of 3, 3, 2
    hidden, student, teacher_hidden, teacher, mask = distill_case(dtype, bias)
    params = [hidden, *student.parameters()]
    loss, count = linear_kl_divergence(hidden, student, teacher_hidden, teacher, mask, temperature)
    grads = torch.autograd.grad(loss * 0.7, params)
    ref = naive_distill(hidden, student, teacher_hidden, teacher, mask, temperature)
    ref_grads = torch.autograd.grad(ref * 0.7, params)
    assert count == int(mask.sum()) == 8
    torch.testing.assert_close(loss, ref, rtol=tol, atol=0)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())
    assert grads[0][~mask].abs().max() == 0  # padding gets no gradient


def test_distillation_under_autocast_runs_both_heads_in_bf16_like_the_full_logits(rows_per_chunk):
    rows_per_chunk(3, 64)
    hidden, student, teacher_hidden, teacher, mask = distill_case(torch.float32, bias=False, vocab=64, width=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = linear_kl_divergence(hidden, student, teacher_hidden, teacher, mask, 2.0)
        ref = naive_distill(hidden, student, teacher_hidden, teacher, mask, 2.0)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)  # the same bf16 logits; only the sums' order differs
    g, ref_g = torch.autograd.grad(loss, hidden), torch.autograd.grad(ref, hidden)
    torch.testing.assert_close(g[0], ref_g[0], rtol=1e-2, atol=1e-2)


def test_distillation_saves_no_logits():
    vocab, rows = 4096, 14
    hidden, student, teacher_hidden, teacher, mask = distill_case(torch.float32, bias=True, vocab=vocab)
    exclude = [hidden, teacher_hidden, mask, *teacher.parameters()]  # what the caller holds anyway

    def saved(fn) -> int:
        with SavedTensorMeter(student, exclude=exclude) as meter:
            out = fn(hidden, student, teacher_hidden, teacher, mask, 2.0)
        (out[0] if isinstance(out, tuple) else out).backward()
        return meter.bytes

    chunked, full = saved(linear_kl_divergence), saved(naive_distill)
    logits = rows * vocab * 4
    assert full >= 2 * logits  # the student's and the teacher's log-probabilities
    assert chunked < logits / 100  # the teacher's masked rows and two log-sum-exps per row


# ---------------------------------------------------------------------------- through the strategies
def saved_bytes(trainer: Trainer, batch: dict, exclude: list) -> int:
    """What autograd saves in one training loss of `trainer` on `batch` (`exclude`: not counted), then backward."""
    with SavedTensorMeter(trainer.model, exclude=exclude) as meter:
        out = trainer._loss(batch)
    out.loss_sum.backward()
    return meter.bytes


def revffn_trainer(*extra: str, dtype: str = "float64") -> Trainer:
    return build("tiny-mixtral", "[{name: full}, {name: revffn, params: {coupling: additive, recovery: {steps: 5, "
                 "temperature: 2.0}}}]", *extra, dtype=dtype)


def loss_and_grads(trainer: Trainer, batch: dict):
    """The loss and every parameter's gradient (by `backward`: RevFFN's stack accumulates its layers' own)."""
    trainer.model.zero_grad(set_to_none=True)
    out = trainer._loss(batch)
    out.loss_sum.backward()
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in params)
    return out, [p.grad.clone() for p in params]


def test_revffn_distillation_equals_the_full_logits_path(rows_per_chunk, monkeypatch):
    t = revffn_trainer()
    strategy = t.strategies[-1]
    vocab = t.model.config.vocab_size
    rows_per_chunk(5, vocab)  # 41 positions: 9 chunks
    batch = padded_batch(vocab, [24, 17], 24)
    t.model.train()
    assert revffn_distill.linear_head(t.model) is not None and revffn_distill.linear_head(strategy.teacher) is not None
    out, grads = loss_and_grads(t, batch)
    assert strategy.phase == "distill" and out.aux_loss is not None
    monkeypatch.setattr(revffn_distill, "linear_head", lambda model: None)  # both models' full logits
    ref, ref_grads = loss_and_grads(t, batch)
    assert out.count == ref.count == 41
    assert out.loss_sum > 0
    torch.testing.assert_close(out.loss_sum, ref.loss_sum, rtol=1e-10, atol=0)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert all(p.grad is None for p in strategy.teacher.parameters())


def test_revffn_distillation_keeps_no_logits(monkeypatch):
    t = revffn_trainer("model.config_overrides={vocab_size: 8192}", dtype="float32")
    batch = padded_batch(8192, [48, 48, 30], 48)
    t.model.train()
    exclude = [*batch.values(), *t.strategies[-1].teacher.parameters()]
    chunked = saved_bytes(t, batch, exclude)
    monkeypatch.setattr(revffn_distill, "linear_head", lambda model: None)
    full = saved_bytes(t, batch, exclude)
    logits = 3 * 48 * 8192 * 4
    # kept instead: the teacher's hidden state, two log-sum-exps and an index per masked row
    kept = int(batch["attention_mask"].sum()) * (t.model.config.hidden_size * 4 + 2 * 4 + 8)
    assert full - chunked >= 2 * logits - kept  # neither the student's nor the teacher's log-probabilities
    assert full - chunked < 2.1 * logits


def tokentune_trainer(*extra: str, dtype: str = "float64") -> Trainer:
    r = load(REPO / "recipes" / "lora.yaml",
             ["model.name=tiny-mixtral", f"model.dtype={dtype}", "data.max_samples=8", "data.max_length=256",
              "strategies=[{name: full}, {name: tokentune, params: {fraction: 0.3}}]", *extra])
    return Trainer(r, run_dir="unused").setup(for_training=False)


def test_tokentune_selected_loss_equals_the_full_logits_path(rows_per_chunk, monkeypatch):
    t = tokentune_trainer()
    vocab = t.model.config.vocab_size
    rows_per_chunk(4, vocab)
    tt = t.strategies[-1]
    batch = tt.on_step_start(0, padded_batch(vocab, [40, 23, 31], 40))
    t.model.train()
    out, grads = loss_and_grads(t, batch)
    monkeypatch.setattr(tokentune_rows, "linear_head", lambda model: None)  # the head on the selected rows
    ref, ref_grads = loss_and_grads(t, batch)
    assert out.count == ref.count == tt.count_targets(batch) > 4
    torch.testing.assert_close(out.loss_sum, ref.loss_sum, rtol=1e-10, atol=0)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_tokentune_selected_loss_keeps_no_logits(monkeypatch):
    t = tokentune_trainer("model.config_overrides={vocab_size: 8192}", dtype="float32")
    tt = t.strategies[-1]
    batch = tt.on_step_start(0, padded_batch(8192, [64, 64], 64))
    t.model.train()
    chunked = saved_bytes(t, batch, list(batch.values()))
    monkeypatch.setattr(tokentune_rows, "linear_head", lambda model: None)
    full = saved_bytes(t, batch, list(batch.values()))
    rows = batch[POSITIONS_KEY].numel()
    logits = rows * 8192 * 4
    assert full - chunked >= logits - rows * (4 + 8)  # kept instead: a log-sum-exp and an index per target
    assert full - chunked < 1.2 * logits  # and nothing else changed


def test_distill_transient_adds_the_teachers_chunk():
    vocab = 151_936
    chunk = chunked_loss.chunk_tokens(vocab)
    args = (2048, vocab, 2048, torch.bfloat16, torch.bfloat16)
    extra = chunked_loss.distill_transient_bytes(*args, head_trains=True) - chunked_loss.transient_bytes(
        *args, head_trains=True)
    assert extra == chunk * vocab * 4  # the teacher's float32 probabilities of one chunk
