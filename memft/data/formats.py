"""Rows -> token ids, one function per `data.format`.

Each example is a dict of python lists: `input_ids`, and either `labels` (causal formats: same
length as `input_ids`, -100 where there is no loss) or `label` (classification: an int), plus
`token_type_ids` when the tokenizer makes them, and `position_ids` in the rows `data.pack: true` makes (several
examples each, see `pack_examples`). The tokenizer is not modified, except that `chat` sets the
chat template it renders with on it (`tokenizer.chat_template`, see `memft.data.chat`), so the tokenizer a run
saves renders conversations as training did.
"""

from __future__ import annotations

import bisect
import copy
import difflib
import re
from dataclasses import dataclass

from memft.data.sources import require_columns
from memft.errors import UserError
from memft.recipe import DataConfig

IGNORE_INDEX = -100
"""Label value that `torch.nn.functional.cross_entropy` (and HF models) skip."""

# Stanford Alpaca's prompts, verbatim from tatsu-lab/stanford_alpaca@761dc5b, train.py PROMPT_DICT, except
# the "\n" after "### Response:": we tokenise prompt and response separately, and the newline keeps
# BPE tokenizers from gluing the response's first word to the colon.
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{prompt}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{prompt}\n\n### Response:\n"
)
NAMED_TEMPLATES = ("alpaca", "plain")

# Column names detected for `instruction` when the recipe names none: Alpaca, generic, GSM8K.
PROMPT_COLUMNS = ("instruction", "prompt", "question")
INPUT_COLUMNS = ("input",)
RESPONSE_COLUMNS = ("output", "response", "answer")


