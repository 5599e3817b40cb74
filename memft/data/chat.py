"""`data.format: chat`: conversations -> token ids, with the loss on the turns `data.train_on` names.

A row holds a list of messages, OpenAI's `{role, content}` or ShareGPT's `{from, value}`. `normalize` turns
either into `{role, content}` with the roles system / user / assistant / tool, or raises a `UserError` that
names the row and the message. The conversation is rendered by one chat template (the recipe's
`data.chat_template`: the built-in `chatml` or a Jinja string; else the tokenizer's own) through
`tokenizer.apply_chat_template`, and the whole text is tokenised once.

Which tokens belong to an assistant turn is read off the template itself, never searched for in the text, so
it holds for any template: for the assistant turn at index i, render `messages[:i]` with
`add_generation_prompt=True` (everything up to and including the assistant's header) and `messages[:i + 1]`
(everything up to and including its end-of-turn marker). The turn's tokens are those from where the first
rendering's ids stop agreeing with the whole conversation's to where the second's do. So the content and the
end-of-turn marker the template writes after it (ChatML's `<|im_end|>\\n`, Llama 3's `<|eot_id|>`) are trained,
and the next turn's header is not: the same split as LLaMA-Factory's templates, whose assistant slot is
`"{{content}}<|im_end|>\\n"` (hiyouga/LLaMA-Factory@ff6d4d1, src/llamafactory/data/template.py, `qwen`).
"""

from __future__ import annotations

import difflib

from memft.data.formats import IGNORE_INDEX, truncate  # formats imports this module inside its functions
from memft.data.sources import require_columns
from memft.errors import UserError
from memft.recipe import DataConfig

# The ChatML template as Hugging Face's chat-templating guide gives it (transformers docs,
# `chat_templating.md`, "What are 'default' templates?"), the format of OpenHermes and Qwen.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT_TEMPLATES = {"chatml": CHATML}
"""Built-in templates `data.chat_template` may name."""

MESSAGE_COLUMNS = ("messages", "conversations")
"""Columns detected as the conversation when `data.messages_field` is null: OpenAI's, then ShareGPT's."""

ROLES = {
    "system": "system", "user": "user", "assistant": "assistant", "tool": "tool",  # OpenAI
    "human": "user", "gpt": "assistant", "function": "tool", "observation": "tool",  # ShareGPT (and LLaMA-Factory)
}
"""Every role a message may give (case-insensitive) -> the role the template sees."""

KNOWN_ROLES = "system, user, assistant, tool (ShareGPT: human, gpt, system, tool, function, observation)"


def check_chat_template(value: str) -> None:
    """`data.chat_template` is a built-in name or a Jinja template that compiles.

    Raises:
        ValueError: with the sentence the recipe error shows.
    """
    if value in CHAT_TEMPLATES:
        return
    if "{{" not in value and "{%" not in value:
        guess = difflib.get_close_matches(value, list(CHAT_TEMPLATES), n=1)
        hint = f"; did you mean {guess[0]!r}?" if guess else ""
        raise ValueError(f"must be a built-in template ({', '.join(map(repr, CHAT_TEMPLATES))}) or a Jinja template "
                         f"string with `{{% for message in messages %}}`{hint}")
    from jinja2 import TemplateError
    from transformers.utils.chat_template_utils import _compile_jinja_template  # what renders it later

    try:
        _compile_jinja_template(value)
    except TemplateError as exc:
        line = f" at line {exc.lineno}" if getattr(exc, "lineno", None) else ""
        raise ValueError(f"is not a valid Jinja template{line}: {exc}") from None


def find_column(columns: list[str], cfg: DataConfig) -> str:
    """The column holding the conversations: `data.messages_field`, else `messages` or `conversations`."""
    column = cfg.messages_field or next((c for c in MESSAGE_COLUMNS if c in columns), None)
    if column is None:
        raise UserError(f"`data.format: chat` needs a column of conversations but found only "
                        f"{', '.join(map(repr, columns))}; set `data.messages_field` (detected by default: "
                        f"{' or '.join(MESSAGE_COLUMNS)})")
    return column


