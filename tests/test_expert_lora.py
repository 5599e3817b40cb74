"""Expert LoRA without a delta weight (memft/models/expert_lora.py) against a naive dense reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memft.models.expert_lora as expert_lora_module
from memft.models.expert_lora import LoraExperts, expert_lora, is_fused_experts, wrap_experts
from memft.train.meters import SavedTensorMeter

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
MOE_CONFIGS = ["tiny-mixtral.json", "tiny-qwen2-moe.json", "tiny-olmoe.json"]


def naive_experts(x, top_k_index, top_k_weights, gate_up, down, gate_up_A, gate_up_B, down_A, down_B, s, act):
    """Per token, per chosen expert: dense `F.linear(x, W_e + s B_e A_e)`, plain autograd."""
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros_like(x[t])
        for j in range(top_k_index.shape[1]):
            e = int(top_k_index[t, j])
            gate, up = F.linear(x[t], gate_up[e] + s * gate_up_B[e] @ gate_up_A[e]).chunk(2, dim=-1)
            y = F.linear(act(gate) * up, down[e] + s * down_B[e] @ down_A[e])
            acc = acc + top_k_weights[t, j] * y
        rows.append(acc)
    return torch.stack(rows)


def random_problem(T, k, E=4, H=6, I=5, r=3, dtype=torch.float64, index=None, seed=0):
    """Leaf tensors for one experts call: x, weights, base weights and LoRA factors (B non-zero)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)  # noqa: E731
    if index is None:
        index = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    leaves = dict(x=rand(T, H), top_k_weights=rand(T, k).softmax(-1), gate_up=rand(E, 2 * I, H), down=rand(E, H, I),
                  gate_up_A=rand(E, r, H), gate_up_B=rand(E, 2 * I, r), down_A=rand(E, r, I), down_B=rand(E, H, r))
    for t in leaves.values():
        t.requires_grad_()
    return index, leaves


def outputs_and_grads(fn, index, leaves, s=0.7, act=F.silu):
    args = {name: t.detach().clone().requires_grad_(t.requires_grad) for name, t in leaves.items()}
    out = fn(args["x"], index, args["top_k_weights"], args["gate_up"], args["down"], args["gate_up_A"],
             args["gate_up_B"], args["down_A"], args["down_B"], s, act)
    # a non-uniform upstream gradient, so every output element matters
    upstream = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    (out * upstream).sum().backward()
    return out, {name: t.grad for name, t in args.items() if t.requires_grad}


def assert_matches(index, leaves, rtol, atol=0.0, act=F.silu):
    out, grads = outputs_and_grads(expert_lora, index, leaves, act=act)
    ref_out, ref_grads = outputs_and_grads(naive_experts, index, leaves, act=act)
    torch.testing.assert_close(out, ref_out, rtol=rtol, atol=atol)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("k", [1, 2])
def test_outputs_and_grads_equal_dense_reference_float64(k):
    index, leaves = random_problem(T=7, k=k)
    assert_matches(index, leaves, rtol=1e-10, atol=1e-12)


def test_float32_uneven_counts_idle_experts_and_gelu():
    # expert 0 gets 5 slots, expert 2 one, experts 1 and 3 none
    index = torch.tensor([[0, 2], [0, 4], [4, 0], [0, 4], [0, 5]])
    _, leaves = random_problem(T=5, k=2, E=6, dtype=torch.float32, index=index)
    assert_matches(index, leaves, rtol=1e-5, atol=1e-5, act=F.gelu)


def test_a_single_token_top1():
    index, leaves = random_problem(T=1, k=1)
    assert_matches(index, leaves, rtol=1e-10, atol=1e-12)


def test_frozen_base_weights_get_no_gradient():
    index, leaves = random_problem(T=4, k=2)
    for name in ("gate_up", "down", "x"):
        leaves[name].requires_grad_(False)
    _, grads = outputs_and_grads(expert_lora, index, leaves)
    assert set(grads) == {"top_k_weights", "gate_up_A", "gate_up_B", "down_A", "down_B"}
    _, ref = outputs_and_grads(naive_experts, index, leaves)
    for name in grads:
        torch.testing.assert_close(grads[name], ref[name], rtol=1e-10, atol=1e-12)


