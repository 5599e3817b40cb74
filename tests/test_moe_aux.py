"""The MoE load-balancing loss against transformers' own loss, with every strategy that keeps the router in the graph.

The reference is the plain Hugging Face model (the same weights, built from the same recipe without strategies)
called with `labels` and `output_router_logits=True`: its `loss` is mean cross-entropy + coef x
`load_balancing_loss_func`. Strategies that stop gradients (LCSB's unselected layers, TokenTune's unselected
rows) are compared with the same model and the same stops written with `detach()`.
"""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_revffn import load_balancing_loss, padded_batch
from test_tokentune import reference_loss as tokentune_reference

from memft.errors import UserError
from memft.models.blocks import decoder_body, layer_stack, unwrap
from memft.models.moe import ROUTER_AUX_ATTR, router_of
from memft.recipe import load
from memft.strategies.tokentune import POSITIONS_KEY
from memft.train.loop import Trainer, step_loss

REPO = Path(__file__).resolve().parents[1]
MOE_MODELS = ["tiny-mixtral", "tiny-qwen2-moe", "tiny-olmoe"]
ON = "model.config_overrides={output_router_logits: true}"  # `train.router_aux_loss: auto` follows the config


def build(model: str, strategies: str, *extra: str, dtype: str = "float64") -> Trainer:
    r = load(REPO / "recipes" / "lora.yaml", [f"model.name={model}", f"model.dtype={dtype}", f"strategies={strategies}",
                                              "data.max_samples=8", "data.max_length=256", *extra])
    return Trainer(r, run_dir="unused").setup(for_training=False)


def hf_loss(model, batch) -> torch.Tensor:
    """transformers' training loss, mean next-token cross-entropy + coef x load-balancing loss, in the model's
    precision (transformers takes both in float32; its values are checked here to 1e-6)."""
    hf, inputs = unwrap(model), {k: batch[k] for k in ("input_ids", "attention_mask")}
    logits = []
    hooks = [router_of(layer).register_forward_hook(lambda m, a, out: logits.append(out[0]))
             for layer in layer_stack(model) if router_of(layer) is not None]
    try:
        out = hf(**inputs, output_router_logits=True)
    finally:
        for h in hooks:
            h.remove()
    cfg = hf.config
    experts = getattr(cfg, "num_local_experts", None) or cfg.num_experts
    ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
    aux = load_balancing_loss(logits, experts, cfg.num_experts_per_tok, batch["attention_mask"])
    loss = ce + cfg.router_aux_loss_coef * aux
    with torch.no_grad():
        own = hf(**inputs, labels=batch["labels"], output_router_logits=True)
    assert own.aux_loss > 0
    torch.testing.assert_close(aux.float(), own.aux_loss.float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(loss.float(), own.loss.float(), rtol=1e-6, atol=0)
    return loss


def memft_loss(trainer: Trainer, batch: dict) -> torch.Tensor:
    out = step_loss(trainer.strategies, trainer.model, batch, trainer.recipe.model.task)
    count = next((n for s in trainer.strategies if (n := s.count_targets(batch)) is not None), out.count)
    return out.loss_sum / count


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def randomise_lora(model):
    torch.manual_seed(5)
    with torch.no_grad():  # LoRA's B starts at zero, which would make the gradient check trivial
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)


def assert_same_grads(got: dict, want: dict, rtol: float = 1e-10):
    assert want and set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=rtol * want[name].abs().max().item(),
                                   msg=name)


@pytest.mark.parametrize("model", MOE_MODELS)
@pytest.mark.parametrize("variant", ["full", "full+checkpointing", "lora", "lora+checkpointing", "meft"])
def test_loss_and_gradients_equal_transformers_loss_with_aux(model, variant):
    lora = "[{name: lora, params: {r: 4, target_modules: all-linear}}]"
    strategies = {"full": "[{name: full}]", "lora": lora,
                  "meft": "[{name: full}, {name: meft, params: {width: 64, experts: 8, topk: 4}}]"}[variant.split("+")[0]]
    extra = ["train.gradient_checkpointing=true"] if variant.endswith("+checkpointing") else []
    ref = build(model, strategies, ON)
    t = build(model, strategies, ON, *extra)
    for x in (ref, t):
        randomise_lora(x.model)  # the same seed: the same adapters
        x.model.train()
    batch = padded_batch(t.model.config.vocab_size, [20, 13, 7], 20)  # padding in two rows

    expected = hf_loss(ref.model, batch)
    expected.backward()
    loss = memft_loss(t, batch)
    loss.backward()

    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=0)
    want = {n: g for n, g in grads(ref.model).items() if "meft" not in n}
    got = {n: g for n, g in grads(t.model).items() if "meft" not in n}
    assert_same_grads(got, want)
    routers = [n for n in want if "mlp.gate." in n and ("weight" in n or "lora_" in n)]
    trains_router = any("mlp.gate." in n for n, p in t.model.named_parameters() if p.requires_grad)
    assert bool(routers) == trains_router and all(want[n].abs().sum() > 0 for n in routers)  # peft skips Qwen2-MoE's


