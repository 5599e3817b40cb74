"""RevFFN's recovery teacher streamed from host memory (`recovery.teacher: host`): its decoder layers stay in host
memory and each is put on the device only for its own forward; the distillation loss and gradients are bitwise those
of the resident teacher, and `memft profile` places the teacher's bytes accordingly."""

from pathlib import Path

import torch
from test_revffn import build, padded_batch

from memft.models.blocks import decoder_body
from memft.profile import predict
from memft.recipe import load
from memft.strategies.revffn import teacher as teacher_module

REPO = Path(__file__).resolve().parents[1]


def trainer(where: str, dtype: str = "float64"):
    return build("tiny-mixtral", "[{name: full}, {name: revffn, params: {coupling: additive, recovery: {steps: 5, "
                 f"temperature: 2.0, teacher: {where}}}}}}}]", dtype=dtype)


def distill_loss_and_grads(t, batch):
    t.model.train()
    t.model.zero_grad(set_to_none=True)
    out = t._loss(batch)
    out.loss_sum.backward()
    assert t.strategies[-1].phase == "distill"
    return out.loss_sum.detach(), [p.grad.clone() for p in t.model.parameters() if p.requires_grad]


def test_streamed_teacher_is_bitwise_the_resident_one_and_holds_one_layer_at_a_time(monkeypatch):
    # on the CPU host and device are the same memory: make every upload a real copy, as on a GPU
    monkeypatch.setattr(teacher_module, "_copy_to", lambda t, device: t.clone())
    resident, streamed = trainer("device"), trainer("host")
    assert not resident.strategies[-1].teacher_streamed and streamed.strategies[-1].teacher_streamed
    teacher = streamed.strategies[-1].teacher
    layers = decoder_body(teacher).layers
    at_rest = [[p.data_ptr() for p in layer.parameters()] for layer in layers]
    student = {p.data_ptr() for p in streamed.model.parameters()}
    assert not student & {ptr for layer in at_rest for ptr in layer}  # a copy, not the trained weights

    seen = []  # per layer, during its forward: which layers' weights are not their resting host tensors

    def check(index):
        def hook(module, args):
            seen.append([i for i, layer in enumerate(layers)
                         if [p.data_ptr() for p in layer.parameters()] != at_rest[i]])
        return hook

    for i, layer in enumerate(layers):  # runs after the upload hook, inside the layer's forward
        layer.self_attn.register_forward_pre_hook(check(i))

    batch = padded_batch(resident.model.config.vocab_size, [24, 17], 24)
    want, want_grads = distill_loss_and_grads(resident, batch)
    got, got_grads = distill_loss_and_grads(streamed, batch)
    assert seen == [[i] for i in range(len(layers))]  # each layer on the "device" only during its own forward
    assert [[p.data_ptr() for p in layer.parameters()] for layer in layers] == at_rest  # and released after it
    assert want > 0 and torch.equal(got, want)
    assert len(got_grads) == len(want_grads) and all(torch.equal(a, b) for a, b in zip(got_grads, want_grads))


def test_auto_streams_only_on_a_gpu():
    t = trainer("auto", dtype="float32")
    s = t.strategies[-1]
    assert not s.teacher_streamed  # this CPU: host and device are the same memory
    assert s._teacher_on_host(torch.device("cuda")) and not s._teacher_on_host(torch.device("cpu"))
    assert any("on the device)" in n for n in t.notes if "distil toward" in n)


def test_profile_places_a_streamed_teacher_on_the_host():
    def recipe(where: str):
        return load(REPO / "recipes" / "revffn_moe.yaml", ["train.batch_size=1", "data.max_length=64",
                                                           "strategies.1.params.recovery.steps=3",
                                                           f"strategies.1.params.recovery.teacher={where}"])

    def size(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    r = recipe("auto")
    teacher = predict.skeleton(r, predict.resolve_config(r.model, fallback=predict.shipped_config).config)[1][-1].teacher
    layers = [size([*layer.parameters(), *layer.buffers()]) for layer in decoder_body(teacher).layers]
    whole = size([*teacher.parameters(), *teacher.buffers()])
    assert len(layers) > 1 and whole > sum(layers)

    on_gpu, resident, cpu = (predict.profile(recipe("auto"), "cuda"), predict.profile(recipe("device"), "cuda"),
                             predict.profile(recipe("auto"), "cpu"))
    key = "revffn recovery teacher"
    assert resident.strategy_device[key] == cpu.strategy_device[key] == whole
    assert key + " (decoder layers)" not in resident.host and key + " (decoder layers)" not in cpu.host
    assert on_gpu.strategy_device[key] == whole - sum(layers) + max(layers)  # all but the layers, and one layer
    assert on_gpu.host[key + " (decoder layers)"] == sum(layers)
    assert on_gpu.peak == resident.peak - (sum(layers) - max(layers))