def test_adapter_dropout_trains_and_is_off_in_eval():
    index, leaves = random_problem(T=6, k=2)
    args = [leaves[n] for n in ("x", "top_k_weights", "gate_up", "down", "gate_up_A", "gate_up_B", "down_A",
                                "down_B")]
    plain = expert_lora(args[0], index, *args[1:], scaling=0.7, act_fn=F.silu)
    kept = expert_lora(args[0], index, *args[1:], scaling=0.7, act_fn=F.silu, dropout=0.5, training=False)
    torch.testing.assert_close(kept, plain, rtol=0, atol=0)
    dropped = expert_lora(args[0], index, *args[1:], scaling=0.7, act_fn=F.silu, dropout=0.5, training=True)
    assert not torch.allclose(dropped, plain)
    dropped.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in args)


# --- through real tiny MoE models ---------------------------------------------------------------------------


def tiny_moe(config_file: str, dtype=torch.float64, implementation="eager", seed=0, layers=2):
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = json.loads((CONFIGS / config_file).read_text())
    spec.pop("_memft")
    spec["num_hidden_layers"] = layers  # two are enough to chain one MoE layer's input gradient into another
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**spec), dtype=dtype,
                                             experts_implementation=implementation)
    return model


def padded_batch(vocab=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (2, 8), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 5:] = 0  # the second row is padded
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


class DenseLoraExperts(nn.Module):
    """The naive reference of a `LoraExperts`: the same parameters, `W_e + s B_e A_e` formed densely."""

    def __init__(self, lora: LoraExperts):
        super().__init__()
        self.lora = lora

    def forward(self, hidden_states, top_k_index, top_k_weights):
        m = self.lora
        return naive_experts(hidden_states, top_k_index, top_k_weights, m.gate_up_proj, m.down_proj,
                             m.gate_up_lora_A, m.gate_up_lora_B, m.down_lora_A, m.down_lora_B, m.scaling, m.act_fn)


def swap(model: nn.Module, make) -> None:
    """Replace every module named `*.experts` by `make(module)`."""
    for name, module in list(model.named_modules()):
        if name.endswith(".experts"):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, make(module))


@pytest.mark.parametrize("config_file", MOE_CONFIGS)
def test_wrapped_model_equals_original_then_dense_reference(config_file):
    model = tiny_moe(config_file)
    batch = padded_batch()
    with torch.no_grad():
        original = model(**batch).logits
    wrapped = wrap_experts(model, r=4, alpha=8)
    assert len(wrapped) == model.config.num_hidden_layers
    assert not any(is_fused_experts(m) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, original, rtol=1e-10, atol=1e-12)  # B = 0

    loras = [m for m in model.modules() if isinstance(m, LoraExperts)]
    for m in loras:
        nn.init.normal_(m.gate_up_lora_B, std=0.5)
        nn.init.normal_(m.down_lora_B, std=0.5)
    trainable = [p for m in loras for p in m.parameters() if p.requires_grad]
    assert len(trainable) == 4 * len(loras)  # A and B for gate_up and down; the base weights stay frozen

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in trainable]

    loss, grads = loss_and_grads()
    swap(model, DenseLoraExperts)
    ref_loss, ref_grads = loss_and_grads()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=0)
    for grad, ref in zip(grads, ref_grads):
        assert ref.abs().max() > 0
        torch.testing.assert_close(grad, ref, rtol=1e-10, atol=1e-13)


def test_router_and_trainable_base_weights_get_the_reference_gradients():
    model = tiny_moe("tiny-mixtral.json")
    wrap_experts(model, r=2, alpha=4, rslora=True)
    loras = [m for m in model.modules() if isinstance(m, LoraExperts)]
    for m in loras:
        nn.init.normal_(m.gate_up_lora_B, std=0.5)
        nn.init.normal_(m.down_lora_B, std=0.5)
        m.gate_up_proj.requires_grad_(True)
        m.down_proj.requires_grad_(True)
    assert loras[0].scaling == 4 / 2 ** 0.5
    watched = [p for m in loras for p in (m.gate_up_proj, m.down_proj)]
    watched += [layer.mlp.gate.weight for layer in model.model.layers]
    batch = padded_batch(seed=1)

    def grads():
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        return [p.grad.clone() for p in watched]

    ours = grads()
    swap(model, DenseLoraExperts)
    for grad, ref in zip(ours, grads()):
        torch.testing.assert_close(grad, ref, rtol=1e-10, atol=1e-13)