def test_the_term_changes_the_loss():
    """Without the switch the loss is cross-entropy alone (6.231297 vs 6.271401 in the outside check)."""
    off = build("tiny-mixtral", "[{name: full}]")
    on = build("tiny-mixtral", "[{name: full}]", ON)
    assert not hasattr(off.model, ROUTER_AUX_ATTR)
    batch = padded_batch(512, [20, 13], 20)
    plain, with_aux = memft_loss(off, batch), memft_loss(on, batch)
    logits = unwrap(off.model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
    torch.testing.assert_close(plain, ce, rtol=1e-10, atol=0)
    torch.testing.assert_close(with_aux, hf_loss(off.model, batch), rtol=1e-10, atol=0)
    assert with_aux - plain > 1e-3


@pytest.mark.parametrize(("setting", "coef"), [("auto", 0.0), ("on", 0.02), ("off", 0.0),
                                               ("on train.router_aux_loss_coef=0.5", 0.5)])
def test_the_switch_and_its_coefficient(setting, coef):
    switch, *more = setting.split()
    t = build("tiny-mixtral", "[{name: full}]", f"train.router_aux_loss={switch}", *more)
    aux = getattr(t.model, ROUTER_AUX_ATTR, None)
    assert (aux.coef if aux else 0.0) == coef
    assert unwrap(t.model).config.output_router_logits is False  # transformers does not compute a second copy
    auto_on = build("tiny-mixtral", "[{name: full}]", ON, f"train.router_aux_loss={switch}", *more)
    expected = {"auto": 0.02, "off": 0.0}.get(switch, coef)
    assert (getattr(auto_on.model, ROUTER_AUX_ATTR).coef if expected else not hasattr(auto_on.model, ROUTER_AUX_ATTR))


def test_dense_models_ignore_the_switch():
    t = build("tiny-llama", "[{name: full}]", "train.router_aux_loss=on")
    assert not hasattr(t.model, ROUTER_AUX_ATTR)


def test_lcsb_unselected_layers_add_a_constant_term():
    """LCSB's unselected layers run without autograd: their share of the loss is exact, their gradient stops."""
    lcsb = "[{name: full}, {name: lcsb, params: {groups: 2}}]"
    ref = build("tiny-mixtral", "[{name: full}]", ON)
    t = build("tiny-mixtral", lcsb, ON)
    t.model.train(), ref.model.train()
    batch = t.strategies[-1].on_step_start(1, padded_batch(512, [20, 13], 20))
    selected = set(t.strategies[-1].layer_groups[t.strategies[-1].selected])

    # reference: plain autograd, unselected layers `h + (out - h).detach()`, their router logits constants
    body, logits = decoder_body(ref.model), []
    hooks = []
    for i, layer in enumerate(body.layers):
        if i not in selected:
            hooks.append(layer.register_forward_hook(lambda m, a, out: a[0] + (out - a[0]).detach()))
        hooks.append(router_of(layer).register_forward_hook(
            lambda m, a, out, i=i: logits.append(out[0] if i in selected else out[0].detach())))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    out = unwrap(ref.model)(**inputs)
    for h in hooks:
        h.remove()
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
    expected = ce + 0.02 * load_balancing_loss(logits, 8, 2, batch["attention_mask"])
    expected.backward()
    loss = memft_loss(t, batch)
    loss.backward()
    t.strategies[-1].after_backward(1)

    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=0)
    want = grads(ref.model)
    got = {n: g for n, g in grads(t.model).items() if g.abs().sum() > 0}
    assert_same_grads(got, {n: g for n, g in want.items() if g.abs().sum() > 0})