def pad_token_id(tokenizer) -> int:
    """The id used for padding: the tokenizer's pad token, else its EOS, else 0 (it is masked out anyway)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return tid
    return 0


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """(prefix, suffix) ids around every causal example.

    What the tokenizer adds itself (BERT's [CLS] ... [SEP], Llama's BOS) is kept; where it adds
    nothing we add its BOS at the start and its EOS at the end, when it has them.
    """
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    start = next((i for i in range(len(full) - len(bare) + 1) if full[i:i + len(bare)] == bare), None)
    prefix, suffix = ([], []) if start is None else (full[:start], full[start + len(bare):])
    if not prefix and tokenizer.bos_token_id is not None:
        prefix = [tokenizer.bos_token_id]
    if not suffix and tokenizer.eos_token_id is not None:
        suffix = [tokenizer.eos_token_id]
    return prefix, suffix


def truncate(seq: list, n_prefix: int, max_length: int, side: str) -> list:
    """Cut `seq` to `max_length`: `right` keeps the start, `left` keeps the first `n_prefix` items and the end.

    Left truncation keeps the BOS prefix because models expect it at position 0. Right truncation
    drops the EOS with the text's end, so the model never learns to stop in mid-text.
    """
    if len(seq) <= max_length:
        return list(seq)
    if side == "right":
        return seq[:max_length]
    return seq[:n_prefix] + seq[len(seq) - (max_length - n_prefix):]


def _text(row: dict, column: str | None) -> str:
    """A cell as text: `check_columns` has let through only strings, numbers and (optional columns) nulls."""
    value = row.get(column) if column else None
    return "" if value is None else str(value)


OPTIONAL_TEXT_KEYS = ("input_field",)
"""Recipe keys whose column may be empty in a row (Alpaca's `input`): a null there is the empty string."""


def check_columns(rows: list[dict], cfg: DataConfig, source: str) -> list[str]:
    """Refuse cells the format cannot read as text (or as a label); returns notes on what was converted.

    Text columns hold strings; an int or float is read as its decimal text (a GSM8K answer typed as a
    number) and a note says so; a boolean, list, object or null (NaN too) is refused with its 1-based row,
    except a null in an optional column (`data.input_field`), which is empty text; a list that holds a
    conversation says to use `data.format: chat`. Label columns hold ints, strings or booleans. For `chat`,
    every row's messages are checked (`memft.data.chat.check_conversations`).

    Raises:
        UserError: naming the recipe key, the row, the column and what it holds.
    """
    if not rows:
        return []
    if cfg.format == "chat":  # a column of lists: the chat module checks every message
        from memft.data.chat import check_conversations

        check_conversations(rows, cfg, source)
        return []
    cols = format_columns(rows, cfg)
    require_columns(rows, cols, source)
    notes = []
    for key, column in cols.items():
        values = [row.get(column) for row in rows]
        if key != "input_field" and all(_is_null(v) for v in values):
            raise UserError(f"`data.{key}`: column {column!r} of {source} is empty (null) in every row; "
                            f"point `data.{key}` at the column that holds the data")
        label = key == "label_field"
        for number, value in enumerate(values, start=1):
            if why := _cell_problem(value, label=label, optional=key in OPTIONAL_TEXT_KEYS):
                # a list is never read as its Python text: that would train on "[{'role': ..."
                hint = (f"; it holds a conversation: read it with `data.format: chat` (and `data.messages_field: "
                        f"{column}`)" if _looks_like_conversation(value) else "")
                raise UserError(f"`data.{key}`: row {number} of {source} has {why} in column {column!r}; "
                                f"expected {'an int or string label' if label else 'text (a string)'}{hint}")
        if not label and any(isinstance(v, (int, float)) for v in values):
            notes.append(f"numbers in column {column!r} are read as text")
    return notes


def _looks_like_conversation(value) -> bool:
    """A list of objects with a role (`role`, or ShareGPT's `from`): what `data.format: chat` reads."""
    return (isinstance(value, (list, tuple)) and bool(value)
            and all(isinstance(m, dict) and ("role" in m or "from" in m) for m in value))


def _is_null(value) -> bool:
    return value is None or (isinstance(value, float) and value != value)  # NaN: a missing cell from pandas


def _cell_problem(value, *, label: bool, optional: bool) -> str | None:
    """What is wrong with one cell, as 'a list', or None when the format can read it."""
    if _is_null(value):
        return None if optional else "no value (null)"
    if isinstance(value, bool):
        return None if label else f"a boolean ({value})"  # a true/false label is class 1/0
    if isinstance(value, (list, tuple, dict)):
        return "a list" if not isinstance(value, dict) else "an object"
    if isinstance(value, (str, int, float)):
        return None  # label values are checked further by `label_set`
    return f"a {type(value).__name__}"


CUT_CHARS_PER_TOKEN = 64
"""A text over `2 * keep * 64` characters is cut to about `keep * 64` before tokenising (see `_bare_ids`)."""

_WORD_END = re.compile(r"\S(?=\s)")
_WORD_START = re.compile(r"(?<=\s)\S")
_WORD = re.compile(r"\S+")


def _bare_ids(tokenizer, texts: list[str], keep: int | None = None, side: str = "right") -> list[list[int]]:
    """Token ids of `texts`, without special tokens.

    `keep`: only the first (`side: right`) or last (`left`) `keep` ids of each text will be used, so a text
    over `2 * keep * CUT_CHARS_PER_TOKEN` characters is cut at a word boundary to about half that before the
    tokenizer sees it (a 50 MB line took 20 minutes and 5 GB for 128 kept tokens). The ids kept are exactly
    those of the whole text: tokenizers split at spaces (BPE, WordPiece, SentencePiece), so the words before
    the cut tokenise as they do in the whole text, except possibly the word at the cut, whose ids must lie
    beyond the `keep` kept ones; when they do not (tokens that span many characters), the whole text is
    tokenised instead.
    """
    if not texts:
        return []

    def tokenize(batch):
        return tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]

    cuts = [_cut(text, keep, side) if keep else None for text in texts]
    ids = tokenize([text if cut is None else cut[0] for text, cut in zip(texts, cuts)])
    short = [i for i, cut in enumerate(cuts) if cut is not None and len(ids[i]) < keep + cut[1]]
    for i, whole in zip(short, tokenize([texts[i] for i in short]) if short else []):
        ids[i] = whole
    for i, cut in enumerate(cuts):
        if cut is not None and i not in short:
            ids[i] = ids[i][:keep] if side == "right" else ids[i][-keep:]
    return ids