def test_merge_gives_a_plain_experts_module_with_the_same_forward():
    model = tiny_moe("tiny-qwen2-moe.json")
    experts = model.model.layers[0].mlp.experts
    lora = LoraExperts(experts, r=3, alpha=5)
    nn.init.normal_(lora.gate_up_lora_B)
    nn.init.normal_(lora.down_lora_B)
    index, leaves = random_problem(T=9, k=2, E=experts.num_experts, H=experts.hidden_dim)
    x, weights = leaves["x"].detach(), leaves["top_k_weights"].detach()
    with torch.no_grad():
        adapted = lora(x, index, weights)
        for name, merged in lora.merge().items():
            setattr(experts, name, nn.Parameter(merged))
        torch.testing.assert_close(experts(x, index, weights), adapted, rtol=1e-10, atol=1e-12)


class Float32Storage:
    """A stand-in for other weight storage (e.g. 4-bit): only `expert(e, dtype)`."""

    def __init__(self, fused: torch.Tensor):
        self.fused = fused.detach().clone()
        self.reads: list[int] = []

    def expert(self, e: int, dtype: torch.dtype) -> torch.Tensor:
        self.reads.append(e)
        return self.fused[e].to(dtype)


def test_other_weight_storage_plugs_in_through_expert():
    model = tiny_moe("tiny-olmoe.json")
    experts = model.model.layers[0].mlp.experts
    storage = Float32Storage(experts.gate_up_proj), Float32Storage(experts.down_proj)
    plain = LoraExperts(experts, r=2, alpha=2)
    stored = LoraExperts(experts, r=2, alpha=2, gate_up=storage[0], down=storage[1])
    stored.load_state_dict({k: v for k, v in plain.state_dict().items() if "lora" in k}, strict=False)
    nn.init.normal_(plain.down_lora_B)
    stored.down_lora_B.data.copy_(plain.down_lora_B)
    assert "gate_up_proj" not in dict(stored.named_parameters())
    index = torch.tensor([[1, 3], [3, 1], [5, 1]])
    x, weights = torch.randn(3, experts.hidden_dim, dtype=torch.float64), torch.rand(3, 2, dtype=torch.float64)
    torch.testing.assert_close(stored(x, index, weights), plain(x, index, weights), rtol=1e-12, atol=0)
    assert sorted(set(storage[0].reads)) == [1, 3, 5]  # one expert at a time, only the routed ones
    torch.testing.assert_close(stored.merge()["down_proj"], plain.merge()["down_proj"].float())


# --- activation bytes -----------------------------------------------------------------------------------------

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def activation_bytes(setup: str, implementation: str = "grouped_mm") -> int:
    """Bytes saved for backward by one training forward of tiny Mixtral with LoRA (r 8) on attention, and on
    the experts: not at all ("frozen"), through `LoraExperts` ("ours"), through peft's `target_parameters`."""
    from peft import LoraConfig, get_peft_model

    model = tiny_moe("tiny-mixtral.json", dtype=torch.float32, implementation=implementation)
    experts = ["experts.gate_up_proj", "experts.down_proj"] if setup == "peft" else None
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=ATTENTION,
                                             target_parameters=experts))
    if setup == "ours":
        wrap_experts(model, r=8, alpha=16)
    model.train()
    batch = padded_batch()
    batch = {k: v.repeat(2, 4) for k, v in batch.items()}  # 4 x 32 tokens
    with SavedTensorMeter(model, exclude=batch.values()) as meter:
        loss = model(**batch).loss
    loss.backward()
    return meter.bytes


def test_activation_bytes_stay_within_1_1x_of_frozen_experts():
    frozen, ours, peft_path = (activation_bytes(s) for s in ("frozen", "ours", "peft"))
    print(f"\nactivation bytes (grouped_mm): frozen {frozen}, LoraExperts {ours} ({ours / frozen:.3f}x), "
          f"peft target_parameters {peft_path} ({peft_path / frozen:.3f}x)")
    assert ours <= 1.1 * frozen
    assert ours < peft_path


def test_autocast_runs_the_experts_in_bfloat16_and_returns_the_input_dtype():
    index, leaves = random_problem(T=6, k=2, dtype=torch.float32)
    args = {name: t.detach().requires_grad_() for name, t in leaves.items()}
    names = ("top_k_weights", "gate_up", "down", "gate_up_A", "gate_up_B", "down_A", "down_B")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = expert_lora(args["x"], index, *(args[n] for n in names), scaling=0.7, act_fn=F.silu)
    out.sum().backward()
    ref = naive_experts(leaves["x"].detach(), index, *(leaves[n].detach() for n in names), 0.7, F.silu)
    assert out.dtype == torch.float32 and args["gate_up_A"].grad.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05 * ref.abs().max().item())


