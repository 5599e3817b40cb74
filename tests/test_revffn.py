"""RevFFN against its naive reference: the same two-stream model, run with plain autograd.

The reference is written here from the model's own modules (attention, norms, MLP / MoE block,
head) and transformers' own `load_balancing_loss_func`, with the layers' arguments (mask, rotary)
captured from an ordinary forward of the unconverted model. The reversible version must give the
same loss and the same gradients, rebuild the forward's layer inputs, and route exactly as the
forward did.
"""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from memft.models.blocks import decoder_body, unwrap
from memft.models.moe import router_of
from memft.recipe import load
from memft.strategies.revffn.stack import ReversibleStack
from memft.train.loop import Trainer
from memft.train.meters import SavedTensorMeter

REPO = Path(__file__).resolve().parents[1]
MOE_MODELS = ["tiny-mixtral", "tiny-qwen2-moe", "tiny-olmoe"]


def build(model: str, strategies: str, *extra: str, dtype: str = "float64") -> Trainer:
    r = load(REPO / "recipes" / "lora.yaml", [f"model.name={model}", f"model.dtype={dtype}", f"strategies={strategies}",
                                              "data.max_samples=8", "data.max_length=256",
                                              "train.router_aux_loss=on", *extra])
    return Trainer(r, run_dir="unused").setup(for_training=False)


def padded_batch(vocab: int, lengths: list[int], T: int) -> dict:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, vocab, (len(lengths), T), generator=g)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
        ids[b, n:] = 2
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def captured_layer_kwargs(model, batch) -> list[dict]:
    """The arguments the model gives each decoder layer, from an ordinary forward."""
    body = decoder_body(model)
    seen: list[dict] = [{} for _ in body.layers]
    hooks = [layer.register_forward_pre_hook(lambda m, a, kw, i=i: seen.__setitem__(i, kw), with_kwargs=True)
             for i, layer in enumerate(body.layers)]
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for h in hooks:
        h.remove()
    return seen