def _cut(text: str, keep: int, side: str) -> tuple[str, int] | None:
    """(the part of `text` the kept ids come from, ids the word at the cut may take), or None: no cut.

    `right` keeps the start up to the end of a word, `left` the end from the start of a word; the word at
    the cut may tokenise differently there (no space before it, a byte-level or SentencePiece prefix), so
    its ids (at most 4 per character, a UTF-8 byte each, plus 2) must not be among the kept ones.
    """
    limit = keep * CUT_CHARS_PER_TOKEN
    if len(text) <= 2 * limit:
        return None
    if side == "right":
        end = _WORD_END.search(text, limit - 1, 2 * limit)
        if end is None:  # no space in `limit` characters: no safe place to cut
            return None
        word = text[:end.end()].rsplit(None, 1)[-1]
        return text[:end.end()], 4 * len(word) + 2
    window = len(text) - 2 * limit
    starts = list(_WORD_START.finditer(text, window, len(text) - limit + 1))
    if not starts:
        return None
    start = starts[-1].start()
    return text[start:], 4 * len(_WORD.match(text, start).group()) + 2


def encode_text(rows: list[dict], cfg: DataConfig, tokenizer) -> list[dict]:
    """`text`: [BOS] + tokens + [EOS], loss everywhere, truncated to `max_length`; with `cfg.pack: stream`, the
    untruncated sequences cut into `max_length` blocks (`pack_stream`). `pack: true` packs after `encode`."""
    prefix, suffix = special_tokens(tokenizer)
    stream = cfg.pack == "stream"
    keep = None if stream else cfg.max_length  # the stream keeps every token: nothing may be cut
    texts = [_text(r, cfg.text_field) for r in rows]
    seqs = [prefix + ids + suffix for ids in _bare_ids(tokenizer, texts, keep, cfg.truncation)]
    if stream:
        return pack_stream(seqs, cfg.max_length)
    out = []
    for seq in seqs:
        ids = truncate(seq, len(prefix), cfg.max_length, cfg.truncation)
        out.append({"input_ids": ids, "labels": list(ids)})
    return out


def pack_stream(seqs: list[list[int]], max_length: int) -> list[dict]:
    """`pack: stream`: concatenate `seqs` and cut the stream into blocks of exactly `max_length`, dropping the
    remainder.

    Blocks attend across document boundaries (as GPT-style pretraining does); BOS/EOS mark them.
    """
    stream = [t for seq in seqs for t in seq]
    blocks = [stream[i:i + max_length] for i in range(0, len(stream) - max_length + 1, max_length)]
    return [{"input_ids": b, "labels": list(b)} for b in blocks]


def pack_examples(examples: list[dict], max_length: int) -> list[dict]:
    """`pack: true`: whole causal examples, several to a row of at most `max_length` tokens (best-fit decreasing).

    The examples are placed longest first (equal lengths in data order), each into the row with the least room
    left that still holds it, else into a new row; the rows come in the order they were opened, each holding
    its examples in the order they were placed. So the packing is a pure function of the examples: a resumed run
    sees the same rows. Every example appears exactly once, unchanged, except that its first label is -100.

    Returns rows `{input_ids, labels, position_ids}`: `position_ids` restart at 0 with each example, which is how
    the model (`memft.data.batching.model_inputs`) keeps attention inside each example; the first label of every
    example is -100, so the last token of one example never predicts the first token of the next (position t
    predicts `labels[t + 1]`; without packing an example's first token is never a target either).

    Raises:
        ValueError: an example longer than `max_length` (the formats truncate before packing).
    """
    lengths = [len(ex["input_ids"]) for ex in examples]
    if any(n > max_length for n in lengths):
        raise ValueError(f"an example has {max(lengths)} tokens, over `max_length` ({max_length})")
    rows: list[list[int]] = []
    rooms: list[tuple[int, int]] = []  # (room left, row), sorted: the best fit is the first with enough room
    for i in sorted(range(len(examples)), key=lambda i: -lengths[i]):  # stable: ties stay in data order
        at = bisect.bisect_left(rooms, (lengths[i], -1))
        if at < len(rooms):
            room, r = rooms.pop(at)
            rows[r].append(i)
        else:
            room, r = max_length, len(rows)
            rows.append([i])
        if room - lengths[i] > 0:
            bisect.insort(rooms, (room - lengths[i], r))
    out = []
    for members in rows:
        ids, labels, positions = [], [], []
        for i in members:
            ex = examples[i]
            ids += ex["input_ids"]
            labels += [IGNORE_INDEX] + list(ex["labels"][1:])
            positions += range(len(ex["input_ids"]))
        out.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return out


