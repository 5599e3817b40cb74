"""`memft chat` and `memft generate`: talk to a trained model, rendered the way it was trained.

The model is what `memft eval` scores (a run directory with its strategies applied, a local Hugging Face model
directory, a built-in or a hub id). A prompt becomes ids as the run's data format made its examples: a chat run's
conversation through its chat template (with the assistant's header, `add_generation_prompt`), an instruction run's
prompt through its `data.template`, a text run's prompt after its BOS. Generation stops at the tokenizer's EOS and,
for conversations, at the template's end-of-turn marker (found by rendering, like the training masks), which is
never shown.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from memft.data.formats import render_prompt, special_tokens
from memft.errors import UserError
from memft.recipe import DataConfig

CACHE_SAFE = {"full", "lora", "qlora", "lcsb"}
"""Strategies whose model runs unchanged at inference, so generation may keep a KV cache. The others replace the
decoder layers' forward (RevFFN's stack, TokenTune, MEFT's adapter): each new token recomputes the whole sequence."""


@dataclass
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.7
    """0: greedy (the most likely token each time)."""
    top_p: float = 0.9
    seed: int | None = None


@dataclass
class Prompter:
    """Prompts -> ids, the way the run's examples were made (`data`: the run's data block; None: a plain model)."""

    tokenizer: object
    data: DataConfig | None = None
    template: str | None = None
    """The chat template (Jinja), or None when the model has none (then only `generate` works, on raw text)."""
    end_of_turn: str | None = None
    """What the chat template writes after an assistant turn, stripped (ChatML's `<|im_end|>`)."""

    @classmethod
    def of(cls, tokenizer, data: DataConfig | None, template: str | None = None) -> Prompter:
        """`template`: a built-in name (`chatml`) or Jinja that overrides the run's and the tokenizer's."""
        from memft.data.chat import CHAT_TEMPLATES, chat_template

        chosen = CHAT_TEMPLATES.get(template, template) if template else None
        if chosen is None and data is not None and data.format == "chat":
            chosen = chat_template(data, tokenizer)  # the rule training used
        elif chosen is None and getattr(tokenizer, "chat_template", None):
            chosen = tokenizer.get_chat_template()
        out = cls(tokenizer, data, chosen)
        if chosen is not None:
            out.end_of_turn = out._end_of_turn()
        return out

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except (TemplateError, TypeError, ValueError) as exc:
            roles = ", ".join(dict.fromkeys(m["role"] for m in messages))
            raise UserError(f"the chat template cannot render this conversation (roles: {roles}): {exc}") from None

    def _end_of_turn(self) -> str | None:
        """The text the template puts right after an assistant message's content."""
        probe = "memft-probe-reply"
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}]
        text = self._render(messages, False)
        at = text.rfind(probe)
        tail = text[at + len(probe):].strip() if at >= 0 else ""
        return tail or None

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """A conversation ending in a user turn, with the assistant's header after it."""
        if self.template is None:
            raise UserError("this model has no chat template: pass `--template chatml` (memft's built-in ChatML) or a "
                            "Jinja template, or use `memft generate` for plain text")
        return self.tokenizer(self._render(messages, True), add_special_tokens=False)["input_ids"]

    @property
    def chats(self) -> bool:
        """Prompts are conversation turns: a chat run's, or a plain model's that has a chat template."""
        return self.data.format == "chat" if self.data is not None else self.template is not None

    def system(self, given: str | None) -> str | None:
        """The system prompt: the one given, else the run's `data.system`."""
        return given or (self.data.system if self.data is not None else None)

    def prompt_ids(self, prompt: str, system: str | None = None) -> list[int]:
        """One prompt as the run's format saw prompts: a chat turn, an instruction, or the start of a text."""
        data = self.data
        if self.chats:
            return self.chat_ids(conversation(prompt, self.system(system)))
        prefix, _ = special_tokens(self.tokenizer)
        text = render_prompt(data.template, prompt) if data is not None and data.format == "instruction" else prompt
        return prefix + self.tokenizer(text, add_special_tokens=False)["input_ids"]


def conversation(prompt: str, system: str | None = None, history: list[dict] | None = None) -> list[dict]:
    return [*([{"role": "system", "content": system}] if system else []), *(history or []),
            {"role": "user", "content": prompt}]