def test_an_unsupported_experts_layout_is_refused_in_one_sentence():
    from memft.errors import UserError

    experts = tiny_moe("tiny-mixtral.json").model.layers[0].mlp.experts
    experts.is_transposed = True
    with pytest.raises(UserError, match="is_transposed=True"):
        LoraExperts(experts, r=2, alpha=2)


def test_storage_modules_are_registered_so_they_follow_the_model():
    class ModuleStorage(nn.Module):
        def __init__(self, fused):
            super().__init__()
            self.register_buffer("fused", fused.detach().clone())

        def expert(self, e, dtype):
            return self.fused[e].to(dtype)

    experts = tiny_moe("tiny-mixtral.json").model.layers[0].mlp.experts
    lora = LoraExperts(experts, r=2, alpha=2, gate_up=ModuleStorage(experts.gate_up_proj))
    assert "gate_up_proj_storage.fused" in lora.state_dict() and "down_proj" in lora.state_dict()
    assert lora.to(torch.float32).gate_up_base.fused.dtype == torch.float32


# --- the grouped path (one torch._grouped_mm per projection) against the per-expert loop ------------------------

# an index with idle experts (1 and 3 get no slot) and uneven counts; float32 rows of 16 bytes (H 8, I 4, r 4)
UNEVEN = torch.tensor([[0, 2], [0, 4], [4, 0], [0, 4], [0, 5], [2, 5], [5, 0]])
ALIGNED = dict(E=6, H=8, I=4, r=4, dtype=torch.float32)


@pytest.fixture
def grouped_calls(monkeypatch):
    """Counts the calls to `torch._grouped_mm`, so a test knows which path ran."""
    calls = []
    real = torch._grouped_mm

    def spy(*args, **kwargs):
        calls.append(args[1].dim())
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", spy)
    return calls


def on_path(monkeypatch, mode, fn, *args, **kwargs):
    monkeypatch.setattr(expert_lora_module, "GROUPED", mode)
    return fn(*args, **kwargs)


def assert_all_close(got, ref, rtol=1e-5, atol=1e-6):
    (out, grads), (ref_out, ref_grads) = got, ref
    torch.testing.assert_close(out, ref_out, rtol=rtol, atol=atol)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("act", [F.silu, F.gelu])
def test_grouped_path_equals_the_loop_and_the_dense_reference(monkeypatch, grouped_calls, act):
    _, leaves = random_problem(T=7, k=2, index=UNEVEN, **ALIGNED)  # every leaf, base weights too, needs grad
    loop = on_path(monkeypatch, "never", outputs_and_grads, expert_lora, UNEVEN, leaves, act=act)
    assert grouped_calls == []
    grouped = on_path(monkeypatch, "always", outputs_and_grads, expert_lora, UNEVEN, leaves, act=act)
    assert 3 in grouped_calls and 2 in grouped_calls  # the 2-D x 3-D products and the 2-D x 2-D weight gradients
    assert set(grouped[1]) == {"x", "top_k_weights", "gate_up", "down", "gate_up_A", "gate_up_B", "down_A", "down_B"}
    assert_all_close(grouped, loop)
    assert_all_close(grouped, outputs_and_grads(naive_experts, UNEVEN, leaves, act=act), atol=1e-5)
    for name in ("gate_up_A", "gate_up_B", "down_A", "down_B", "gate_up", "down"):  # idle experts: zero, not unset
        assert grouped[1][name][[1, 3]].eq(0).all(), name


def test_grouped_path_with_frozen_bases_top1_and_the_expert_parallel_sentinel(monkeypatch):
    index = torch.tensor([[3], [6], [0], [3], [6]])  # 6 = num_experts: a slot no expert computes
    _, leaves = random_problem(T=5, k=1, index=index, **ALIGNED)
    for name in ("gate_up", "down"):
        leaves[name].requires_grad_(False)
    loop, grouped = (on_path(monkeypatch, mode, outputs_and_grads, expert_lora, index, leaves)
                     for mode in ("never", "always"))
    assert set(grouped[1]) == {"x", "top_k_weights", "gate_up_A", "gate_up_B", "down_A", "down_B"}
    assert_all_close(grouped, loop)
    assert grouped[0][[1, 4]].eq(0).all()


