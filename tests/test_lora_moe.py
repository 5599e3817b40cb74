"""`lora` / `qlora` on MoE models through the real strategy: memft's expert LoRA (`LoraExperts`) on the fused
experts, 4-bit (NF4) experts under QLoRA, no upcast of the frozen base, profile accounting (issue 16)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_revffn import padded_batch
from torch.func import functional_call

from memft import registry
from memft.models.blocks import unwrap
from memft.models.expert_lora import LoraExperts
from memft.models.load import load_model, resolve_config
from memft.models.nf4_experts import NF4Experts, nf4_expert_bytes
from memft.profile import predict
from memft.recipe import load
from memft.train.loop import Trainer, default_loss, step_loss
from memft.train.meters import SavedTensorMeter

REPO = Path(__file__).resolve().parents[1]
MOE_MODELS = ["tiny-mixtral", "tiny-qwen2-moe", "tiny-olmoe"]
SMALL = ["data.max_samples=16", "train.batch_size=4", "log.progress=false",
         "output.plot=false", "data.eval_split=null"]


def build(model: str, strategy: str, params: str = "{}", *extra: str, dtype: str = "float64",
          recipe: str = "lora.yaml", run_dir="unused", for_training: bool = False) -> Trainer:
    r = load(REPO / "recipes" / recipe, [f"model.name={model}", f"model.dtype={dtype}",
                                         f"strategies=[{{name: {strategy}, params: {params}}}]", *SMALL,
                                         "data.max_length=128", *extra])
    return Trainer(r, run_dir=run_dir).setup(for_training=for_training)


def randomise_lora_B(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B starts at zero, which would make every gradient check trivial
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


def dense(weight) -> torch.Tensor:
    """A frozen base weight as the adapted layer computes with it: bitsandbytes' 4-bit ones de-quantized."""
    import bitsandbytes as bnb

    if isinstance(weight, NF4Experts):
        return torch.stack([weight.expert(e, torch.float32) for e in range(weight.num_experts)])
    if hasattr(weight, "quant_state"):
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    return weight.detach()


def naive_reference(t: Trainer, batch: dict):
    """Loss and gradients of a plain, adapter-free copy of the model with every adapted weight `W + s B A`
    (per expert for the fused experts), plain autograd. Returns (loss, {trained param name: grad})."""
    adapted = unwrap(t.model)
    plain = load_model(t.recipe.model).model
    plain_names = dict(plain.named_parameters())
    weights = {n: p.detach() for n, p in adapted.named_parameters()
               if n in plain_names and p.shape == plain_names[n].shape}  # norms, embeddings, head, routers
    leaves = {}  # name in the adapted model -> leaf of the reference

    def leaf(name, p):
        leaves[name] = p.detach().clone().requires_grad_()
        return leaves[name]

    for name, module in adapted.named_modules():
        if isinstance(module, LoraExperts):
            for proj, base in (("gate_up", module.gate_up_base), ("down", module.down_base)):
                A = leaf(f"{name}.{proj}_lora_A", getattr(module, f"{proj}_lora_A"))
                B = leaf(f"{name}.{proj}_lora_B", getattr(module, f"{proj}_lora_B"))
                w = dense(base).to(A.dtype)
                plain_dtype = plain_names[f"{name}.{proj}_proj"].dtype
                weights[f"{name}.{proj}_proj"] = (w + module.scaling * B @ A).to(plain_dtype)
        elif hasattr(module, "lora_A") and "default" in module.lora_A:
            A = leaf(f"{name}.lora_A.default.weight", module.lora_A["default"].weight)
            B = leaf(f"{name}.lora_B.default.weight", module.lora_B["default"].weight)
            w = dense(module.base_layer.weight)
            weights[f"{name}.weight"] = w + module.scaling["default"] * (B @ A).to(w.dtype)
    for name, p in adapted.named_parameters():
        if p.requires_grad and name.endswith("mlp.gate.weight"):  # `target_router`: trained in full
            weights[name] = leaf(name, p)

    class Plain(torch.nn.Module):
        def forward(self, **kw):
            return functional_call(plain, weights, args=(), kwargs=kw, strict=False)

    out = default_loss(Plain(), batch, "causal_lm")
    loss = out.loss_sum / out.count
    names = list(leaves)
    return loss, dict(zip(names, torch.autograd.grad(loss, [leaves[n] for n in names])))


