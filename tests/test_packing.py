"""`data.pack: true`: several whole examples per row, each attending only to itself, no loss across examples.

The data side: rows of at most `max_length`, every example's tokens exactly once, the boundary labels, a
deterministic packing. The model side, in float64 with sdpa: a packed batch's summed loss and every parameter's
gradient equal those of the same examples run one by one (summed), within 1e-10, for every strategy.
"""

from pathlib import Path

import pytest
import torch

from memft.data import build as build_data
from memft.data.batching import Batcher, collate, count_targets, count_tokens, model_inputs, segment_ids, token_mask
from memft.data.formats import IGNORE_INDEX, encode, pack_examples
from memft.models.load import load_tokenizer
from memft.recipe import load
from memft.strategies.tokentune import POSITIONS_KEY
from memft.train.loop import Trainer, step_loss

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-10


# ---------------------------------------------------------------------------------- data


def unpack(row: dict) -> list[dict]:
    """A packed row split back into its examples, at each position 0."""
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
    return [{k: row[k][a:b] for k in ("input_ids", "labels", "position_ids")} for a, b in zip(starts, starts[1:])]


def check_packing(examples: list[dict], rows: list[dict], max_length: int) -> None:
    assert all(len(r["input_ids"]) == len(r["labels"]) == len(r["position_ids"]) <= max_length for r in rows)
    parts = [p for r in rows for p in unpack(r)]
    assert sorted(map(lambda p: p["input_ids"], parts)) == sorted(e["input_ids"] for e in examples)  # each once
    for p in parts:
        assert p["position_ids"] == list(range(len(p["input_ids"])))
        assert p["labels"][0] == IGNORE_INDEX  # the previous example's last token predicts nothing here
    # the labels of every example, except its never-predicted first, are unchanged
    want = sorted((e["input_ids"], e["labels"][1:]) for e in examples)
    assert sorted((p["input_ids"], p["labels"][1:]) for p in parts) == want


@pytest.mark.parametrize("recipe", ["quickstart.yaml", "chat.yaml"])
def test_instruction_and_chat_packing_keeps_every_example_once(recipe):
    r = load(REPO / "recipes" / recipe)
    tok = load_tokenizer(r.model)
    plain = build_data(r.data, tok, seed=0)
    packed = build_data(r.data.model_copy(update={"pack": True}), tok, seed=0)
    check_packing(plain.train, packed.train, r.data.max_length)
    check_packing(plain.eval, packed.eval, r.data.max_length)
    assert len(packed.train) < len(plain.train)
    assert f"{len(plain.train)} (in {len(packed.train)} packed rows) train" in packed.source


def test_text_packing_truncates_first_then_packs():
    r = load(REPO / "recipes" / "quickstart.yaml", ["data.format=text", "data.text_field=question",
                                                   "data.max_length=48", "data.eval_split=null"])
    tok = load_tokenizer(r.model)
    plain = build_data(r.data, tok, seed=0)
    packed = build_data(r.data.model_copy(update={"pack": True}), tok, seed=0)
    assert max(len(e["input_ids"]) for e in plain.train) == 48  # some were cut
    check_packing(plain.train, packed.train, 48)


def test_best_fit_decreasing_order_is_deterministic():
    examples = [{"input_ids": [i] * n, "labels": [i] * n} for i, n in enumerate([3, 8, 5, 2, 8, 4, 1])]
    rows = pack_examples(examples, 10)
    # longest first: 8 (ex 1), 8 (ex 4) and 5 (ex 2) open rows; 4 fits only beside the 5; 3 opens a row; 2 goes to
    # the first row with 2 left (ex 1's), 1 to the row with 1 left (ex 2's)
    assert [[p["input_ids"][0] for p in unpack(r)] for r in rows] == [[1, 3], [4], [2, 5, 6], [0]]
    assert rows == pack_examples(examples, 10)
    with pytest.raises(ValueError, match="over `max_length`"):
        pack_examples(examples, 7)