def normalize(value, cfg: DataConfig, where: str, column: str) -> list[dict]:
    """One row's conversation as `[{role, content, ...}]` with roles system / user / assistant / tool.

    The recipe's `data.system` comes first when the conversation has no system turn. Unless `train_on: all`,
    turns after the last assistant turn are left out: nothing there gets a loss.

    Args:
        value: the row's cell, a list of OpenAI (`role`, `content`) or ShareGPT (`from`, `value`) messages.
        where: the row, for errors, e.g. `row 3 of data.jsonl`.
        column: the cell's column, for errors.

    Raises:
        UserError: the cell is not a list of messages, a message has no role, an unknown role or no text, the
            conversation has no assistant turn, or it starts with one.
    """
    column = f"column {column!r}"
    if value is None or (isinstance(value, float) and value != value):
        raise UserError(f"`data.messages_field`: {where} has no value (null) in {column}; expected a list of messages")
    if not isinstance(value, (list, tuple)):
        kind = "text" if isinstance(value, str) else f"a {type(value).__name__}"
        raise UserError(f"`data.messages_field`: {where} has {kind} in {column}; expected a list of messages such as "
                        "[{\"role\": \"user\", \"content\": \"...\"}, {\"role\": \"assistant\", \"content\": \"...\"}]")
    if not value:
        raise UserError(f"`data.messages_field`: {where} has an empty list of messages")
    messages = [_message(m, i, where) for i, m in enumerate(value, start=1)]
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where} has no assistant turn (roles: {', '.join(m['role'] for m in messages)}), so "
                        "nothing in it would be learned; remove the row or give it an assistant message")
    if cfg.system is not None and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": cfg.system})
    if cfg.train_on != "all":
        if messages[0]["role"] == "assistant":
            raise UserError(f"{where} starts with an assistant turn; memft finds where an assistant turn begins by "
                            "rendering the turns before it, so it needs one: put a user (or system) turn first, or "
                            "set `data.system`")
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        messages = messages[:last + 1]
    return messages


def _message(message, number: int, where: str) -> dict:
    what = f"{where}, message {number}"
    if not isinstance(message, dict):
        raise UserError(f"{what} is {_kind(message)}, not an object with `role` and `content` "
                        "(or ShareGPT's `from` and `value`)")
    if "role" in message:
        role_key, content_key = "role", "content"
    elif "from" in message:
        role_key, content_key = "from", "value"
    else:
        raise UserError(f"{what} has no role: give it `role` (OpenAI style, with `content`) or `from` (ShareGPT "
                        f"style, with `value`); its keys are {', '.join(map(repr, message)) or 'none'}")
    raw = message[role_key]
    role = ROLES.get(raw.strip().lower()) if isinstance(raw, str) else None
    if role is None:
        raise UserError(f"{what} has an unknown role {raw!r} in `{role_key}`; known roles: {KNOWN_ROLES}")
    content = message.get(content_key)
    if isinstance(content, list):  # OpenAI content parts: text parts are joined, anything else is refused
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise UserError(f"{what} has content parts that are not all text (`{{\"type\": \"text\", \"text\": "
                            "...}`); memft trains on text only")
        content = "".join(p["text"] for p in content)
    out = {"role": role}
    if role_key == "role":  # OpenAI extras such as `tool_calls`, `name`, `tool_call_id` reach the template
        out |= {k: v for k, v in message.items() if k not in ("role", "content") and v is not None}
    if content is None and not (role == "assistant" and out.get("tool_calls")):
        raise UserError(f"{what} ({role}) has no `{content_key}`; every message needs its text")
    if content is not None and not isinstance(content, str):
        raise UserError(f"{what} ({role}) has {_kind(content)} in `{content_key}`; expected text (a string)")
    if content is not None:
        out["content"] = content
    return out


def _kind(value) -> str:
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return kinds.get(type(value), "a number" if isinstance(value, (int, float)) else f"a {type(value).__name__}")


def check_conversations(rows: list[dict], cfg: DataConfig, source: str) -> str:
    """Normalise every row once, so a bad message is named by the file's own 1-based row; returns the column."""
    column = find_column(list(rows[0]), cfg)
    require_columns(rows, {"messages_field": column}, source)
    for number, row in enumerate(rows, start=1):
        normalize(row.get(column), cfg, f"row {number} of {source}", column)
    return column


def chat_template(cfg: DataConfig, tokenizer) -> str:
    """The template conversations are rendered with: the recipe's (a built-in name or Jinja), else the tokenizer's.

    Raises:
        UserError: neither the recipe nor the tokenizer has one.
    """
    if cfg.chat_template is not None:
        return CHAT_TEMPLATES.get(cfg.chat_template, cfg.chat_template)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.get_chat_template()
    name = getattr(tokenizer, "name_or_path", "") or "the model"
    raise UserError(f"`data.format: chat`: the tokenizer of {name} has no chat template; set `data.chat_template: "
                    "chatml` (memft's built-in ChatML) or give a Jinja template string there")


def set_chat_template(tokenizer, cfg: DataConfig) -> str:
    """Put the recipe's template on `tokenizer` (`tokenizer.chat_template`), so whatever saves or reuses this
    tokenizer (the run, `memft export`, chatting with the model) renders conversations as training did; with no
    `data.chat_template` the tokenizer keeps its own. Returns the template."""
    template = chat_template(cfg, tokenizer)
    if cfg.chat_template is not None:
        tokenizer.chat_template = template
    return template


