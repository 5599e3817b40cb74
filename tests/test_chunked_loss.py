"""The causal-LM loss without the logits (`memft/train/chunked_loss.py`): equal to the plain loss, and it
keeps no B x S x V tensor for backward."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memft.recipe import load
from memft.registry import at_least_float32
from memft.train import chunked_loss, loop
from memft.train.chunked_loss import linear_cross_entropy, linear_head
from memft.train.loop import Trainer, default_loss
from memft.train.meters import SavedTensorMeter

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_chunks(monkeypatch):
    """Chunks of 3 rows, so that every test crosses chunk boundaries (and ends on a partial one)."""
    monkeypatch.setattr(chunked_loss, "chunk_tokens", lambda vocab: 3)


def plain(hidden, head, labels):
    logits = at_least_float32(head(hidden))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                           reduction="sum")


def random_case(dtype, bias, seed=0, vocab=37, width=16):
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(width, vocab, bias=bias).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g, dtype=dtype))
        if bias:
            head.bias.copy_(torch.randn(vocab, generator=g, dtype=dtype))
    hidden = torch.randn(2, 7, width, generator=g, dtype=dtype).requires_grad_()
    labels = torch.randint(0, vocab, (2, 7), generator=g)
    labels[0, :2] = -100  # a prompt
    labels[1, -3:] = -100  # padding
    return hidden, head, labels


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_loss_and_gradients_equal_the_plain_loss(tiny_chunks, dtype, tol, bias):
    hidden, head, labels = random_case(dtype, bias)
    params = [hidden, *head.parameters()]
    loss, count = linear_cross_entropy(hidden, head, labels)
    grads = torch.autograd.grad(loss * 0.7, params)
    ref = plain(hidden, head, labels)
    ref_grads = torch.autograd.grad(ref * 0.7, params)
    assert count == int((labels != -100).sum()) == 9
    torch.testing.assert_close(loss, ref, rtol=tol, atol=0)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())
    assert grads[0][1, -3:].abs().max() == 0  # positions without a target get no gradient


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_the_walk_over_vocabulary_rows_equals_the_plain_loss(monkeypatch, dtype, tol, bias):
    # chunks of 5 vocabulary rows over 37: several chunks and a partial one, targets in each
    monkeypatch.setattr(chunked_loss, "WEIGHT_GRADIENT", "by_vocab")
    monkeypatch.setattr(chunked_loss, "CHUNK_BYTES", 4 * 9 * 5)
    hidden, head, labels = random_case(dtype, bias)
    params = [hidden, *head.parameters()]
    loss, _ = linear_cross_entropy(hidden, head, labels)
    grads = torch.autograd.grad(loss * 0.7, params)
    ref_grads = torch.autograd.grad(plain(hidden, head, labels) * 0.7, params)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())
    assert grads[0][1, -3:].abs().max() == 0


def test_a_bf16_head_gets_its_gradient_without_a_float32_copy_of_it(monkeypatch):
    # auto: a bf16 head with fewer targets than vocabulary rows walks the vocabulary; every row of its gradient is
    # one bf16 rounding of a float32 product, as in the plain loss's single matmul
    hidden, head, labels = random_case(torch.float32, bias=False, vocab=64, width=32)
    head, hidden = head.to(torch.bfloat16), hidden.detach().to(torch.bfloat16).requires_grad_()
    assert chunked_loss.by_vocab(9, 64, torch.bfloat16, torch.float32)
    allocated = []
    real_zeros = torch.zeros
    monkeypatch.setattr(chunked_loss.torch, "zeros", lambda *a, **k: allocated.append((a, k)) or real_zeros(*a, **k))
    loss, _ = linear_cross_entropy(hidden, head, labels)
    g_w, g_h = torch.autograd.grad(loss, [head.weight, hidden])
    assert not any(a and tuple(a[0]) == tuple(head.weight.shape) for a, k in allocated)  # no (V, H) buffer
    ref_w, ref_h = torch.autograd.grad(plain(hidden, head, labels), [head.weight, hidden])
    assert g_w.dtype == torch.bfloat16
    torch.testing.assert_close(g_w.float(), ref_w.float(), rtol=2e-2, atol=2e-2 * ref_w.abs().max().item())
    torch.testing.assert_close(g_h.float(), ref_h.float(), rtol=2e-2, atol=2e-2 * ref_h.abs().max().item())


def test_under_autocast_it_computes_the_head_in_bf16_like_the_plain_loss(tiny_chunks):
    hidden, head, labels = random_case(torch.float32, bias=False, vocab=64, width=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = linear_cross_entropy(hidden, head, labels)
        ref = plain(hidden, head, labels)
    assert loss.dtype == torch.float32
    # the same bf16 logits, the same float32 loss; only the order of the sum differs
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    g, ref_g = torch.autograd.grad(loss, hidden), torch.autograd.grad(ref, hidden)
    torch.testing.assert_close(g[0], ref_g[0], rtol=1e-2, atol=1e-2)  # bf16 matmuls of different shapes


def test_no_targets_gives_zero_loss_and_zero_gradients(tiny_chunks):
    hidden, head, labels = random_case(torch.float64, bias=True)
    loss, count = linear_cross_entropy(hidden, head, torch.full_like(labels, -100))
    loss.backward()
    assert count == 0 and loss.item() == 0
    assert hidden.grad.abs().max() == 0 and head.weight.grad.abs().max() == 0


def full_ft(model: str, dtype: str = "float64") -> Trainer:
    r = load(REPO / "recipes" / "quickstart.yaml",
             [f"model.name={model}", f"model.dtype={dtype}", "data.max_samples=8", "data.max_length=96",
              "train.batch_size=4", "data.eval_split=null"])
    return Trainer(r, run_dir="unused").setup(for_training=False)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-mixtral"])
def test_the_models_loss_and_every_gradient_equal_the_plain_loss(tiny_chunks, monkeypatch, model):
    t = full_ft(model)
    batch = t.batcher.batch(0, 0)
    assert linear_head(t.model) is t.model.get_output_embeddings()
    t.model.train()
    out = default_loss(t.model, batch, "causal_lm")
    assert out.logits is None
    grads = torch.autograd.grad(out.loss_sum, [p for p in t.model.parameters() if p.requires_grad])
    monkeypatch.setattr(loop, "linear_head", lambda model: None)  # the plain loss on the model's logits
    ref = default_loss(t.model, batch, "causal_lm")
    ref_grads = torch.autograd.grad(ref.loss_sum, [p for p in t.model.parameters() if p.requires_grad])
    assert out.count == ref.count > 0
    torch.testing.assert_close(out.loss_sum, ref.loss_sum, rtol=1e-10, atol=0)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_backward_keeps_no_logits(monkeypatch):
    """At a vocabulary much wider than the model, the plain loss's saved bytes are mostly float32 logits; the
    chunked loss keeps none of them (only one float32 log-sum-exp per target)."""
    r = load(REPO / "recipes" / "quickstart.yaml",
             ["model.name=tiny-llama", "model.dtype=float32", "model.config_overrides={vocab_size: 8192}",
              "data.max_samples=8", "data.max_length=96", "train.batch_size=4", "data.eval_split=null"])
    t = Trainer(r, run_dir="unused").setup(for_training=False)
    batch = t.batcher.batch(0, 0)
    t.model.train()

    def saved() -> int:
        with SavedTensorMeter(t.model, exclude=list(batch.values())) as meter:
            out = default_loss(t.model, batch, "causal_lm")
        out.loss_sum.backward()
        return meter.bytes

    chunked = saved()
    monkeypatch.setattr(loop, "linear_head", lambda model: None)
    full = saved()
    B, S = batch["input_ids"].shape
    logits = B * S * 8192 * 4
    assert full - chunked >= logits  # at least one float32 logits tensor fewer
    assert full - chunked < 1.2 * logits  # and nothing else: the layers keep what they kept


def test_heads_it_does_not_take_over():
    class Softcapped(nn.Module):
        config = type("C", (), {"final_logit_softcapping": 30.0})()

        def get_output_embeddings(self):
            return nn.Linear(4, 8)

    class Adapted(nn.Module):
        def get_output_embeddings(self):
            return nn.Sequential(nn.Linear(4, 8))

    assert linear_head(Softcapped()) is None
    assert linear_head(Adapted()) is None
    assert linear_head(nn.Linear(4, 8)) is None  # no get_output_embeddings: not a causal LM


def test_transient_bound_matches_the_chunk():
    vocab = 151_936
    chunk = chunked_loss.chunk_tokens(vocab)
    assert chunk * vocab * 4 <= chunked_loss.CHUNK_BYTES < (chunk + 1) * vocab * 4
    small = chunked_loss.transient_bytes(2048, vocab, 2048, torch.bfloat16, torch.bfloat16, head_trains=False)
    assert small == chunk * vocab * 6 + 2048 * 2048 * 2
    assert small < 2 * 2048 * vocab * 4 / 10  # a tenth of the plain loss's two float32 logit gradients
    # a trained bf16 head: the float32 sum is the target rows' gradient (and their copy), not the head's gradient
    trained = chunked_loss.transient_bytes(2048, vocab, 2048, torch.bfloat16, torch.bfloat16, head_trains=True)
    rows = chunked_loss.CHUNK_BYTES // (4 * 2048)
    assert trained == 2048 * rows * 6 + 2048 * 2048 * 2 + 2048 * 2048 * (4 + 2)
    assert trained < vocab * 2048 * 4 / 4