def reference_loss(model, batch, coupling: str, gamma: float, aux_coef: float, seed: int | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy (+ coef x transformers' load-balancing loss) of the two-stream model."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    hf = unwrap(model)
    body = decoder_body(model)
    kwargs = captured_layer_kwargs(model, batch)
    if seed is not None:  # dropout / router jitter draw from here on
        torch.manual_seed(seed)
    router_logits = []
    hooks = [r.register_forward_hook(lambda m, a, out: router_logits.append(out[0]))
             for layer in body.layers if (r := router_of(layer)) is not None]
    h = body.embed_tokens(batch["input_ids"])
    attn = [lambda x, layer=layer, kw=kw: layer.self_attn(hidden_states=layer.input_layernorm(x), **kw)[0]
            for layer, kw in zip(body.layers, kwargs)]
    ffn = [lambda x, layer=layer: layer.mlp(layer.post_attention_layernorm(x)) for layer in body.layers]
    if coupling == "additive":
        x1 = x2 = h
        for a, f in zip(attn, ffn):
            x1 = x1 + a(x2)
            x2 = x2 + f(x1)
        out = (x1 + x2) / 2
    else:
        x, v = h, torch.zeros_like(h)
        for a, f in zip(attn, ffn):
            for branch in (a, f):
                v = gamma * v + (1 - gamma) * branch(x)
                x = x + v
        out = x
    for hook in hooks:
        hook.remove()
    logits = hf.lm_head(body.norm(out))
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100)
    if router_logits:
        cfg = hf.config
        k = cfg.num_experts_per_tok
        e = getattr(cfg, "num_local_experts", None) or cfg.num_experts
        aux = load_balancing_loss(router_logits, e, k, batch["attention_mask"])
        # transformers' own function sums the router probabilities in float32: same value, less precise
        hf_aux = load_balancing_loss_func(tuple(router_logits), e, k, batch["attention_mask"])
        torch.testing.assert_close(aux.float(), hf_aux.float(), rtol=1e-5, atol=0)
        loss = loss + aux_coef * aux
    return loss


def load_balancing_loss(router_logits, experts: int, top_k: int, attention_mask) -> torch.Tensor:
    """Switch Transformer's loss over all MoE layers' tokens: experts * sum_e f_e * P_e, f_e the share of routed
    slots that chose expert e (no gradient), P_e its mean router probability; padding excluded."""
    logits = torch.cat(router_logits)  # (layers * B * T, E)
    mask = attention_mask.reshape(-1).repeat(len(router_logits)).to(logits.dtype)
    probs = torch.softmax(logits, dim=-1)
    chosen = F.one_hot(torch.topk(probs, top_k, dim=-1).indices, experts).sum(1).to(logits.dtype)
    f = (chosen * mask[:, None]).sum(0) / mask.sum()
    p = (probs * mask[:, None]).sum(0) / mask.sum()
    return experts * (f * p).sum()


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def revffn_loss(trainer: Trainer, batch: dict) -> torch.Tensor:
    out = trainer._loss(batch)
    return out.loss_sum / out.count


@pytest.mark.parametrize("model", ["tiny-llama", *MOE_MODELS])
@pytest.mark.parametrize("coupling", ["additive", "momentum"])
def test_gradients_equal_plain_autograd_float64(model, coupling):
    params = f"{{coupling: {coupling}, gamma: 0.5}}"
    ref = build(model, "[{name: full}]")
    rev = build(model, f"[{{name: full}}, {{name: revffn, params: {params}}}]")
    batch = padded_batch(ref.model.config.vocab_size, [24, 17, 9], 24)  # padding in two rows
    aux_coef = rev.strategies[-1].aux_coef
    if model in MOE_MODELS:
        assert aux_coef > 0

    expected = reference_loss(ref.model, batch, coupling, 0.5, aux_coef)
    expected.backward()
    loss = revffn_loss(rev, batch)
    loss.backward()

    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=0)
    want, got = grads(ref.model), grads(rev.model)
    assert set(got) == set(want) and len(got) == sum(1 for _ in rev.model.parameters())
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12, msg=name)
    if model in MOE_MODELS:
        assert rev.strategies[-1].stack.flips == 0
        routers = [n for n in want if ".gate." in n or n.endswith("gate.weight")]
        assert routers and all(want[n].abs().sum() > 0 for n in routers)  # the aux loss reaches the routers


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-mixtral"])
def test_gradients_equal_plain_autograd_float32(model):
    ref = build(model, "[{name: full}]", dtype="float32")
    rev = build(model, "[{name: full}, {name: revffn, params: {coupling: additive}}]", dtype="float32")
    batch = padded_batch(ref.model.config.vocab_size, [32, 20], 32)
    expected = reference_loss(ref.model, batch, "additive", 0.5, rev.strategies[-1].aux_coef)
    expected.backward()
    loss = revffn_loss(rev, batch)
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    want, got = grads(ref.model), grads(rev.model)
    for name in want:
        scale = want[name].abs().max().clamp_min(1e-8)
        assert (got[name] - want[name]).abs().max() / scale < 1e-5, name


@pytest.mark.parametrize("coupling", ["additive", "momentum"])
def test_reconstructed_inputs_match_the_forward(coupling):
    rev = build("tiny-llama", f"[{{name: full}}, {{name: revffn, params: {{coupling: {coupling}, gamma: 0.5}}}}]")
    stack = rev.strategies[-1].stack
    stack.track_reconstruction = True
    revffn_loss(rev, padded_batch(512, [20, 11], 20)).backward()
    errors = stack.reconstruction_error
    assert len(errors) == len(stack.layers)
    assert max(errors) < (1e-13 if coupling == "additive" else 1e-10)  # momentum: error x ~1/gamma per branch
    assert errors[0] > 0  # measured, not skipped
    assert stack.track_reconstruction is False  # one tracked backward only


@pytest.mark.parametrize(("coupling", "expect_buffers"), [("additive", False), ("momentum", True)])
def test_auto_buffers_keep_the_rebuild_within_tolerance(coupling, expect_buffers):
    """16 layers in float32: the momentum coupling's error grows ~1/gamma per branch, so `auto` must keep exact
    inputs every few layers; the additive one rebuilds the whole stack within tolerance and keeps none."""
    rev = build("tiny-llama", f"[{{name: full}}, {{name: revffn, params: {{coupling: {coupling}}}}}]",
                "model.config_overrides.num_hidden_layers=16", dtype="float32")
    stack = rev.strategies[-1].stack
    assert stack.buffer_every is None
    stack.track_reconstruction = True
    revffn_loss(rev, padded_batch(512, [32, 32], 32)).backward()
    assert stack.calibration and set(stack.calibration) >= {1, 2, 4, 8, 16}
    if expect_buffers:
        assert stack.calibration[16] > stack.tolerance  # without buffers it would not rebuild within tolerance
        assert 1 <= stack.buffer_every < 16
    else:
        assert stack.buffer_every == 0
    assert max(stack.reconstruction_error) <= stack.tolerance