def instruction_columns(columns: list[str], cfg: DataConfig) -> tuple[str, str | None, str]:
    """(prompt, input or None, response) columns: the recipe's, else detected by name."""
    def first(names):
        return next((c for c in names if c in columns), None)

    prompt = cfg.prompt_field or first(PROMPT_COLUMNS)
    response = cfg.response_field or first(RESPONSE_COLUMNS)
    if prompt is None or response is None:
        raise UserError(f"`data.format: instruction` needs a prompt and a response column but found only "
                        f"{', '.join(map(repr, columns))}; set `data.prompt_field` and `data.response_field` "
                        f"(detected by default: {'/'.join(PROMPT_COLUMNS)} and {'/'.join(RESPONSE_COLUMNS)})")
    return prompt, cfg.input_field or first(INPUT_COLUMNS), response


def check_template(template: str) -> None:
    """A template is `alpaca`, `plain`, or a string with `{prompt}` in it."""
    if template in NAMED_TEMPLATES or "{prompt}" in template:
        return
    guess = difflib.get_close_matches(template, NAMED_TEMPLATES, n=1)
    hint = f"; did you mean {guess[0]!r}?" if guess else ""
    raise UserError(f"`data.template` must be 'alpaca', 'plain' or a string containing {{prompt}} "
                    f"(got {template!r}){hint}")


def render_prompt(template: str, prompt: str, input_text: str = "") -> str:
    """The prompt text the response follows. A custom template without `{input}` gets the input
    on a line after the prompt, so no data is silently lost."""
    if template == "alpaca":
        template = ALPACA_WITH_INPUT if input_text else ALPACA_NO_INPUT
    elif template == "plain":
        template = "{prompt}\n{input}\n" if input_text else "{prompt}\n"
    elif "{input}" not in template and input_text:
        prompt = f"{prompt}\n{input_text}"
    values = {"prompt": prompt, "input": input_text}
    # One pass, so braces inside the data are never read as placeholders.
    return re.sub(r"\{(prompt|input)\}", lambda m: values[m.group(1)], template)


def encode_instruction(rows: list[dict], cfg: DataConfig, tokenizer,
                       columns: tuple[str, str | None, str]) -> tuple[list[dict], int]:
    """`instruction`: BOS + prompt + response + EOS with the loss on the response (and EOS) only.

    Returns (examples, dropped): an example whose response does not survive truncation is dropped.
    """
    prompt_col, input_col, response_col = columns
    prefix, suffix = special_tokens(tokenizer)
    # each part is cut on its own: either alone may fill `max_length` (the prompt keeps its start on the right,
    # the response its end on the left), and then the other contributes nothing after truncation
    prompts = _bare_ids(tokenizer, [render_prompt(cfg.template, _text(r, prompt_col), _text(r, input_col))
                                    for r in rows], cfg.max_length, cfg.truncation)
    responses = _bare_ids(tokenizer, [_text(r, response_col) for r in rows], cfg.max_length, cfg.truncation)
    out, dropped = [], 0
    for p, r in zip(prompts, responses):
        ids = truncate(prefix + p + r + suffix, len(prefix), cfg.max_length, cfg.truncation)
        labels = truncate([IGNORE_INDEX] * (len(prefix) + len(p)) + r + suffix, len(prefix), cfg.max_length,
                          cfg.truncation)
        # Position 0 is never a target after the causal shift, hence labels[1:].
        if all(label == IGNORE_INDEX for label in labels[1:]):
            dropped += 1
            continue
        out.append({"input_ids": ids, "labels": labels})
    return out, dropped


@dataclass
class Labels:
    """Class labels: `to_id` maps string labels (sorted) to ids; None when the labels are already ints."""

    to_id: dict[str, int] | None
    num_labels: int
    names: list[str] | None

    def id(self, value) -> int:
        return self.to_id[str(value)] if self.to_id is not None else int(value)