def encode_chat(rows: list[dict], cfg: DataConfig, tokenizer, *, source: str) -> tuple[list[dict], int]:
    """Conversations -> `{input_ids, labels}` examples; returns (examples, dropped).

    The loss is on the tokens of the assistant turns (`train_on: assistant`), of the last one (`last`) or on every
    token (`all`); see the module docstring for how they are found. The ids are then cut to `max_length` on the
    `truncation` side (left truncation keeps a leading BOS); an example with no trained token left is dropped.

    Raises:
        UserError: no chat template, a row the template cannot render (naming the row and its roles), or a
            template that renders a conversation's start differently on its own than inside the whole.
    """
    column = find_column(list(rows[0]), cfg)
    template = set_chat_template(tokenizer, cfg)
    out, dropped = [], 0
    for first in range(0, len(rows), RENDER_CHUNK_ROWS):
        chunk = rows[first:first + RENDER_CHUNK_ROWS]
        examples, chunk_dropped = _encode_chunk(chunk, first, cfg, tokenizer, template, column, source)
        out += examples
        dropped += chunk_dropped
    return out, dropped


RENDER_CHUNK_ROWS = 256
"""Rows rendered and tokenised together: one tokenizer call per chunk, and a bounded number of texts alive (a
conversation with n trained turns is rendered 2n + 1 times)."""


def _encode_chunk(rows: list[dict], first: int, cfg: DataConfig, tokenizer, template: str, column: str,
                  source: str) -> tuple[list[dict], int]:
    # every rendering of every row, tokenised in one call: [full, head_1, end_1, head_2, end_2, ...] per row
    texts, plans = [], []
    for number, row in enumerate(rows, start=first + 1):
        where = f"conversation {number} of {source}"
        messages = normalize(row.get(column), cfg, where, column)
        targets = [] if cfg.train_on == "all" else [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if cfg.train_on == "last":
            targets = targets[-1:]
        render = _renderer(tokenizer, template, cfg, messages, where)
        texts.append(render(messages, False))
        for i in targets:
            texts += [render(messages[:i], True), render(messages[:i + 1], False)]
        plans.append((where, len(targets)))
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]

    out, dropped, at = [], 0, 0
    bos = tokenizer.bos_token_id
    for where, n_targets in plans:
        full = ids[at]
        bounds = ids[at + 1: at + 1 + 2 * n_targets]
        at += 1 + 2 * n_targets
        if cfg.train_on == "all":
            labels = list(full)
        else:
            labels = [IGNORE_INDEX] * len(full)
            previous_end = 0
            for k in range(n_targets):
                # where the rendering up to the assistant's header, then up to its end-of-turn, stops agreeing
                start, end = _agree(bounds[2 * k], full), _agree(bounds[2 * k + 1], full)
                # each rendering must be the whole's start, up to the one token a merge across the cut may change:
                # a template that rewrites earlier turns (Qwen3 drops their <think> blocks) would shift the mask
                rewritten = any(len(b) - n > MERGE_SLACK for b, n in ((bounds[2 * k], start), (bounds[2 * k + 1], end)))
                if rewritten or not previous_end <= start < end:
                    raise UserError(
                        f"the chat template renders {where} differently in part than as a whole (its assistant turn "
                        f"{k + 1}, rendered as the conversation's end, is not the start of the whole conversation's "
                        "rendering), so memft cannot tell which tokens are the assistant's; a template that rewrites "
                        "earlier turns (as Qwen3's drops their <think> blocks) can still train the last turn "
                        "(`data.train_on: last`), or use a template that renders every turn the same wherever it "
                        "stands, e.g. `data.chat_template: chatml`")
                labels[start:end] = full[start:end]
                previous_end = end
        keep = 1 if bos is not None and full[:1] == [bos] else 0  # left truncation keeps a leading BOS
        input_ids = truncate(full, keep, cfg.max_length, cfg.truncation)
        labels = truncate(labels, keep, cfg.max_length, cfg.truncation)
        if all(label == IGNORE_INDEX for label in labels[1:]):  # position 0 is never a target after the shift
            dropped += 1
            continue
        out.append({"input_ids": input_ids, "labels": labels})
    return out, dropped


MERGE_SLACK = 1
"""Tokens at the end of a rendered prefix that may differ from the whole conversation's: the tokenizer may merge
the prefix's last piece with what follows it in the whole."""


def _agree(prefix: list[int], full: list[int]) -> int:
    """How many leading ids `prefix` and `full` share: where a rendered prefix of the conversation stops."""
    n = 0
    for a, b in zip(prefix, full):
        if a != b:
            break
        n += 1
    return n


def _renderer(tokenizer, template: str, cfg: DataConfig, messages: list[dict], where: str):
    """`render(messages, add_generation_prompt) -> text` that turns a template failure into a sentence."""
    from jinja2 import TemplateError

    which = (f"the built-in `{cfg.chat_template}` template" if cfg.chat_template in CHAT_TEMPLATES
             else "the template in `data.chat_template`" if cfg.chat_template else "the tokenizer's chat template")

    def render(part: list[dict], add_generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(part, chat_template=template, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)
        except (TemplateError, TypeError, ValueError) as exc:  # raise_exception(...) in a template: TemplateError
            roles = ", ".join(dict.fromkeys(m["role"] for m in messages))
            raise UserError(f"{which} cannot render {where} (roles: {roles}): {exc}; drop such rows, or choose a "
                            "template that renders these roles (`data.chat_template`)") from None

    return render