def test_classification_and_stream_rules():
    with pytest.raises(Exception, match="a classifier reads one example per row"):
        load(REPO / "recipes" / "classify_sst2.yaml", ["data.pack=true"])
    with pytest.raises(Exception, match="`data.pack: stream` works with `data.format: text` only"):
        load(REPO / "recipes" / "quickstart.yaml", ["data.pack=stream"])
    rows = [{"text": "a b c d e f"}] * 3
    tok = load_tokenizer(load(REPO / "recipes" / "quickstart.yaml").model)
    stream, _ = encode(rows, load(REPO / "recipes" / "quickstart.yaml", ["data.format=text", "data.pack=stream",
                                                                          "data.max_length=8"]).data, tok, source="t")
    assert all(len(b["input_ids"]) == 8 and "position_ids" not in b for b in stream)


def test_collate_pads_positions_as_segments_of_their_own():
    rows = pack_examples([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]},
                          {"input_ids": [4], "labels": [4]}], 5)
    batch = collate(rows, 0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 0, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100] * 5]
    assert segment_ids(batch["position_ids"]).tolist() == [[1, 1, 1, 2, 2], [1, 2, 3, 4, 5]]
    assert count_targets(batch) == 3 and count_tokens(batch) == 6
    inputs = model_inputs(batch)
    assert inputs["attention_mask"] is None and "labels" not in inputs
    assert token_mask(inputs) is batch["attention_mask"]  # what module hooks see inside the forward
    assert token_mask({"attention_mask": None, "position_ids": batch["position_ids"].clone()}) is None


def test_resumed_run_sees_the_same_packed_batches():
    r = load(REPO / "recipes" / "chat.yaml", ["data.pack=true"])
    tok = load_tokenizer(r.model)
    a = Batcher(build_data(r.data, tok, seed=0).train, 4, 0, shuffle=True, seed=1)
    b = Batcher(build_data(r.data, tok, seed=0).train, 4, 0, shuffle=True, seed=1)
    resumed = list(b.iter_epoch(1, start=2))
    for i, batch in enumerate(resumed, start=2):
        want = a.batch(1, i)
        assert all(torch.equal(batch[k], want[k]) for k in want)


# ---------------------------------------------------------------------------------- exactness


def build(model: str, strategies: str, *extra: str) -> Trainer:
    r = load(REPO / "recipes" / "lora.yaml", [f"model.name={model}", "model.dtype=float64",
                                              "model.attn_implementation=sdpa", f"strategies={strategies}",
                                              "data.max_samples=8", "data.max_length=256", *extra])
    t = Trainer(r, run_dir="unused").setup(for_training=False)
    t.model.train()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # zero-initialised adapters (LoRA's B, MEFT's values) would make gradients trivial
        for p in t.model.parameters():
            if p.requires_grad and not p.any():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    return t