def naive_dropout_experts(x, x_lora, h_mask, p, top_k_index, top_k_weights, gate_up, down, gate_up_A, gate_up_B,
                          down_A, down_B, s, act):
    """`naive_experts` with the adapters reading `x_lora` (dropped x) and `h * mask / (1 - p)`; `h_mask` has one
    row per slot in expert-sorted order, as `expert_lora` draws it."""
    k = top_k_index.shape[1]
    position = torch.argsort(torch.argsort(top_k_index.reshape(-1), stable=True))  # slot -> its sorted row
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros_like(x[t])
        for j in range(k):
            e = int(top_k_index[t, j])
            gate, up = (F.linear(x[t], gate_up[e]) + s * F.linear(x_lora[t], gate_up_B[e] @ gate_up_A[e])).chunk(2)
            h = act(gate) * up
            h_in = h * h_mask[position[t * k + j]] / (1 - p)
            acc = acc + top_k_weights[t, j] * (F.linear(h, down[e]) + s * F.linear(h_in, down_B[e] @ down_A[e]))
        rows.append(acc)
    return torch.stack(rows)


def test_grouped_path_with_adapter_dropout_equals_the_loop_and_the_reference(monkeypatch):
    p = 0.3
    _, leaves = random_problem(T=7, k=2, index=UNEVEN, **ALIGNED)

    def ours(x, index, *args):
        torch.manual_seed(5)  # the same masks on every path
        return expert_lora(x, index, *args[:-2], scaling=args[-2], act_fn=args[-1], dropout=p, training=True)

    def reference(x, index, *args):
        torch.manual_seed(5)  # replay expert_lora's draws: dropout on x, then one bernoulli mask row per slot
        x_lora = F.dropout(x, p, training=True)
        h_mask = torch.empty(index.numel(), ALIGNED["I"], dtype=torch.bool).bernoulli_(1 - p)
        return naive_dropout_experts(x, x_lora, h_mask, p, index, *args)

    loop, grouped = (on_path(monkeypatch, mode, outputs_and_grads, ours, UNEVEN, leaves)
                     for mode in ("never", "always"))
    assert_all_close(grouped, loop)
    assert_all_close(grouped, outputs_and_grads(reference, UNEVEN, leaves), atol=1e-5)
    assert not torch.allclose(grouped[0], outputs_and_grads(expert_lora, UNEVEN, leaves)[0])  # dropout did act


def test_grouped_path_under_bfloat16_autocast_agrees_with_the_loop(monkeypatch, grouped_calls):
    # bfloat16 base weights (so no whole-layer cast), float32 input and factors; bf16 rows of 16 bytes.
    # The loop adds the LoRA product into the base's inside one addmm (one rounding), the grouped path adds two
    # rounded products, so in bf16 they agree to bf16's rounding, not bitwise.
    _, leaves = random_problem(T=7, k=2, index=UNEVEN, E=6, H=16, I=8, r=8, dtype=torch.float32)
    for name in ("gate_up", "down"):
        leaves[name] = leaves[name].detach().to(torch.bfloat16).requires_grad_()

    def autocast(*args):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return expert_lora(*args[:-2], scaling=args[-2], act_fn=args[-1])

    loop = on_path(monkeypatch, "never", outputs_and_grads, autocast, UNEVEN, leaves)
    grouped = on_path(monkeypatch, "always", outputs_and_grads, autocast, UNEVEN, leaves)
    assert grouped_calls and grouped[0].dtype == torch.float32 and grouped[1]["gate_up"].dtype == torch.bfloat16
    ref_leaves = {name: t.detach().double().requires_grad_() for name, t in leaves.items()}
    reference = outputs_and_grads(naive_experts, UNEVEN, ref_leaves, act=F.silu)
    for got in (loop, grouped):
        for name, value, ref in (("out", got[0], reference[0]), *((n, got[1][n], reference[1][n]) for n in got[1])):
            scale = ref.abs().max().item()
            torch.testing.assert_close(value.double(), ref, rtol=0.03, atol=0.03 * scale, msg=name)
    assert not torch.equal(loop[0], torch.zeros_like(loop[0]))