@pytest.mark.parametrize("model", MOE_MODELS)
@pytest.mark.parametrize(("strategy", "dtype", "tol"), [("lora", "float64", 1e-10), ("qlora", "float32", 1e-5)])
def test_adapted_outputs_and_gradients_equal_a_naive_dense_reference(model, strategy, dtype, tol):
    eager = ["model.attn_implementation=eager"] if dtype == "float64" else []
    t = build(model, strategy, "{r: 4, alpha: 8, target_router: true}", *eager, dtype=dtype)
    experts = [m for m in t.model.modules() if isinstance(m, LoraExperts)]
    assert experts and all(isinstance(m.gate_up_base, NF4Experts) == (strategy == "qlora") for m in experts)
    randomise_lora_B(t.model)
    t.model.train()
    batch = padded_batch(t.model.config.vocab_size, [20, 13, 7], 20)  # padding in two rows; top-k is 2
    out = default_loss(t.model, batch, "causal_lm")
    loss = out.loss_sum / out.count
    loss.backward()

    ref_loss, ref_grads = naive_reference(t, batch)
    torch.testing.assert_close(loss, ref_loss.to(loss.dtype), rtol=tol, atol=0)
    trained = {n.removeprefix("base_model.model."): p for n, p in t.model.named_parameters() if p.requires_grad}
    assert set(trained) == set(ref_grads)
    assert any("experts.gate_up_lora_A" in n for n in trained) and any("mlp.gate.weight" in n for n in trained)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(trained[name].grad, ref, rtol=tol, atol=tol * ref.abs().max().item(), msg=name)


def saved_bytes(params: str) -> int:
    t = build("tiny-mixtral", "lora", params, "data.max_length=128", dtype="float32")
    t.model.train()
    batch = padded_batch(t.model.config.vocab_size, [128, 128, 128, 128], 128)
    with SavedTensorMeter(t.model) as meter:
        step_loss(t.strategies, t.model, batch, "causal_lm")
    return meter.bytes


def test_activation_bytes_with_experts_adapted_are_at_most_1_1x_frozen_experts():
    adapted, frozen = saved_bytes("{target_experts: true}"), saved_bytes("{target_experts: false}")
    assert adapted <= 1.1 * frozen, (adapted, frozen)


def upcycled(*extra: str, strategy: str = "lora", params: str = "{r: 8, alpha: 16, target_experts: true}"):
    return load(REPO / "recipes" / "revffn_moe.yaml",
                [f"strategies=[{{name: {strategy}, params: {params}}}]", *SMALL, "data.max_length=32",
                 "train.optimizer=adamw",
                 "train.lr=1.0e-2", "train.warmup_steps=0", "train.schedule=constant", "data.shuffle=false", *extra])


def losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in m]


def test_training_lowers_the_loss_on_an_upcycled_moe(tmp_path):
    r = upcycled("train.max_steps=8", "output.checkpoints=false", "data.max_samples=4", "train.batch_size=4")
    t = Trainer(r, run_dir=tmp_path).setup()
    assert sum(isinstance(m, LoraExperts) for m in t.model.modules()) == t.model.config.num_hidden_layers
    t.train()
    got = losses(tmp_path)
    assert got[-1] < got[0] - 0.05, got  # the same 4 samples every step


