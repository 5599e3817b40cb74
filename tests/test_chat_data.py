"""`data.format: chat`: exact assistant masks for three templates and every `train_on`, ShareGPT rows, the system
default, truncation drops, a sentence naming the row for each bad input; list columns refused elsewhere; .txt."""

import copy
import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from memft.data import IGNORE_INDEX, build, read_rows
from memft.data.chat import CHATML, set_chat_template
from memft.data.formats import encode
from memft.errors import RecipeError, UserError
from memft.models.load import load_tokenizer
from memft.recipe import DataConfig, ModelConfig, load, validate

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "recipes" / "data" / "chat_sample.jsonl"

# Meta-Llama-3-8B-Instruct's chat template (tokenizer_config.json), as published
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# ChatML that writes a default system turn when the conversation has none (the shape of Qwen2.5's template)
DEFAULT_SYSTEM = "You are a helpful assistant."
WITH_DEFAULT = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{% endif %}" + CHATML
)
NO_TOOLS = ("{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('tool messages are not "
            "supported') }}{% endif %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")

CONTROL = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>"]

CONVERSATION = [
    {"role": "system", "content": "Be kind."},
    {"role": "user", "content": "Hi there, how are you?"},
    {"role": "assistant", "content": "Fine, thanks."},
    {"role": "user", "content": "And the cat?"},
    {"role": "tool", "content": "{\"cat\": \"asleep\"}"},
    {"role": "assistant", "content": "The cat sleeps on the mat."},
]


@pytest.fixture(scope="module")
def stories():
    """The real stories260K tokenizer: SentencePiece, 512 pieces, no chat template, no control tokens."""
    return load_tokenizer(ModelConfig())


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE (exact decode) trained here, with Llama 3's and ChatML's control tokens as single tokens."""
    corpus = [json.loads(line)["messages"][1]["content"] for line in SAMPLE.open()]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", *CONTROL],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   extra_special_tokens=CONTROL)


def chatml_turn(role, content):
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


def llama3_turn(role, content):
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n{content.strip()}<|eot_id|>"


# name -> (data.chat_template, tokenizer's own template, tokenizer fixture, text before the turns, one turn)
TEMPLATES = {
    "chatml": ("chatml", None, "stories", "", chatml_turn),
    "llama3": (LLAMA3, None, "bpe", "<s>", llama3_turn),
    "system_default": (None, WITH_DEFAULT, "bpe", "", chatml_turn),  # the tokenizer's own template
}


def runs(example, tokenizer):
    """(decoded runs of trained tokens, decoded runs of untrained tokens), in order."""
    trained, untrained, current, kind = [], [], [], None
    for tid, label in zip(example["input_ids"], example["labels"]):
        now = label != IGNORE_INDEX
        if now != kind and current:
            (trained if kind else untrained).append(tokenizer.decode(current))
            current = []
        kind = now
        current.append(tid)
    if current:
        (trained if kind else untrained).append(tokenizer.decode(current))
    return trained, untrained


def expected_runs(messages, prefix, turn, train_on):
    """What each `train_on` must train: assistant content + the template's end-of-turn; never a header."""
    header = turn("assistant", "\0").split("\0")[0]
    targets = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on == "last":
        targets = targets[-1:]
    whole = prefix + "".join(turn(m["role"], m["content"]) for m in messages)
    if train_on == "all":
        return [whole], []
    trained, untrained, pending = [], [], prefix
    for i, m in enumerate(messages):
        if i in targets:
            untrained.append(pending + header)
            trained.append(turn("assistant", m["content"])[len(header):])
            pending = ""
        else:
            pending += turn(m["role"], m["content"])
    return trained, untrained + ([pending] if pending else [])


def tokenizer_for(name, request):
    chat_template, own, fixture, _, _ = TEMPLATES[name]
    tok = copy.deepcopy(request.getfixturevalue(fixture))
    tok.chat_template = own
    return tok, chat_template