@pytest.mark.parametrize("loss_on", ["selected", "all"])
def test_tokentune_counts_every_token_and_trains_through_the_selected_ones(loss_on):
    """Value: every real token's routing, as without TokenTune. Gradient: the selected rows' router logits only
    (an unselected row carries no gradient anywhere), with the rest of TokenTune's naive reference."""
    tt = f"[{{name: full}}, {{name: tokentune, params: {{fraction: 0.3, loss_on: {loss_on}}}}}]"
    t = build("tiny-mixtral", tt, ON)
    t.model.train()
    batch = t.strategies[-1].on_step_start(0, padded_batch(512, [20, 13, 7], 20))
    positions = batch[POSITIONS_KEY]
    B, T = batch["attention_mask"].shape
    keep = torch.zeros(B, T, dtype=torch.bool).scatter(1, positions, True)

    loss = memft_loss(t, batch)
    got = dict(zip([n for n, _ in t.model.named_parameters()],
                   torch.autograd.grad(loss, list(t.model.parameters()), allow_unused=True)))

    logits = []
    hooks = [router_of(layer).register_forward_hook(lambda m, a, out: logits.append(
        torch.where(keep.reshape(-1, 1), out[0], out[0].detach()))) for layer in layer_stack(t.model)]
    try:
        ce = tokentune_reference(t, {k: v for k, v in batch.items() if k != POSITIONS_KEY}, keep, loss_on)
    finally:
        for h in hooks:
            h.remove()
    aux = load_balancing_loss(logits, 8, 2, batch["attention_mask"])
    plain = build("tiny-mixtral", "[{name: full}]", ON)
    hf = unwrap(plain.model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             output_router_logits=True)
    torch.testing.assert_close(aux, hf.aux_loss.to(aux.dtype), rtol=1e-6, atol=0)  # the forward is exact
    expected = ce + 0.02 * aux
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=0)
    want = dict(zip(got, torch.autograd.grad(expected, list(t.model.parameters()), allow_unused=True)))
    assert_same_grads({n: g for n, g in got.items() if g is not None and g.abs().sum() > 0},
                      {n: g for n, g in want.items() if g is not None and g.abs().sum() > 0})


def test_aux_loss_is_logged_beside_the_loss(tmp_path):
    r = load(REPO / "recipes" / "lora.yaml", ["model.name=tiny-mixtral", "strategies=[{name: full}]",
                                              "train.router_aux_loss=on", "train.max_steps=2", "data.max_samples=16",
                                              f"output.dir={tmp_path}", "output.plot=false"])
    Trainer(r).setup().train()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "loss" in m]
    assert len(steps) == 2 and all(m["aux_loss"] > 0.5 for m in steps)  # about 1 for an evenly spread router


def test_routers_are_found_through_peft_adapters():
    """memft's `lora` no longer gives peft the router (`target_router` trains it in full), but a peft model may
    still wrap it: peft 0.21 adapts a router weight through `target_parameters` (a `ParamWrapper`)."""
    from peft import LoraConfig, get_peft_model

    t = build("tiny-mixtral", "[{name: full}]")
    model = get_peft_model(t.model, LoraConfig(r=4, target_modules=None, target_parameters=["mlp.gate.weight"]))
    for layer in layer_stack(model):
        assert type(layer.mlp.gate).__name__ == "ParamWrapper"
        router = router_of(layer)
        assert router is not layer.mlp.gate and hasattr(router, "top_k")


def test_an_unknown_router_is_a_loud_error():
    t = build("tiny-mixtral", "[{name: full}]")
    layer = layer_stack(t.model)[0]
    layer.mlp.gate = torch.nn.Linear(64, 8)  # a router memft does not know
    with pytest.raises(UserError, match="cannot find the router"):
        router_of(layer)


def test_qlora_float32():
    qlora = "[{name: qlora, params: {r: 4, target_modules: all-linear}}]"
    ref, t = build("tiny-mixtral", qlora, ON, dtype="float32"), build("tiny-mixtral", qlora, ON, dtype="float32")
    for x in (ref, t):
        randomise_lora(x.model)
        x.model.train()
    batch = padded_batch(512, [20, 13], 20)
    expected = hf_loss(ref.model, batch)
    expected.backward()
    loss = memft_loss(t, batch)
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    assert_same_grads(grads(t.model), grads(ref.model), rtol=1e-5)


def test_revffns_old_coefficient_key_names_the_new_one():
    from memft.errors import RecipeError

    with pytest.raises(RecipeError, match="train.router_aux_loss_coef"):
        load(REPO / "recipes" / "lora.yaml", ["model.name=tiny-mixtral",
                                              "strategies=[{name: full}, {name: revffn, params: {aux_loss_coef: 0.02}}]"])