def test_routing_flip_is_detected_and_replayed_exactly():
    """Force a reconstruction error large enough to change a routing decision: the recomputation
    must still use the forward's experts (and count the flip)."""
    rev = build("tiny-mixtral", "[{name: full}, {name: revffn, params: {coupling: additive, buffer_every: 0}}]")
    stack: ReversibleStack = rev.strategies[-1].stack
    tap = next(t for t in stack.taps if t is not None)
    batch = padded_batch(512, [16], 16)
    original = stack.backward_streams

    def perturbed(s0, s1, *args):  # as if the rebuilt streams had drifted a lot
        return original(s0 + 0.5 * torch.randn_like(s0), s1, *args)

    seen = {"record": [], "replay": []}  # runs after the tap, so it sees the tap's (replaced) output
    tap.router.register_forward_hook(lambda m, a, out: seen[tap.mode].append(out[2].clone()) if tap.mode else None)
    stack.backward_streams = perturbed
    revffn_loss(rev, batch).backward()
    assert stack.flips > 0
    (forward_choice,), (replayed_choice,) = seen["record"], seen["replay"]
    assert torch.equal(replayed_choice, forward_choice)


def test_activation_bytes_do_not_grow_with_depth():
    def activation_bytes(layers: int, strategies: str, checkpointing: bool = False) -> int:
        t = build("tiny-llama", strategies, f"model.config_overrides.num_hidden_layers={layers}",
                  f"train.gradient_checkpointing={checkpointing}", dtype="float32")
        t.model.train()
        with SavedTensorMeter(t.model) as meter:
            out = t._loss(padded_batch(512, [64, 64], 64))
        out.loss_sum.backward()
        return meter.bytes

    rev = "[{name: full}, {name: revffn, params: {coupling: additive}}]"
    assert activation_bytes(16, rev) <= 1.1 * activation_bytes(4, rev)
    assert activation_bytes(8, rev) <= 0.8 * activation_bytes(8, "[{name: full}]", checkpointing=True)


@pytest.mark.parametrize(("model", "coupling"), [("tiny-llama", "momentum"), ("tiny-mixtral", "additive"),
                                               ("tiny-olmoe", "momentum"), ("tiny-qwen2-moe", "additive")])
def test_lora_adapters_get_the_plain_autograd_gradients(model, coupling):
    """peft 0.21 wraps Mixtral's and OLMoE's routers (`mlp.gate`): found through the wrapper, they keep the
    load-balancing loss and the routing replay (before, the loss was off by 6.7e-3 and gradients by 0.48)."""
    lora = "{name: lora, params: {r: 4, alpha: 8, target_modules: all-linear}}"
    ref = build(model, f"[{lora}]")
    rev = build(model, f"[{lora}, {{name: revffn, params: {{coupling: {coupling}}}}}]")
    stack, aux_coef = rev.strategies[-1].stack, rev.strategies[-1].aux_coef
    if model != "tiny-llama":
        assert aux_coef > 0 and all(stack.taps)
    for t in (ref, rev):
        torch.manual_seed(5)
        with torch.no_grad():  # LoRA's B starts at zero, which would make the check trivial
            for n, p in t.model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
    batch = padded_batch(512, [16, 12], 16)
    expected = reference_loss(ref.model, batch, coupling, 0.5, aux_coef)
    expected.backward()
    loss = revffn_loss(rev, batch)
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=0)
    want, got = grads(ref.model), grads(rev.model)
    assert want and set(got) == set(want) and all("lora_" in n for n in want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize(("model", "noise"), [("tiny-llama", "attention_dropout=0.3"),
                                              ("tiny-mixtral", "router_jitter_noise=0.2")])
def test_random_numbers_are_replayed_in_backward(model, noise):
    """Dropout and router jitter: backward recomputes each branch with the random numbers its forward drew."""
    extra = f"model.config_overrides.{noise}"
    ref = build(model, "[{name: full}]", extra)
    rev = build(model, "[{name: full}, {name: revffn, params: {coupling: additive}}]", extra)
    ref.model.train()
    rev.model.train()
    batch = padded_batch(512, [16, 10], 16)
    expected = reference_loss(ref.model, batch, "additive", 0.5, rev.strategies[-1].aux_coef, seed=11)
    expected.backward()
    torch.manual_seed(11)
    loss = revffn_loss(rev, batch)
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=0)
    want, got = grads(ref.model), grads(rev.model)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12, msg=name)


