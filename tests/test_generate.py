"""`memft generate` and `memft chat`: prompts rendered exactly as the run's training examples were, greedy replies
equal to a plain argmax loop (with and without the KV cache), the end-of-turn marker never shown, and the CLI."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from memft.cli import app
from memft.data.chat import CHATML, encode_chat
from memft.data.formats import encode_instruction
from memft.generate import Generator, Prompter, Sampling, _Stream
from memft.models.load import load_tokenizer
from memft.recipe import DataConfig, ModelConfig
from memft.train.loop import Trainer

REPO = Path(__file__).resolve().parents[1]
LLAMA3 = ("{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
          "message['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")


@pytest.fixture
def tokenizer():  # per test: a chat encoding sets its template on the tokenizer
    return load_tokenizer(ModelConfig(name="stories260K"))


def chat_data(**extra) -> DataConfig:
    return DataConfig(source="unused.jsonl", format="chat", chat_template="chatml", **extra)


def test_a_chat_prompt_is_the_training_examples_prefix_up_to_the_reply(tokenizer):
    data = chat_data(system="Be brief.")
    conversation = [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}]
    [example], dropped = encode_chat([{"messages": conversation}], data, tokenizer, source="test")
    first_trained = next(i for i, label in enumerate(example["labels"]) if label != -100)
    p = Prompter.of(tokenizer, data)
    assert p.template == CHATML and p.end_of_turn == "<|im_end|>"
    assert p.prompt_ids("Name a color.") == example["input_ids"][:first_trained]  # system default included


def test_an_instruction_prompt_is_the_training_examples_prompt(tokenizer):
    data = DataConfig(source="unused.jsonl", format="instruction", template="alpaca")
    [example], _ = encode_instruction([{"instruction": "Add 2 and 3.", "output": "5"}], data, tokenizer,
                                      ("instruction", None, "output"))
    prompt_len = next(i for i, label in enumerate(example["labels"]) if label != -100)
    p = Prompter.of(tokenizer, data)
    assert p.template is None and p.prompt_ids("Add 2 and 3.") == example["input_ids"][:prompt_len]


def test_end_of_turn_markers_are_read_off_the_template(tokenizer):
    assert Prompter.of(tokenizer, None, template=LLAMA3).end_of_turn == "<|eot_id|>"
    assert Prompter.of(tokenizer, None, template="chatml").end_of_turn == "<|im_end|>"
    assert Prompter.of(tokenizer, None).template is None  # stories260K has none of its own


def test_the_stream_never_shows_the_end_of_turn_marker(tokenizer):
    ids = tokenizer("Hello there, friend<|im_end|>\nafter", add_special_tokens=False)["input_ids"]
    pieces = []
    stream = _Stream(tokenizer, "<|im_end|>", pieces.append)
    stream.put(torch.tensor([[1, 2]]))  # the prompt comes first and is not shown
    for i in ids:
        stream.put(torch.tensor([i]))
        assert "<" not in "".join(pieces)  # not even the marker's first character
    stream.end()
    assert "".join(pieces) == stream.final() == tokenizer.decode(ids[:0] + ids, skip_special_tokens=True).split(
        "<|im_end|>")[0]
    assert stream.final().strip() == "Hello there, friend"


def argmax_loop(model, ids: list[int], n: int) -> list[int]:
    """The reference: n greedy tokens by full forwards, no cache."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([seq])).logits
            seq.append(int(logits[0, -1].argmax()))
    return seq[len(ids):]


@pytest.mark.parametrize("cache", [True, False])
def test_greedy_replies_equal_an_argmax_loop(tokenizer, cache):
    gen = Generator.load("stories260K")
    gen.cache = cache
    ids = gen.prompter.prompt_ids("Once upon a time")
    reply = gen.generate(ids, Sampling(max_new_tokens=12, temperature=0))
    want = argmax_loop(gen.model, ids, 12)
    eos = tokenizer.eos_token_id
    want = want[:want.index(eos) + 1] if eos in want else want
    assert reply.new_tokens == len(want) and reply.text == tokenizer.decode(want, skip_special_tokens=True)