def test_stop_and_resume_is_bitwise_equal_and_keeps_the_expert_factors(tmp_path):
    common = ["output.save_every=2", "train.seed=3", "data.shuffle=true"]  # dropout and shuffling use the RNGs
    params = "{r: 4, alpha: 8, dropout: 0.1, target_experts: true, target_router: true}"
    Trainer(upcycled(*common, "train.max_steps=4", params=params), run_dir=tmp_path / "straight").setup().train()
    Trainer(upcycled(*common, "train.max_steps=2", params=params), run_dir=tmp_path / "split").setup().train()
    resumed = Trainer(upcycled(*common, "train.max_steps=4", params=params), run_dir=tmp_path / "split").setup()
    assert resumed.step == 2
    resumed.train()
    assert losses(tmp_path / "straight") == losses(tmp_path / "split")  # bitwise: floats round-trip through JSON
    wa = load_file(tmp_path / "straight" / "checkpoints" / "step-000004" / "trainable.safetensors")
    wb = load_file(tmp_path / "split" / "checkpoints" / "step-000004" / "trainable.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert {"gate_up_lora_A", "gate_up_lora_B", "down_lora_A", "down_lora_B"} <= {k.rsplit(".", 1)[-1] for k in wa}
    assert any(k.endswith("mlp.gate.weight") for k in wa)
    adapter = tmp_path / "split" / "checkpoints" / "step-000004" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()  # peft's save_pretrained did not choke on them


def test_a_4bit_moe_stores_exactly_the_nf4_accounting():
    t = build("tiny-qwen2-moe", "qlora", "{r: 4}", dtype="float32")
    holders = [m for m in t.model.modules() if isinstance(m, NF4Experts)]
    assert len(holders) == 2 * t.model.config.num_hidden_layers
    for h in holders:
        assert h.nbytes == nf4_expert_bytes(h.num_experts, h.out_features, h.in_features, h.double_quant)
    r = t.recipe
    skeleton, strategies, quantized = predict.skeleton(r, resolve_config(r.model).config)
    states = predict.state_bytes(skeleton, quantized, r, double_quant=predict.double_quantized(strategies, r))
    assert sum(states["weights"].values()) == predict.stored_bytes(t.model)
    assert states["weights"]["nf4"] >= sum(h.nbytes for h in holders)


def test_4bit_experts_count_as_the_weights_they_stand_for():
    from memft.models.load import count_params

    full, quantized = build("tiny-mixtral", "lora", "{r: 4}", dtype="float32"), build("tiny-mixtral", "qlora",
                                                                                          "{r: 4}", dtype="float32")
    before, after = count_params(full.model), count_params(quantized.model)
    assert after["expert_params"] == before["expert_params"] > 0
    assert after["total_params"] == before["total_params"]


def test_qwen3_30b_a3b_qlora_weights_are_under_20_gib_on_the_meta_device():
    r = load(REPO / "recipes" / "qlora.yaml", ["model.name=Qwen/Qwen3-30B-A3B", "model.dtype=bfloat16",
                                               "data.max_length=2048", "train.batch_size=1",
                                               "train.gradient_checkpointing=true"])
    config = resolve_config(r.model, fallback=predict.shipped_config).config
    skeleton, strategies, quantized = predict.skeleton(r, config)
    states = predict.state_bytes(skeleton, quantized, r, double_quant=predict.double_quantized(strategies, r))
    holders = [m for m in skeleton.modules() if isinstance(m, NF4Experts)]
    assert len(holders) == 2 * config.num_hidden_layers
    experts = sum(nf4_expert_bytes(h.num_experts, h.out_features, h.in_features, True) for h in holders)
    linears = sum(predict.nf4_bytes(p.numel(), True) for p in skeleton.parameters() if id(p) in quantized)
    assert states["weights"]["nf4"] == experts + linears
    assert "uint8" not in states["weights"]  # the holders' buffers are not counted twice
    frozen32 = [n for n, p in skeleton.named_parameters() if p.dtype == torch.float32 and not p.requires_grad]
    assert frozen32 == []
    assert sum(states["weights"].values()) < 20 * 2**30, states["weights"]
    assert states["params"] > 30e9  # the 4-bit experts still count as parameters


@pytest.mark.parametrize("strategy", ["lora", "qlora"])
def test_a_bf16_moe_keeps_its_frozen_base_in_bf16_and_trains_in_bf16(strategy, tmp_path):
    r = load(REPO / "recipes" / "lora.yaml", ["model.name=tiny-mixtral", "model.dtype=bfloat16",
                                              f"strategies=[{{name: {strategy}, params: {{r: 4, alpha: 8}}}}]",
                                              *SMALL, "data.max_length=128", "data.max_samples=4",
                                              "train.max_steps=4", "train.lr=2.0e-2",
                                              "train.autocast='off'", "output.checkpoints=false",
                                              "train.warmup_steps=0", "train.schedule=constant"])
    t = Trainer(r, run_dir=tmp_path).setup()
    frozen = {p.dtype for p in t.model.parameters() if not p.requires_grad and p.is_floating_point()}
    trained = {p.dtype for p in t.model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}
    t.train()
    got = losses(tmp_path)
    assert all(torch.isfinite(torch.tensor(got))) and got[-1] < got[0], got


COMBOS = {
    "tokentune": "{name: tokentune, params: {fraction: 0.5}}",
    "lcsb": "{name: lcsb, params: {groups: 2}}",
    "meft": "{name: meft, params: {width: 64, experts: 8, topk: 4}}",
    "revffn": "{name: revffn}",
}


@pytest.mark.parametrize("strategy", ["lora", "qlora"])
@pytest.mark.parametrize("other", sorted(COMBOS))
def test_other_strategies_on_top_of_moe_lora_and_qlora(strategy, other):
    r = load(REPO / "recipes" / "lora.yaml", ["model.name=tiny-mixtral", "model.dtype=float32",
                                              f"strategies=[{{name: {strategy}, params: {{r: 4}}}}, {COMBOS[other]}]",
                                              *SMALL, "data.max_length=128"])
    strategies = registry.compose(r)
    t = Trainer(r, run_dir="unused").setup(for_training=False)
    assert [s.name for s in t.strategies] == [s.name for s in strategies]
    assert any(isinstance(m, LoraExperts) for m in t.model.modules())
    randomise_lora_B(t.model)
    t.model.train()
    batch = padded_batch(t.model.config.vocab_size, [20, 13], 20)
    for s in t.strategies:
        batch = s.on_step_start(1, batch)
    out = step_loss(t.strategies, t.model, batch, "causal_lm")
    (out.loss_sum / out.count).backward()
    for s in t.strategies:
        s.after_backward(1)
    expert_grads = [p.grad for n, p in t.model.named_parameters() if "experts.gate_up_lora" in n]
    assert torch.isfinite(out.loss_sum)
    assert any(g is not None and g.abs().sum() > 0 for g in expert_grads)


def test_meft_keys_from_the_ffn_under_qlora_are_refused_at_validate():
    from memft.errors import RecipeError

    meft = "{name: meft, params: {width: 64, experts: 8, topk: 4, key_init: ffn}}"
    for model in ("tiny-mixtral", "tiny-llama"):  # 4-bit experts, or 4-bit nn.Linear up_proj
        with pytest.raises(RecipeError, match="meft `key_init: ffn` samples its keys from the FFN's full-precision "
                                              "weights, which `qlora` stores in 4 bits; use `key_init: random`"):
            load(REPO / "recipes" / "lora.yaml", [f"model.name={model}", f"strategies=[{{name: qlora}}, {meft}]"])
    load(REPO / "recipes" / "lora.yaml", ["model.name=tiny-mixtral", f"strategies=[{{name: lora}}, {meft}]"])