def examples(lengths=(9, 5, 12, 3, 7, 10), vocab=500, seed=0) -> list[dict]:
    """Causal examples with a prompt (no loss) of a third of their tokens, as `instruction` makes them."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(5, vocab, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (n // 3) + ids[n // 3:]})
    return out


def loss_and_grads(t: Trainer, batch: dict, step: int = 0) -> tuple[torch.Tensor, dict]:
    for s in t.strategies:
        batch = s.on_step_start(step, batch)
    t.model.zero_grad(set_to_none=True)
    out = step_loss(t.strategies, t.model, batch, "causal_lm")
    out.loss_sum.backward()  # not autograd.grad: reentrant gradient checkpointing takes only backward()
    return out.loss_sum.detach(), {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}


def assert_same(got: tuple, want: tuple) -> None:
    torch.testing.assert_close(got[0], want[0], rtol=TOL, atol=0)
    assert want[1] and set(got[1]) == set(want[1]) and any(g.abs().sum() > 0 for g in want[1].values())
    for name, g in want[1].items():
        torch.testing.assert_close(got[1][name], g, rtol=TOL, atol=TOL * max(g.abs().max().item(), 1e-30), msg=name)


def one_by_one(t: Trainer, exs: list[dict]) -> tuple:
    total, grads = None, {}
    for ex in exs:
        loss, g = loss_and_grads(t, collate([ex], 0))
        total = loss if total is None else total + loss
        for n, v in g.items():
            grads[n] = grads[n] + v if n in grads else v
    return total, grads


def packed(exs: list[dict], max_length: int = 20) -> dict:
    rows = pack_examples(exs, max_length)
    assert len(rows) < len(exs) and any(len(r["input_ids"]) < max_length for r in rows)  # several per row, padding
    return collate(rows, 0)


CASES = {
    "full-llama": ("tiny-llama", "[{name: full}]"),
    "full-mixtral": ("tiny-mixtral", "[{name: full}]"),
    "full-olmoe": ("tiny-olmoe", "[{name: full}]"),
    "full-qwen2-moe": ("tiny-qwen2-moe", "[{name: full}]"),
    "full-stories260K": ("stories260K", "[{name: full}]"),
    "full-llama-checkpointed": ("tiny-llama", "[{name: full}]", "train.gradient_checkpointing=true"),
    "lora-llama": ("tiny-llama", "[{name: lora, params: {r: 4, target_modules: all-linear}}]"),
    "lora-mixtral": ("tiny-mixtral", "[{name: lora, params: {r: 4, target_modules: all-linear}}]"),
    "lcsb": ("stories260K", "[{name: lora, params: {r: 4, target_modules: all-linear}}, {name: lcsb, params: "
                            "{groups: 2}}]"),
    "revffn-llama": ("tiny-llama", "[{name: full}, {name: revffn, params: {coupling: additive}}]"),
    "revffn-distill": ("tiny-llama", "[{name: full}, {name: revffn, params: {coupling: additive, recovery: "
                                     "{steps: 5}}}]"),
    "revffn-mixtral": ("tiny-mixtral", "[{name: full}, {name: revffn, params: {coupling: additive}}]"),
}
MEFT = "{name: meft, params: {width: 256, experts: 16, n_probe: 2, topk: 8}}"


@pytest.mark.parametrize("case", list(CASES))
def test_packed_batch_equals_the_examples_one_by_one(case):
    model, strategies, *extra = CASES[case]
    t = build(model, strategies, *extra)
    exs = examples()
    assert_same(loss_and_grads(t, packed(exs)), one_by_one(t, exs))


@pytest.mark.parametrize("model,strategies", [("tiny-mixtral", "[{name: full}]"), ("tiny-olmoe", "[{name: full}]"),
                                               ("tiny-mixtral", "[{name: full}, {name: revffn, params: "
                                                                "{coupling: additive}}]")])
def test_router_load_balancing_loss_equals_the_padded_batch(model, strategies):
    """The load-balancing loss is a statistic of the whole batch's real tokens, not a sum over examples: a packed
    batch's equals that of the same examples padded into one batch (the same real tokens; RevFFN computes it in
    its own stack, from the token mask it reads in the forward)."""
    t = build(model, strategies, "train.router_aux_loss=on")
    exs = examples()
    got, want = loss_and_grads(t, packed(exs)), loss_and_grads(t, collate(exs, 0))
    assert_same(got, want)


def test_tokentune_packed_equals_the_padded_batch_with_the_same_selection():
    """TokenTune draws its positions per row of the batch (among the row's real tokens), so the packed batch and
    the examples one by one would draw different tokens. The packed batch's draw is mapped onto the same examples
    padded one per row (filled up with padding positions, which carry no loss and are attended by no real
    token): the two must give the same loss and gradients."""
    t = build("tiny-llama", "[{name: full}, {name: tokentune, params: {fraction: 0.4}}]")
    tt = t.strategies[-1]
    exs = examples()
    batch = tt.on_step_start(0, packed(exs))
    rows = pack_examples(exs, 20)
    # where each example's tokens lie in the packed batch -> (example, position in it)
    where, order = {}, []
    for b, row in enumerate(rows):
        start = 0
        for part in unpack(row):
            where.update({(b, start + j): (len(order), j) for j in range(len(part["input_ids"]))})
            order.append(part["input_ids"])
            start += len(part["input_ids"])
    index = {tuple(e["input_ids"]): i for i, e in enumerate(exs)}
    picks = [[] for _ in exs]
    for b, pos in enumerate(batch[POSITIONS_KEY].tolist()):
        for p in pos:
            if (b, p) in where:
                e, j = where[(b, p)]
                picks[index[tuple(order[e])]].append(j)
    k = max(map(len, picks))
    T = max(len(e["input_ids"]) for e in exs) + k
    padded = collate(exs, 0)
    padded = {key: torch.nn.functional.pad(v, (0, T - v.size(1)), value=IGNORE_INDEX if key == "labels" else 0)
              for key, v in padded.items()}
    positions = [sorted(p + list(range(len(e["input_ids"]), T))[:k - len(p)]) for p, e in zip(picks, exs)]
    padded[POSITIONS_KEY] = torch.tensor(positions)

    def run(b):
        out = step_loss(t.strategies, t.model, b, "causal_lm")
        params = {n: p for n, p in t.model.named_parameters() if p.requires_grad}
        grads = torch.autograd.grad(out.loss_sum, list(params.values()), allow_unused=True)
        return out.loss_sum.detach(), {n: g for n, g in zip(params, grads) if g is not None}

    assert tt.count_targets(batch) == tt.count_targets(padded)
    assert_same(run(batch), run(padded))


def meft_loss_and_grads(t: Trainer, batch: dict) -> tuple[torch.Tensor, dict]:
    """MEFT's keys and values live on the host: their gradients are those of the rows each forward shipped."""
    s = t.strategies[-1]
    t.model.zero_grad(set_to_none=True)
    out = step_loss(t.strategies, t.model, batch, "causal_lm")
    out.loss_sum.backward()
    grads = {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}
    for i, rows, index in s.pending:
        for name, got in (("keys", rows.keys.grad), ("values", rows.values.grad)):
            full = torch.zeros_like(s.hosts[i].params[name]).index_add_(0, index, got)
            key = f"meft.{i}.{name}"
            grads[key] = grads[key] + full if key in grads else full
    s.pending.clear()
    return out.loss_sum.detach(), grads


def meft(model: str, cap: str = "") -> Trainer:
    t = build(model, f"[{MEFT.replace('topk: 8', 'topk: 8' + cap)}]")
    g = torch.Generator().manual_seed(7)
    for h in t.strategies[-1].hosts:  # non-zero values, or the key and router gradients would be trivially zero
        h.params["values"].copy_(torch.randn(h.params["values"].shape, generator=g, dtype=h.params["values"].dtype)
                                 * 0.05)
    return t


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-mixtral"])
def test_meft_packed_equals_the_examples_one_by_one(model):
    t = meft(model)
    exs = examples()
    got = meft_loss_and_grads(t, packed(exs))
    want = [meft_loss_and_grads(t, collate([ex], 0)) for ex in exs]
    total = sum(w[0] for w in want)
    grads = {n: sum(w[1][n] for w in want if n in w[1]) for n in {n for w in want for n in w[1]}}
    assert any(n.startswith("meft.") for n in grads)
    assert_same(got, (total, grads))


def test_meft_cap_votes_with_the_real_tokens_of_a_packed_batch():
    """Under a device-row cap the experts a forward may use are those its real tokens probe most: a batch-level
    decision, so a packed batch equals the same examples padded into one batch (the padding has no vote), not the
    examples one by one."""
    t = meft("tiny-llama", ", device_rows: 64")
    exs = examples()
    got, want = meft_loss_and_grads(t, packed(exs)), meft_loss_and_grads(t, collate(exs, 0))
    assert t.strategies[-1].meters["meft_rerouted_probes"] > 0  # the cap binds
    assert_same(got, want)