def label_set(values: list) -> Labels:
    """Labels from every value of the label column (train and eval together, so ids agree)."""
    for v in values:
        if v is None or (isinstance(v, float) and not v.is_integer()):
            raise UserError(f"`data.label_field`: label {v!r} is not a class; classification needs int or "
                            "string labels (regression is not supported)")
    if all(isinstance(v, (int, float)) for v in values):
        ints = [int(v) for v in values]
        if min(ints) < 0:
            raise UserError(f"`data.label_field`: label {min(ints)} is negative (GLUE test splits use -1 for "
                            "'no label': train and evaluate on splits with labels)")
        labels = Labels(None, max(ints) + 1, None)
    else:
        names = sorted({str(v) for v in values})
        labels = Labels({n: i for i, n in enumerate(names)}, len(names), names)
    if labels.num_labels < 2:
        raise UserError(f"`data.label_field`: the data has a single class ({values[0]!r}); "
                        "classification needs at least two")
    return labels


def encode_classification(rows: list[dict], cfg: DataConfig, tokenizer, labels: Labels) -> list[dict]:
    """`classification`: the tokenizer's own single/pair encoding (BERT: [CLS] a [SEP] b [SEP]), truncated."""
    tok = tokenizer
    if cfg.truncation == "left":
        # truncation_side is tokenizer state: change it on a copy, never on the caller's tokenizer.
        tok = copy.deepcopy(tokenizer)
        tok.truncation_side = "left"
    texts = [_text(r, cfg.text_field) for r in rows]
    pairs = [_text(r, cfg.text_pair_field) for r in rows] if cfg.text_pair_field else None
    if not texts:
        return []
    enc = tok(texts, pairs, truncation=True, max_length=cfg.max_length)
    out = []
    for i, row in enumerate(rows):
        example = {"input_ids": enc["input_ids"][i], "label": labels.id(row[cfg.label_field])}
        if "token_type_ids" in enc:
            example["token_type_ids"] = enc["token_type_ids"][i]
        out.append(example)
    return out


def format_columns(rows: list[dict], cfg: DataConfig) -> dict[str, str]:
    """{recipe key: column} of every column the format reads (instruction columns detected)."""
    if cfg.format == "instruction":
        prompt, input_col, response = instruction_columns(list(rows[0]) if rows else [], cfg)
        cols = {"prompt_field": prompt, "response_field": response}
        return cols | ({"input_field": input_col} if input_col else {})
    if cfg.format == "classification":
        cols = {"text_field": cfg.text_field, "label_field": cfg.label_field}
        return cols | ({"text_pair_field": cfg.text_pair_field} if cfg.text_pair_field else {})
    if cfg.format == "chat":
        from memft.data.chat import find_column

        return {"messages_field": find_column(list(rows[0]) if rows else [], cfg)}
    return {"text_field": cfg.text_field}


def encode(rows: list[dict], cfg: DataConfig, tokenizer, *, source: str,
           labels: Labels | None = None) -> tuple[list[dict], int]:
    """Encode rows in `cfg.format`; returns (examples, dropped). `labels` is required for classification.

    With `cfg.pack: true` the causal examples, each truncated as without packing, are packed into rows of at
    most `max_length` tokens (`pack_examples`)."""
    if not rows:
        return [], 0
    examples, dropped = _encode_format(rows, cfg, tokenizer, source=source, labels=labels)
    if cfg.pack is True and cfg.format != "classification":
        examples = pack_examples(examples, cfg.max_length)
    return examples, dropped


def _encode_format(rows: list[dict], cfg: DataConfig, tokenizer, *, source: str,
                   labels: Labels | None) -> tuple[list[dict], int]:
    cols = format_columns(rows, cfg)
    require_columns(rows, cols, source)
    if cfg.format == "text":
        return encode_text(rows, cfg, tokenizer), 0
    if cfg.format == "chat":
        from memft.data.chat import encode_chat

        return encode_chat(rows, cfg, tokenizer, source=source)
    if cfg.format == "instruction":
        check_template(cfg.template)
        return encode_instruction(rows, cfg, tokenizer,
                                  (cols["prompt_field"], cols.get("input_field"), cols["response_field"]))
    if labels is None:
        labels = label_set([r[cfg.label_field] for r in rows])
    return encode_classification(rows, cfg, tokenizer, labels), 0