@pytest.mark.parametrize("train_on", ["assistant", "last", "all"])
@pytest.mark.parametrize("name", list(TEMPLATES))
def test_masks_are_exact_for_each_template(name, train_on, request):
    tok, chat_template = tokenizer_for(name, request)
    _, _, _, prefix, turn = TEMPLATES[name]
    messages = CONVERSATION[1:] if name == "system_default" else CONVERSATION  # the template adds its system turn
    cfg = DataConfig(format="chat", chat_template=chat_template, train_on=train_on, max_length=4096)
    (example,), dropped = encode([{"messages": messages}], cfg, tok, source="t")
    seen = [{"role": "system", "content": DEFAULT_SYSTEM}] + messages if name == "system_default" else messages
    assert dropped == 0
    assert tok.decode(example["input_ids"]) == prefix + "".join(turn(m["role"], m["content"]) for m in seen)
    assert runs(example, tok) == expected_runs(seen, prefix, turn, train_on)


def test_llama3_trains_exactly_the_content_ids_and_one_end_of_turn_token(bpe):
    cfg = DataConfig(format="chat", chat_template=LLAMA3, train_on="last")
    (example,), _ = encode([{"messages": CONVERSATION}], cfg, bpe, source="t")
    trained = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    content = bpe("The cat sleeps on the mat.", add_special_tokens=False)["input_ids"]
    assert trained == content + [bpe.convert_tokens_to_ids("<|eot_id|>")]
    assert example["labels"] == [label if label == IGNORE_INDEX else tid
                                 for tid, label in zip(example["input_ids"], example["labels"])]


def test_the_template_used_is_set_on_the_tokenizer(stories, bpe):
    tok = copy.deepcopy(stories)
    assert tok.chat_template is None
    with pytest.raises(UserError, match="has no chat template; set `data.chat_template: chatml`"):
        encode([{"messages": CONVERSATION}], DataConfig(format="chat"), tok, source="t")
    encode([{"messages": CONVERSATION}], DataConfig(format="chat", chat_template="chatml"), tok, source="t")
    assert tok.chat_template == CHATML
    # the tokenizer's own template is kept when the recipe names none; a recipe's replaces it
    own = copy.deepcopy(bpe)
    own.chat_template = WITH_DEFAULT
    assert set_chat_template(own, DataConfig(format="chat")) == WITH_DEFAULT and own.chat_template == WITH_DEFAULT
    set_chat_template(own, DataConfig(format="chat", chat_template=LLAMA3))
    assert own.chat_template == LLAMA3


def test_sharegpt_rows_read_as_the_same_messages(stories):
    sharegpt = [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi there, how are you?"},
                {"from": "gpt", "value": "Fine, thanks."}, {"from": "human", "value": "And the cat?"},
                {"from": "observation", "value": "{\"cat\": \"asleep\"}"},
                {"from": "gpt", "value": "The cat sleeps on the mat."}]
    cfg = DataConfig(format="chat", chat_template="chatml")
    openai, _ = encode([{"messages": CONVERSATION, "id": 1}], cfg, stories, source="t")
    detected, _ = encode([{"id": 1, "conversations": sharegpt}], cfg, stories, source="t")
    named, _ = encode([{"dialog": sharegpt, "messages": "not this"}],
                      cfg.model_copy(update={"messages_field": "dialog"}), stories, source="t")
    assert detected == openai == named
    function = [dict(m, **{"from": "function"}) if m["from"] == "observation" else m for m in sharegpt]
    assert encode([{"conversations": function}], cfg, stories, source="t")[0] == openai