@dataclass
class Reply:
    text: str
    new_tokens: int
    stopped: str
    """`eos`, `end_of_turn` or `max_new_tokens`."""


class _Stream:
    """A `generate` streamer: decodes the new tokens so far and hands on the text that is final, holding back
    what may be the start of the end-of-turn marker, so the marker is never shown."""

    def __init__(self, tokenizer, stop: str | None, on_text):
        self.tokenizer, self.stop, self.on_text = tokenizer, stop, on_text
        self.ids: list[int] = []
        self.shown = 0
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        self.ids += value.reshape(-1).tolist()
        text = self.text()
        safe = len(text)
        if self.stop:
            if self.stop in text:
                safe = text.index(self.stop)
            else:  # a suffix that could grow into the marker waits
                safe = next((len(text) - k for k in range(min(len(self.stop) - 1, len(text)), 0, -1)
                             if self.stop.startswith(text[len(text) - k:])), len(text))
        if safe > self.shown and self.on_text is not None:
            self.on_text(text[self.shown:safe])
        self.shown = max(self.shown, safe)

    def end(self) -> None:
        text = self.final()
        if len(text) > self.shown and self.on_text is not None:
            self.on_text(text[self.shown:])
        self.shown = len(text)

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def final(self) -> str:
        text = self.text()
        return text[:text.index(self.stop)] if self.stop and self.stop in text else text


@dataclass
class Generator:
    """A loaded model and how its prompts are made; `reply` generates, streaming text to `on_text`."""

    model: object
    prompter: Prompter
    cache: bool = True
    history: list[dict] = field(default_factory=list)

    @classmethod
    def of(cls, model, tokenizer, data: DataConfig | None, strategies: list[str],
           template: str | None = None) -> Generator:
        """A model in memory (with `strategies` applied), its tokenizer, and the data block it trains on."""
        return cls(model, Prompter.of(tokenizer, data, template), cache=set(strategies) <= CACHE_SAFE)

    @classmethod
    def load(cls, ref: str, *, template: str | None = None, dtype: str | None = None, device: str = "auto",
             trust_remote_code: bool = False) -> Generator:
        from memft.eval.models import load

        loaded = load(ref, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        if loaded.task != "causal_lm":
            raise UserError(f"{ref} is a classifier ({loaded.task}); `memft chat` and `memft generate` need a causal "
                            "language model")
        loaded.model.eval()
        return cls.of(loaded.model, loaded.tokenizer, loaded.data, loaded.adapters, template)

    @torch.no_grad()
    def generate(self, ids: list[int], sampling: Sampling, on_text=None, stop: str | None = None) -> Reply:
        tokenizer = self.prompter.tokenizer
        device = next(self.model.parameters()).device
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        stream = _Stream(tokenizer, stop, on_text)
        greedy = sampling.temperature == 0
        kwargs = {} if greedy else {"temperature": sampling.temperature, "top_p": sampling.top_p}
        if stop:
            kwargs.update(stop_strings=[stop], tokenizer=tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        out = self.model.generate(input_ids=torch.tensor([ids], device=device),
                                  attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                                  max_new_tokens=sampling.max_new_tokens, do_sample=not greedy,
                                  use_cache=self.cache, pad_token_id=pad, streamer=stream, **kwargs)
        new = out[0, len(ids):].tolist()
        text = stream.final()
        eos = tokenizer.eos_token_id
        stopped = ("end_of_turn" if stop and stop in stream.text() else
                   "eos" if eos is not None and new and new[-1] == eos else "max_new_tokens")
        return Reply(text.strip() if stop else text, len(new), stopped)

    def complete(self, prompt: str, sampling: Sampling, system: str | None = None, on_text=None) -> Reply:
        """One prompt, no history (`memft generate`)."""
        p = self.prompter
        return self.generate(p.prompt_ids(prompt, system), sampling, on_text, p.end_of_turn if p.chats else None)

    def say(self, text: str, sampling: Sampling, system: str | None = None, on_text=None) -> Reply:
        """The next turn of the conversation kept in `history` (`memft chat`)."""
        p = self.prompter
        messages = conversation(text, p.system(system), self.history)
        reply = self.generate(p.chat_ids(messages), sampling, on_text, p.end_of_turn)
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply.text}]
        return reply