def test_bf16_blocks_run_on_float32_streams():
    rev = build("tiny-mixtral", "[{name: full}, {name: revffn, params: {coupling: additive, buffer_every: 0}}]",
                dtype="bfloat16")
    stack = rev.strategies[-1].stack
    seen = []
    original = stack.forward_streams
    stack.forward_streams = lambda s0, s1, keep: seen.append((s0.dtype, s1.dtype)) or original(s0, s1, keep)
    stack.track_reconstruction = True
    loss = revffn_loss(rev, padded_batch(512, [16, 16], 16))
    loss.backward()
    assert seen == [(torch.float32, torch.float32)]
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert max(stack.reconstruction_error) < 1e-3  # bf16 streams would lose ~1e-2 per add / subtract
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in rev.model.parameters())


@pytest.mark.parametrize(("strategies", "message"), [
    ("[{name: full}, {name: revffn}, {name: tokentune}]", "`revffn` and `tokentune` cannot be combined"),
    ("[{name: full}, {name: lcsb}, {name: revffn}]", "`revffn` and `lcsb` cannot be combined"),
    ("[{name: revffn}]", "nothing would train"),
])
def test_impossible_combinations_are_rejected_at_validate_time(strategies, message):
    from memft.errors import RecipeError

    with pytest.raises(RecipeError, match=message):
        load(REPO / "recipes" / "revffn.yaml", [f"strategies={strategies}"])


def test_gradient_checkpointing_is_rejected_with_a_reason():
    from memft.errors import RecipeError

    with pytest.raises(RecipeError, match="already rebuilds"):
        load(REPO / "recipes" / "revffn.yaml", ["train.gradient_checkpointing=true"])


def test_an_encoder_is_a_user_error():
    from memft.errors import UserError

    with pytest.raises(UserError, match="not a Llama-family decoder"):
        r = load(REPO / "recipes" / "classify_sst2.yaml", ["strategies=[{name: full}, {name: revffn}]", "model.name=all-MiniLM-L6-v2",
                                                           "data.max_samples=4"])
        Trainer(r, run_dir="unused").setup(for_training=False)


QUICK = ["log.progress=false", "output.plot=false", "train.batch_size=4", "data.max_samples=80",
         "data.max_length=128", "train.warmup_steps=0", "train.eval_batches=2"]


def test_recovery_lowers_the_converted_models_loss(tmp_path):
    r = load(REPO / "recipes" / "revffn.yaml", [*QUICK, "train.max_steps=12", "train.eval_every=null",
                                                "strategies.1.params.coupling=additive",
                                                "strategies.1.params.recovery.steps=12", "train.lr=3e-3",
                                                "output.checkpoints=false"])
    t = Trainer(r, run_dir=tmp_path / "run").setup()
    assert t.strategies[-1].teacher is not None
    t.train()
    evals = [m["eval_loss"] for m in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if "eval_loss" in m]
    assert evals[-1] < evals[0] - 0.5, evals  # additive coupling starts far from the pretrained function
    assert t.strategies[-1].teacher is None  # freed once recovery ended