def test_both_paths_save_the_same_tensors_for_backward(monkeypatch):
    _, leaves = random_problem(T=7, k=2, index=UNEVEN, **ALIGNED)
    args = [leaves[n] for n in ("x", "top_k_weights", "gate_up", "down", "gate_up_A", "gate_up_B", "down_A",
                                "down_B")]

    def saved(mode):
        monkeypatch.setattr(expert_lora_module, "GROUPED", mode)
        layouts = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: layouts.append((t.shape, t.dtype)) or t, lambda t: t):
            torch.manual_seed(0)
            expert_lora(args[0], UNEVEN, *args[1:], scaling=0.7, act_fn=F.silu, dropout=0.2, training=True)
        return layouts

    loop = saved("never")
    assert len(loop) > 8 and saved("always") == loop


def test_the_path_follows_dtype_storage_sizes_and_the_device_default(monkeypatch, grouped_calls):
    from memft.models.expert_lora import _grouped_reason

    def reason(**problem):
        index, leaves = random_problem(T=4, k=2, **{**ALIGNED, **problem})
        x, names = leaves["x"], ("gate_up_A", "gate_up_B", "down_A", "down_B")
        return _grouped_reason(x, x.dtype, (leaves["gate_up"], leaves["down"]), tuple(leaves[n] for n in names))

    assert reason() is None
    assert "float64" in reason(dtype=torch.float64)  # the float64 references always take the loop
    assert "hidden 6" in reason(H=6)
    assert "rank 3" in reason(r=3)
    index, leaves = random_problem(T=4, k=2, **ALIGNED)
    storage = Float32Storage(leaves["gate_up"]), Float32Storage(leaves["down"])
    factors = tuple(leaves[n] for n in ("gate_up_A", "gate_up_B", "down_A", "down_B"))
    assert "stored otherwise" in _grouped_reason(leaves["x"], torch.float32, storage, factors)
    assert "compute dtype" in _grouped_reason(leaves["x"], torch.bfloat16, (leaves["gate_up"], leaves["down"]),
                                              factors)
    # "auto" on CPU keeps the loop (measured faster there); "always" refuses what cannot be grouped
    on_path(monkeypatch, "auto", outputs_and_grads, expert_lora, index, leaves)
    assert grouped_calls == []
    index, leaves = random_problem(T=4, k=2)
    with pytest.raises(RuntimeError, match="float64"):
        on_path(monkeypatch, "always", outputs_and_grads, expert_lora, index, leaves)


def test_the_probe_refuses_an_op_that_raises_or_computes_otherwise(monkeypatch):
    from memft.models.expert_lora import _grouped_mm_works

    real = torch._grouped_mm
    cases = {"raises": lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("strides should be multiple of 16 bytes")),
             "off by one": lambda *a, **kw: real(*a, **kw) + 1, "exact": real}
    for case, op in cases.items():
        monkeypatch.setattr(torch, "_grouped_mm", op)
        _grouped_mm_works.cache_clear()
        assert _grouped_mm_works(torch.device("cpu"), torch.float32) == (case == "exact"), case
    _grouped_mm_works.cache_clear()


def test_a_wrapped_tiny_mixtral_trains_the_same_on_both_paths(monkeypatch):
    model = tiny_moe("tiny-mixtral.json", dtype=torch.float32)  # H 64, I 128, r 4: 16-byte float32 rows
    wrap_experts(model, r=4, alpha=8)
    loras = [m for m in model.modules() if isinstance(m, LoraExperts)]
    for m in loras:
        nn.init.normal_(m.gate_up_lora_B, std=0.5)
        nn.init.normal_(m.down_lora_B, std=0.5)
    trainable = [p for m in loras for p in m.parameters() if p.requires_grad]
    batch = padded_batch()

    def loss_and_grads(mode):
        monkeypatch.setattr(expert_lora_module, "GROUPED", mode)
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {str(i): p.grad.clone() for i, p in enumerate(trainable)}

    assert_all_close(loss_and_grads("always"), loss_and_grads("never"))


@pytest.mark.parametrize("mode", ["never", "always"])
def test_no_routed_slot_at_all_gives_zeros_on_both_paths(monkeypatch, mode):
    for index in (torch.full((2, 2), 6), torch.zeros(0, 2, dtype=torch.long)):  # only the sentinel; no tokens
        _, leaves = random_problem(T=index.shape[0], k=2, index=index, **ALIGNED)
        out, grads = on_path(monkeypatch, mode, outputs_and_grads, expert_lora, index, leaves)
        assert out.shape == (index.shape[0], ALIGNED["H"]) and not out.any()
        assert not any(g.any() for g in grads.values())