def test_the_recipe_system_prompt_is_added_only_when_there_is_none(bpe):
    tok = copy.deepcopy(bpe)
    tok.chat_template = WITH_DEFAULT
    cfg = DataConfig(format="chat", system="Answer briefly.")
    rows = [{"messages": CONVERSATION[1:3]}, {"messages": CONVERSATION[:3]}]
    (added, kept), _ = encode(rows, cfg, tok, source="t")
    assert tok.decode(added["input_ids"]).startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user")
    assert DEFAULT_SYSTEM not in tok.decode(added["input_ids"])
    assert tok.decode(kept["input_ids"]).startswith("<|im_start|>system\nBe kind.<|im_end|>\n")
    assert runs(added, tok)[0] == ["Fine, thanks.<|im_end|>\n"]  # a system turn never gets a loss


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_rows_whose_trained_turns_are_all_cut_are_dropped_and_counted(tmp_path, stories):
    long_user = {"role": "user", "content": "Tell me a story about a dog who ran to the sea. " * 8}
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    rows = [{"messages": short},                                                      # kept
            {"messages": [long_user, {"role": "assistant", "content": "Once upon a time."}]},   # its one turn cut
            {"messages": short + [long_user, {"role": "assistant", "content": "The end."}]}]  # first turn survives
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    cfg = DataConfig(source=str(path), format="chat", chat_template="chatml", max_length=64, eval_split=None)
    data = build(cfg, stories, seed=0)
    assert data.dropped == 1 and len(data.train) == 2
    assert [runs(ex, stories)[0] for ex in data.train] == [["Hello!<|im_end|>\n"]] * 2
    assert all(len(ex["input_ids"]) <= 64 for ex in data.train)
    assert build(cfg.model_copy(update={"train_on": "last"}), stories, seed=0).dropped == 2  # "The end." is cut too
    with pytest.raises(UserError, match="all 3 examples were dropped"):
        build(cfg.model_copy(update={"max_length": 8}), stories, seed=0)


def test_left_truncation_keeps_the_bos_and_the_last_turn(bpe):
    cfg = DataConfig(format="chat", chat_template=LLAMA3, max_length=32, truncation="left")
    (example,), _ = encode([{"messages": CONVERSATION}], cfg, bpe, source="t")
    assert len(example["input_ids"]) == 32 and example["input_ids"][0] == bpe.bos_token_id
    assert runs(example, bpe)[0][-1] == "The cat sleeps on the mat.<|eot_id|>"


@pytest.mark.parametrize("messages, said", [
    ([{"content": "hi"}, {"role": "assistant", "content": "hello"}],
     r"row 2 of .*c\.jsonl, message 1 has no role: give it `role` .* its keys are 'content'"),
    ([{"role": "user", "content": "hi"}, {"role": "robot", "content": "hello"}],
     r"row 2 of .*, message 2 has an unknown role 'robot' in `role`; known roles: system, user, assistant, tool"),
    ([{"from": "human", "value": "hi"}, {"from": "bot", "value": "hello"}],
     r"row 2 of .*, message 2 has an unknown role 'bot' in `from`"),
    ([{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}],
     r"row 2 of .* has no assistant turn \(roles: system, user\)"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}],
     r"row 2 of .*, message 2 \(assistant\) has a number in `content`; expected text"),
    ([{"role": "user"}, {"role": "assistant", "content": "hello"}],
     r"row 2 of .*, message 1 \(user\) has no `content`"),
    (["hi", {"role": "assistant", "content": "hello"}], r"row 2 of .*, message 1 is a string, not an object"),
    ("hi there", r"`data.messages_field`: row 2 of .* has text in column 'messages'; expected a list of messages"),
    ([], r"row 2 of .* has an empty list of messages"),
    ([{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "hi"}],
     r"row 2 of .* starts with an assistant turn; .* set `data.system`"),
])
def test_bad_conversations_are_a_sentence_naming_the_row(tmp_path, stories, messages, said):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = write_jsonl(tmp_path / "c.jsonl", [good, {"messages": messages}, good])
    cfg = DataConfig(source=str(path), format="chat", chat_template="chatml", eval_split=0.3)
    with pytest.raises(UserError, match=said):
        build(cfg, stories, seed=0)


def test_a_template_that_cannot_render_a_role_names_the_row(tmp_path, stories):
    plain = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": plain}, {"messages": CONVERSATION}])
    cfg = DataConfig(source=str(path), format="chat", chat_template=NO_TOOLS, eval_split=None)
    with pytest.raises(UserError, match=r"the template in `data.chat_template` cannot render conversation 2 of "
                                        r".*c\.jsonl \(roles: system, user, assistant, tool\): tool messages are not "
                                        r"supported; drop such rows"):
        build(cfg, stories, seed=0)
    (ok,), _ = encode([{"messages": plain}], cfg, stories, source="t")
    assert runs(ok, stories)[0] == ["hello\n"]