def test_killed_revffn_run_resumes_to_the_same_weights(tmp_path):
    """Resuming inside the recovery stage rebuilds the teacher from the original weights."""
    base = [*QUICK, "train.max_steps=6", "output.save_every=2", "train.eval_every=null", "output.keep_last=5",
            "strategies.1.params.recovery.steps=3", "model.upcycle={experts: 4, top_k: 2}"]
    straight = Trainer(load(REPO / "recipes" / "revffn.yaml", base), run_dir=tmp_path / "a").setup()
    straight.train()
    resumed_dir = tmp_path / "b"
    first = Trainer(load(REPO / "recipes" / "revffn.yaml", base), run_dir=resumed_dir).setup()
    first.total_steps = 2  # stop after the checkpoint at step 2, as if killed there
    first.train()
    (resumed_dir / "summary.json").unlink()
    again = Trainer(load(REPO / "recipes" / "revffn.yaml", base), run_dir=resumed_dir).setup()
    assert again.step == 2 and again.strategies[-1].teacher is not None
    again.train()
    wa = load_file(tmp_path / "a" / "checkpoints" / "step-000006" / "trainable.safetensors")
    wb = load_file(resumed_dir / "checkpoints" / "step-000006" / "trainable.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    summary = json.loads((resumed_dir / "summary.json").read_text())
    assert summary["revffn_routing_flips"] >= 0


def test_export_refuses_a_revffn_run(tmp_path):
    from memft.errors import UserError
    from memft.export import export_run

    r = load(REPO / "recipes" / "revffn.yaml", [*QUICK, "train.max_steps=1", "train.eval_every=null",
                                                "strategies.1.params.recovery.steps=0"])
    Trainer(r, run_dir=tmp_path / "run").setup().train()
    with pytest.raises(UserError, match="trained with `revffn`"):
        export_run(tmp_path / "run", tmp_path / "out")


@pytest.mark.parametrize("setup", [
    ["strategies=[{name: full}, {name: revffn}]", "train.optimizer=adamw_8bit"],
    ["strategies=[{name: qlora, params: {r: 4}}, {name: revffn}]"],
])
def test_combines_with_8bit_adamw_and_qlora(tmp_path, setup):
    r = load(REPO / "recipes" / "revffn.yaml", [*QUICK, "model.name=tiny-mixtral", "train.max_steps=2",
                                                "train.eval_every=null", "output.checkpoints=false", *setup])
    t = Trainer(r, run_dir=tmp_path / "run").setup()
    before = {n: p.detach().float().clone() for n, p in t.model.named_parameters() if p.requires_grad}
    summary = t.train()
    assert summary["final_loss"] is not None and summary["final_loss"] == summary["final_loss"]  # not NaN
    after = dict(t.model.named_parameters())
    assert any(not torch.equal(before[n], after[n].detach().float()) for n in before)


def test_a_bad_buffer_spacing_is_one_clear_error():
    from memft.errors import RecipeError

    with pytest.raises(RecipeError, match=r"(?s)1 problem.*`strategies.1.params.buffer_every`: should be `auto` or a number"):
        load(REPO / "recipes" / "revffn.yaml", ["strategies.1.params.buffer_every=-1"])


TINY = ["log.progress=false", "output.plot=false", "train.batch_size=4", "data.max_samples=24", "data.max_length=32",
        "train.warmup_steps=0", "train.eval_batches=1", "train.eval_every=null", "output.checkpoints=false"]
WHOLE_RUN = "the whole run distils toward the original model and never fine-tunes on the data's labels"


def test_a_run_shorter_than_the_recovery_stage_says_so_in_the_plan():
    short = Trainer(load(REPO / "recipes" / "revffn.yaml", [*TINY, "train.max_steps=3",
                                                            "strategies.1.params.recovery.steps=5"]),
                    run_dir="unused").setup(for_training=False)
    assert f"revffn: `train.max_steps` (3) <= `recovery.steps` (5): {WHOLE_RUN}" in short.notes
    longer = Trainer(load(REPO / "recipes" / "revffn.yaml", [*TINY, "train.max_steps=6",
                                                             "strategies.1.params.recovery.steps=5"]),
                     run_dir="unused").setup(for_training=False)
    assert not any(WHOLE_RUN in n for n in longer.notes)


def test_the_plot_draws_the_distillation_kl_apart_from_the_cross_entropy(tmp_path):
    from memft.train.plot import plot_metrics, plot_series

    r = load(REPO / "recipes" / "revffn.yaml", [*TINY, "train.max_steps=3", "strategies.1.params.recovery.steps=2"])
    t = Trainer(r, run_dir=tmp_path / "run").setup()
    t.train()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m.get("revffn_phase") for m in rows if "loss" in m] == ["distill", "distill", "task"]
    curves = plot_series(rows)
    assert curves["distillation KL"][0] == [1, 2]
    assert curves["train loss"][0] == [3]
    assert curves["eval loss"][0] == [0, 3]  # always the model's cross-entropy
    assert curves["distillation KL"][1] == [m["loss"] for m in rows if m.get("revffn_phase") == "distill"]
    png = plot_metrics(tmp_path / "run" / "metrics.jsonl", tmp_path / "plot.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