def test_a_seeded_sample_repeats_and_the_conversation_is_kept():
    gen = Generator.load("stories260K", template="chatml")
    sampling = Sampling(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    first = gen.say("Hi", sampling)
    assert gen.history == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": first.text}]
    again = Generator.load("stories260K", template="chatml").say("Hi", sampling)
    assert again.text == first.text and first.new_tokens == again.new_tokens
    second_ids = gen.prompter.chat_ids([*gen.history, {"role": "user", "content": "More"}])
    assert second_ids[:len(gen.prompter.chat_ids(gen.history[:1]))] == gen.prompter.chat_ids(gen.history[:1])
    gen.say("More", sampling)
    assert [m["role"] for m in gen.history] == ["user", "assistant", "user", "assistant"]


class ScriptedModel(torch.nn.Module):
    """`generate` that streams fixed ids: the reply's stop handling without a trained model."""

    def __init__(self, ids):
        super().__init__()
        self.ids, self.w = ids, torch.nn.Parameter(torch.zeros(1))

    def generate(self, input_ids, streamer, **kwargs):
        streamer.put(input_ids)
        for i in self.ids:
            streamer.put(torch.tensor([i]))
        streamer.end()
        return torch.cat([input_ids, torch.tensor([self.ids])], dim=1)


def test_a_reply_stops_at_the_end_of_turn_and_hides_it(tokenizer):
    scripted = tokenizer("Sure thing.<|im_end|>", add_special_tokens=False)["input_ids"]
    gen = Generator(ScriptedModel(scripted), Prompter.of(tokenizer, chat_data()))
    shown = []
    reply = gen.say("Can you help?", Sampling(temperature=0), on_text=shown.append)
    assert reply.text == "Sure thing." and reply.stopped == "end_of_turn" and "".join(shown).strip() == "Sure thing."
    assert gen.history[-1] == {"role": "assistant", "content": "Sure thing."}


def test_cli_generate_and_chat_on_a_run(tmp_path):
    r = ["train.max_steps=1", "train.eval_every=null", "log.progress=false", "output.plot=false",
         "data.max_samples=16", "train.batch_size=4"]
    from memft.recipe import load

    Trainer(load(REPO / "recipes" / "quickstart.yaml", r), run_dir=tmp_path / "run").setup().train()
    runner = CliRunner()
    out = runner.invoke(app, ["generate", str(tmp_path / "run"), "-p", "2 + 2?", "-p", "3 + 3?", "--temperature", "0",
                              "--max-new-tokens", "5", "--json"])
    assert out.exit_code == 0, out.output
    lines = [json.loads(x) for x in out.stdout.splitlines()]
    assert [x["prompt"] for x in lines] == ["2 + 2?", "3 + 3?"] and all(1 <= x["new_tokens"] <= 5 for x in lines)

    out = runner.invoke(app, ["chat", str(tmp_path / "run"), "--json", "--temperature", "0", "--max-new-tokens", "4"],
                        input="Hello\n\nHow are you?\n")
    assert out.exit_code == 2 and "no chat template" in out.output  # an instruction run, no --template
    out = runner.invoke(app, ["chat", str(tmp_path / "run"), "--template", "chatml", "--json", "--temperature", "0",
                              "--max-new-tokens", "4"], input="Hello\n\nHow are you?\n")
    assert out.exit_code == 0, out.output
    turns = [json.loads(x) for x in out.stdout.splitlines()]
    assert [(t["user"], t["turn"]) for t in turns] == [("Hello", 1), ("How are you?", 2)]

    out = runner.invoke(app, ["generate", str(tmp_path / "missing"), "-p", "x"])
    assert out.exit_code == 2 and "error:" in out.output


def test_log_samples_writes_replies_at_each_evaluation_without_touching_training_randomness(tmp_path, monkeypatch):
    from memft.recipe import load

    base = ["train.max_steps=4", "train.eval_every=2", "log.progress=false", "output.plot=false", "data.max_samples=32",
            "train.batch_size=4", "train.eval_batches=1", "output.save_every=2", "log.tensorboard=true"]
    plain = Trainer(load(REPO / "recipes" / "quickstart.yaml", base), run_dir=tmp_path / "plain").setup()
    plain.train()
    samples = ["log.samples={prompts: ['1 + 1?', 'Tom has 2 pens.'], max_new_tokens: 6, temperature: 1.0}"]
    t = Trainer(load(REPO / "recipes" / "quickstart.yaml", [*base, *samples]), run_dir=tmp_path / "run").setup()
    states = []
    real = t._write_samples

    def watched():
        before = torch.get_rng_state()
        real()
        states.append(torch.equal(before, torch.get_rng_state()))

    monkeypatch.setattr(t, "_write_samples", watched)
    t.train()
    assert states == [True, True, True]  # steps 0, 2 and 4; the global generator untouched each time
    rows = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    prompts = ("1 + 1?", "Tom has 2 pens.")
    assert [(r["step"], r["prompt"]) for r in rows] == [(s, p) for s in (0, 2, 4) for p in prompts]
    assert all(isinstance(r["reply"], str) for r in rows)
    losses = [[m["loss"] for m in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
              for d in (tmp_path / "plain", tmp_path / "run")]
    assert losses[0] == losses[1]  # samples change nothing in training

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    assert [e.step for e in events.Tensors("samples/text_summary")] == [0, 2, 4]
    first = events.Tensors("samples/text_summary")[0].tensor_proto.string_val[0].decode()
    assert f"**1 + 1?**\n\n{rows[0]['reply']}" in first

    # a resume from step 2 rewrites the later samples once
    (tmp_path / "run" / "summary.json").unlink()
    import shutil

    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-000004")
    Trainer(load(REPO / "recipes" / "quickstart.yaml", [*base, *samples]), run_dir=tmp_path / "run").setup().train()
    again = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert again == rows


def test_memft_version():
    from memft import __version__

    out = CliRunner().invoke(app, ["--version"])
    assert out.exit_code == 0 and out.stdout.strip() == f"memft {__version__}"


def test_a_chat_run_chats_and_exports_with_its_template(tmp_path):
    from memft.export import export_run as export
    from memft.recipe import load

    r = load(REPO / "recipes" / "chat.yaml", ["train.max_steps=2", "train.eval_every=null", "log.progress=false",
                                              "output.plot=false"])
    Trainer(r, run_dir=tmp_path / "run").setup().train()
    gen = Generator.load(str(tmp_path / "run"))
    assert gen.prompter.template == CHATML and gen.prompter.end_of_turn == "<|im_end|>"
    out = CliRunner().invoke(app, ["chat", str(tmp_path / "run"), "--json", "--temperature", "0", "--max-new-tokens",
                                   "3"], input="Hi\n")
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["turn"] == 1
    export(tmp_path / "run", tmp_path / "exported")
    config = json.loads((tmp_path / "exported" / "tokenizer_config.json").read_text())
    assert "local_files_only" not in config
    exported = Generator.load(str(tmp_path / "exported"))
    assert exported.prompter.template == CHATML  # a plain HF directory renders as the run did
    messages = [{"role": "user", "content": "Hi"}]
    assert exported.prompter.chat_ids(messages) == gen.prompter.chat_ids(messages)


def test_memft_chat_answers_a_scripted_stdin_in_a_subprocess_and_generate_equals_transformers():
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "memft.cli"]
    chat = subprocess.run([*cmd, "chat", "stories260K", "--template", "chatml", "--temperature", "0",
                           "--max-new-tokens", "6"], input="Hello\n/reset\nHello\n/exit\n", capture_output=True,
                          text=True, env=env, timeout=300, cwd=REPO)
    assert chat.returncode == 0, chat.stderr
    replies = [line.split("model> ", 1)[1] for line in chat.stdout.splitlines() if "model> " in line]
    assert len(replies) == 2 and replies[0] == replies[1] and replies[0].strip()  # /reset: the same first turn
    assert "(conversation cleared)" in chat.stdout

    out = subprocess.run([*cmd, "generate", "stories260K", "-p", "Once upon a time", "--temperature", "0",
                          "--max-new-tokens", "20", "--json"], capture_output=True, text=True, env=env, timeout=300,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    gen = Generator.load("stories260K")
    ids = torch.tensor([gen.prompter.prompt_ids("Once upon a time")])
    with torch.no_grad():
        want = gen.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=20,
                                  do_sample=False, pad_token_id=gen.prompter.tokenizer.eos_token_id)
    new = want[0, ids.size(1):].tolist()
    assert got["new_tokens"] == len(new)
    assert got["reply"] == gen.prompter.tokenizer.decode(new, skip_special_tokens=True)