def test_a_template_whose_prefixes_disagree_with_the_whole_is_refused(stories):
    # writes each message's position, counted from the end: a prefix renders every turn differently
    shifting = ("{% for m in messages %}{{ (messages|length - loop.index)|string + m['role'] + ': ' + m['content'] "
                "+ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    cfg = DataConfig(format="chat", chat_template=shifting)
    with pytest.raises(UserError, match="renders conversation 1 of t differently in part than as a whole"):
        encode([{"messages": CONVERSATION}], cfg, stories, source="t")


@pytest.mark.parametrize("overrides", [{"format": "text", "text_field": "messages"},
                                       {"format": "instruction", "prompt_field": "messages",
                                        "response_field": "messages"}])
def test_a_column_of_conversations_is_never_read_as_text(tmp_path, stories, overrides):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": CONVERSATION}] * 2)
    cfg = DataConfig(source=str(path), eval_split=None, **overrides)
    key = "text_field" if overrides["format"] == "text" else "prompt_field"
    with pytest.raises(UserError) as info:
        build(cfg, stories, seed=0)
    assert str(info.value) == (f"`data.{key}`: row 1 of {path} has a list in column 'messages'; expected text (a "
                               "string); it holds a conversation: read it with `data.format: chat` (and "
                               "`data.messages_field: messages`)")


def test_txt_files_one_example_per_paragraph_or_line(tmp_path, stories):
    path = tmp_path / "stories.txt"
    path.write_text("Once upon a time\nthere was a cat.\n\n  \nThe cat sat.\r\n\r\nThe end.\n")
    paragraphs = read_rows(DataConfig(source=str(path)))
    assert paragraphs == [{"text": "Once upon a time\nthere was a cat."}, {"text": "The cat sat."},
                          {"text": "The end."}]
    lines = read_rows(DataConfig(source=str(path), txt_split="line"))
    assert [r["text"] for r in lines] == ["Once upon a time", "there was a cat.", "The cat sat.", "The end."]
    assert read_rows(DataConfig(source=str(path), max_samples=2)) == paragraphs[:2]
    data = build(DataConfig(source=str(path), eval_split=None, shuffle=False), stories, seed=0)
    assert [stories.decode(ex["input_ids"], skip_special_tokens=True) for ex in data.train] == \
        [r["text"] for r in paragraphs]
    with pytest.raises(UserError, match=r"is a plain-text file, which memft reads with `data.format: text` only"):
        read_rows(DataConfig(source=str(path), format="chat"))


def test_recipe_fields_are_checked_when_the_recipe_loads():
    def problems(data):
        with pytest.raises(RecipeError) as info:
            validate({"data": {"source": "some/hub-dataset", **data}})
        return info.value.problems

    assert "did you mean 'chatml'" in problems({"format": "chat", "chat_template": "chatlm"})[0]
    unclosed = "{% for m in messages %}{{ m['content'] }}"
    assert "is not a valid Jinja template" in problems({"format": "chat", "chat_template": unclosed})[0]
    assert problems({"format": "text", "train_on": "last", "system": "hi"})[0].startswith(
        "`data`: `system`, `train_on` apply to `data.format: chat` only (got `format: text`)")
    assert problems({"format": "chat", "train_on": "everything"})[0].startswith("`data.train_on`: Input should be")
    # a run's recipe.yaml holds every field at its default: that must load for other formats
    assert validate({"data": DataConfig(source="some/hub-dataset").model_dump()}).data.format == "text"


def test_the_shipped_recipe_and_sample(stories):
    recipe = load(REPO / "recipes" / "chat.yaml")
    assert (recipe.data.format, recipe.data.chat_template, Path(recipe.data.source)) == ("chat", "chatml", SAMPLE)
    rows = [json.loads(line) for line in SAMPLE.open()]
    assert len(rows) >= 60 and len({json.dumps(r) for r in rows}) == len(rows)
    assert sum(sum(m["role"] == "assistant" for m in r["messages"]) > 1 for r in rows) >= 30  # multi-turn
    examples, dropped = encode(rows, recipe.data, copy.deepcopy(stories), source="sample")
    assert dropped == 0 and len(examples) == len(rows)
    assert all(len(ex["input_ids"]) <= recipe.data.max_length for ex in examples)


def test_turns_after_the_last_assistant_turn_are_left_out_unless_all_are_trained(stories):
    rows = [{"messages": CONVERSATION[1:3] + [{"role": "user", "content": "Bye!"}]}]
    cfg = DataConfig(format="chat", chat_template="chatml")
    (trimmed,), _ = encode(rows, cfg, stories, source="t")
    (whole,), _ = encode(rows, cfg.model_copy(update={"train_on": "all"}), stories, source="t")
    assert stories.decode(trimmed["input_ids"]).endswith("Fine, thanks.<|im_end|>\n")
    assert stories.decode(whole["input_ids"]).endswith("<|im_start|>user\nBye!<|im_end|>\n")
    assert whole["labels"] == whole["input_ids"]


def test_the_trainers_tokenizer_carries_the_template_it_trained_with(tmp_path):
    from memft.train.loop import Trainer

    recipe = load(REPO / "recipes" / "chat.yaml", [f"output.dir={tmp_path / 'run'}", "data.max_samples=16"])
    trainer = Trainer(recipe).setup(for_training=False)
    assert trainer.tokenizer.chat_template == CHATML
    assert len(trainer.data.train) + len(trainer.data.eval or []) == 16 and trainer.data.dropped == 0


def test_rows_in_several_render_chunks_encode_as_one(stories, monkeypatch):
    import memft.data.chat as chat

    rows = [{"messages": CONVERSATION[:i]} for i in (3, 6, 3, 6, 6)]
    cfg = DataConfig(format="chat", chat_template="chatml")
    whole = encode(rows, cfg, stories, source="t")
    monkeypatch.setattr(chat, "RENDER_CHUNK_ROWS", 2)
    assert encode(rows, cfg, stories, source="t") == whole
    rows[3] = {"messages": CONVERSATION[1:2]}
    with pytest.raises(UserError, match="conversation 4 of t has no assistant turn"):  # numbered across chunks
        chat.encode_chat(rows, cfg, stories, source="t")


# Qwen3's rule, reduced to it: an assistant turn before the last user message loses its <think> block
QWEN3_THINK = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- set content = m['content'] -%}"
    "{%- if m['role'] == 'assistant' and loop.index0 < ns.last_user and '</think>' in content -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}{%- endif -%}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
THINKING = [
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "<think>Two and three.</think>\n\n5"},
    {"role": "user", "content": "And 4 + 4?"},
    {"role": "assistant", "content": "<think>Four twice.</think>\n\n8"},
]


def test_a_qwen3_style_template_trains_the_last_turn_with_its_think_block(bpe):
    tok = copy.deepcopy(bpe)
    cfg = DataConfig(format="chat", chat_template=QWEN3_THINK, train_on="last", max_length=4096)
    (example,), _ = encode([{"messages": THINKING}], cfg, tok, source="t")
    seen = [THINKING[0], {"role": "assistant", "content": "5"}, *THINKING[2:]]  # the earlier block is dropped
    assert tok.decode(example["input_ids"]) == "".join(chatml_turn(m["role"], m["content"]) for m in seen)
    assert runs(example, tok)[0] == ["<think>Four twice.</think>\n\n8<|im_end|>\n"]


def test_a_qwen3_style_template_that_rewrites_an_earlier_trained_turn_is_refused_with_the_way_out(bpe):
    tok = copy.deepcopy(bpe)
    cfg = DataConfig(format="chat", chat_template=QWEN3_THINK, train_on="assistant", max_length=4096)
    with pytest.raises(UserError, match=r"can still train the last turn \(`data.train_on: last`\)"):
        encode([{"messages": THINKING}], cfg, tok, source="t")
    # nothing to rewrite (no earlier <think>): every assistant turn is trained, exactly
    plain = [THINKING[0], {"role": "assistant", "content": "5"}, *THINKING[2:]]
    (example,), _ = encode([{"messages": plain}], cfg, tok, source="t")
    assert runs(example, tok)[0] == ["5<|im_end|>\n", "<think>Four twice.</think>\n\n8<|im_end|>\n"]
