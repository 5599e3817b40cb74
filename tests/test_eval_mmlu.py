"""`memft eval mmlu` against lm-evaluation-harness: the same prompts, the same log-likelihoods, the same accuracy."""

import json

import pytest
import torch
from typer.testing import CliRunner

from memft.cli import app
from memft.eval import loglik, mmlu
from memft.models.load import load_tokenizer
from memft.recipe import ModelConfig

SUBJECTS = ["abstract_algebra", "anatomy"]


@pytest.fixture(scope="module")
def tiny():
    """A random tiny Llama (seeded) and the stories260K tokenizer, which adds BOS as Llama tokenizers do."""
    from memft.models.load import load_model

    cfg = ModelConfig(name="tiny-llama", seed=3)
    return load_model(cfg).model.eval(), load_tokenizer(cfg)


def q(text, answer, *choices):
    return mmlu.Question(text, tuple(choices), answer)


def test_the_prompt_is_the_harness_prompt():
    shots = [q("  What is 1+1? ", 1, "1", "2", "3", "4"), q("Pick C.", 2, "a", "b", "c", " d ")]
    got = mmlu.context("college_physics", shots, q("Last one?\n", 0, "x", "y", "z", "w"))
    assert got == ("The following are multiple choice questions (with answers) about college physics.\n\n"
                   "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
                   "Pick C.\nA. a\nB. b\nC. c\nD.  d \nAnswer: C\n\n"  # only the question is stripped
                   "Last one?\nA. x\nB. y\nC. z\nD. w\nAnswer:")


def test_pairs_split_one_joint_encoding_and_move_trailing_spaces(tiny):
    _, tok = tiny
    head, cont = loglik.encode_pair(tok, "Answer: ", "A")  # the space belongs to the continuation
    assert (head, cont) == loglik.encode_pair(tok, "Answer:", " A")
    whole = tok.encode("Answer: A")
    assert head + cont == whole and head == tok.encode("Answer:") and head[0] == tok.bos_token_id


def test_scores_are_summed_log_softmax_with_left_truncation(tiny):
    model, tok = tiny
    ctx, cont = "Once upon a time there was a little girl named", " Lily"
    for max_length in (1024, 9):  # the second cuts the context from the left
        (got,) = loglik.score(model, tok, [(ctx, cont)], max_length=max_length)
        head, tail = loglik.encode_pair(tok, ctx, cont)
        ids = (head + tail)[-(max_length + 1):][:-1]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)[-len(tail):]
        want = logp.gather(1, torch.tensor(tail)[:, None]).sum().item()
        assert got.loglikelihood == pytest.approx(want, abs=1e-5)
        assert got.greedy == bool((logp.argmax(-1) == torch.tensor(tail)).all())


def test_batching_and_shared_forwards_do_not_change_the_scores(tiny):
    model, tok = tiny
    requests = [(f"Question {i}: {'why ' * i}\nAnswer:", f" {c}") for i in range(5) for c in "ABCD"]
    alone = [s.loglikelihood for s in loglik.score(model, tok, requests, batch_size=1)]
    batched = [s.loglikelihood for s in loglik.score(model, tok, requests, batch_size=8)]
    assert batched == pytest.approx(alone, abs=1e-4)


def harness_scores(model, tok, data_dir, shots, limit, max_length=None):
    """lm-evaluation-harness's own `mmlu_<subject>` tasks, fed the local CSVs through `custom_dataset`."""
    lm_eval = pytest.importorskip("lm_eval")
    import datasets
    from lm_eval.models.huggingface import HFLM

    def local(subject, **_):
        def split(name):
            rows = mmlu.read_csv(data_dir / name / f"{subject}_{name}.csv")
            return datasets.Dataset.from_dict({"question": [r.question for r in rows], "subject": [subject] * len(rows),
                                               "choices": [list(r.choices) for r in rows],
                                               "answer": [r.answer for r in rows]})
        return datasets.DatasetDict({"test": split("val"), "dev": split("dev")})

    tasks = [{"task": f"mmlu_{s}", "custom_dataset": local, "dataset_kwargs": {"subject": s}, "test_split": "test",
              "fewshot_split": "dev", "fewshot_config": {"sampler": "first_n"}, "output_type": "multiple_choice",
              "description": f"The following are multiple choice questions (with answers) about "
                             f"{s.replace('_', ' ')}.\n\n",
              "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
                             "D. {{choices[3]}}\nAnswer:",
              "doc_to_choice": ["A", "B", "C", "D"], "doc_to_target": "answer",
              "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
              "metadata": {"version": 1.0}} for s in SUBJECTS]
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=8, device="cpu", max_length=max_length)
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=shots, limit=limit, log_samples=True,
                                  bootstrap_iters=0)
    samples = {s: sorted(out["samples"][f"mmlu_{s}"], key=lambda x: x["doc_id"]) for s in SUBJECTS}
    return ({s: [[r[0][0] for r in x["resps"]] for x in samples[s]] for s in SUBJECTS},
            {s: out["results"][f"mmlu_{s}"]["acc,none"] for s in SUBJECTS})


@pytest.mark.parametrize("shots,max_length", [(5, None), (2, 300)])  # 300 tokens: contexts are left-truncated
def test_predictions_and_accuracy_equal_lm_evaluation_harness(tiny, shared_data, shots, max_length):
    model, tok = tiny
    data = shared_data / "mmlu"
    questions, exemplars = mmlu.load(data, "val", SUBJECTS), mmlu.load(data, "dev", SUBJECTS)
    ours = mmlu.evaluate(model, tok, questions, exemplars, shots=shots, limit=6, max_length=max_length)
    lls, accs = harness_scores(model, tok, data, shots, limit=6, max_length=max_length)
    summary = ours.summary()
    for s in SUBJECTS:
        mine = [r for r in ours.records if r["subject"] == s]
        assert len(mine) == len(lls[s]) == 6
        for record, theirs in zip(mine, lls[s]):
            assert record["loglikelihoods"] == pytest.approx(theirs, abs=1e-4)
            assert record["pred"] == theirs.index(max(theirs))  # the harness's np.argmax: first maximum
        assert summary["subjects"][s]["acc"] == accs[s]
    assert summary["mmlu"] == sum(accs[s] * 6 for s in SUBJECTS) / 12  # size-weighted, like the harness's group


def test_eval_mmlu_on_a_lora_run_uses_its_adapters(tmp_path, shared_data):
    run = tmp_path / "run"
    train = CliRunner().invoke(app, ["train", "recipes/lora.yaml", "model.name=tiny-llama", "train.max_steps=3",
                                     "train.lr=5e-2", "data.max_samples=16", "data.max_length=64",
                                     "train.batch_size=4", "train.eval_every=null", "log.progress=false",
                                     "output.plot=false", f"output.dir={run}"])
    assert train.exit_code == 0, train.output
    common = ["eval", "mmlu", "--data", str(shared_data / "mmlu"), "--split", "val", "--subjects", "anatomy",
              "--limit", "3", "--shots", "1"]
    tuned = CliRunner().invoke(app, [*common, "--model", str(run), "--json", str(tmp_path / "tuned.json")])
    base = CliRunner().invoke(app, [*common, "--model", "tiny-llama", "--json", str(tmp_path / "base.json")])
    assert tuned.exit_code == base.exit_code == 0, tuned.output + base.output
    tuned, base = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("tuned", "base"))
    assert tuned["adapters"] == ["lora"] and base["adapters"] == []
    assert tuned["results"]["questions"] == 3 and tuned["shots"] == 1 and tuned["bos"] is True
    assert tuned["questions"][0]["loglikelihoods"] != base["questions"][0]["loglikelihoods"]  # the adapters count


def test_user_mistakes_exit_2_with_a_sentence(tmp_path, shared_data):
    unknown = CliRunner().invoke(app, ["eval", "mmlu", "--model", "tiny-llama", "--data", str(shared_data / "mmlu"),
                                       "--split", "val", "--subjects", "astrology"])
    assert unknown.exit_code == 2 and "unknown MMLU subject" in unknown.output
    empty = CliRunner().invoke(app, ["eval", "mmlu", "--model", "tiny-llama", "--data", str(tmp_path)])
    assert empty.exit_code == 2 and "no MMLU test files" in empty.output
    offline = CliRunner().invoke(app, ["eval", "mmlu", "--model", "tiny-llama", "--subjects", "anatomy"])  # hub
    assert offline.exit_code == 2 and "--data DIR" in offline.output
    dtype = CliRunner().invoke(app, ["eval", "mmlu", "--model", "tiny-llama", "--dtype", "fp99"])
    assert dtype.exit_code == 2 and "float32" in dtype.output  # not a pydantic traceback


def test_reusing_the_shared_prefix_gives_the_full_forward_scores(tiny, shared_data):
    model, tok = tiny
    data = shared_data / "mmlu"
    questions, exemplars = mmlu.load(data, "val", SUBJECTS), mmlu.load(data, "dev", SUBJECTS)
    requests = [(mmlu.context(s, exemplars[s][:5], q), f" {c}") for s in SUBJECTS for q in questions[s][:4]
                for c in "ABCD"]
    full = loglik.score(model, tok, requests, reuse_prefix=False)
    reused = loglik.score(model, tok, requests, reuse_prefix=True, batch_size=8)
    assert [s.loglikelihood for s in reused] == pytest.approx([s.loglikelihood for s in full], abs=1e-4)
    assert [s.greedy for s in reused] == [s.greedy for s in full]
    shared = loglik._common_prefix(sorted({tuple(tok.encode(r[0])) for r in requests[:16]}))
    assert shared > 500  # the description and five examples: most of each input


def test_a_recipes_eval_section_scores_the_trained_model_as_memft_eval_does(tmp_path, shared_data):
    run = tmp_path / "run"
    mmlu_dir = shared_data / "mmlu"
    section = f"eval={{mmlu: {{data: '{mmlu_dir}', split: val, shots: 1, subjects: [anatomy], limit: 3}}}}"
    train = CliRunner().invoke(app, ["train", "recipes/lora.yaml", "model.name=tiny-llama", "train.max_steps=2",
                                     "train.lr=5e-2", "data.max_samples=16", "data.max_length=64", "train.batch_size=4",
                                     "train.eval_every=null", "log.progress=false", "output.plot=false",
                                     f"output.dir={run}", section])
    assert train.exit_code == 0, train.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval"]["mmlu"]["questions"] == 3 and "subjects" not in summary["eval"]["mmlu"]
    in_run = json.loads((run / "eval_mmlu.json").read_text())
    after = CliRunner().invoke(app, ["eval", "mmlu", "--model", str(run), "--data", str(mmlu_dir), "--split", "val",
                                     "--shots", "1", "--subjects", "anatomy", "--limit", "3",
                                     "--json", str(tmp_path / "after.json")])
    assert after.exit_code == 0, after.output
    later = json.loads((tmp_path / "after.json").read_text())  # the same model, rebuilt from its checkpoint
    for a, b in zip(in_run["questions"], later["questions"], strict=True):
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-5)


def test_a_model_that_ignores_the_cache_is_scored_without_prefix_reuse(tiny, monkeypatch):
    model, tok = tiny
    requests = [("The same long shared beginning of every context, " * 8 + f"question {i}?\nAnswer:", f" {c}")
                for i in range(3) for c in "ABCD"]
    want = loglik.score(model, tok, requests, reuse_prefix=False)
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, past_key_values=None, **k: forward(*a, **k))  # drops the cache
    got = loglik.score(model, tok, requests)
    assert [s.loglikelihood for s in got] == pytest.approx([s.loglikelihood for s in want], abs=1e-4)


def test_scores_are_taken_without_dropout_even_from_a_model_left_in_train_mode():
    from memft.models.load import load_model

    cfg = ModelConfig(name="tiny-llama", seed=3, config_overrides={"attention_dropout": 0.5})
    model, tok = load_model(cfg).model, load_tokenizer(cfg)
    requests = [("Once upon a time there was a", " girl"), ("The sky is", " blue")]
    model.eval()
    want = [s.loglikelihood for s in loglik.score(model, tok, requests)]
    model.train()  # as a recipe's `eval:` section finds it at the end of training
    assert [s.loglikelihood for s in loglik.score(model, tok, requests)] == want


# --- a run directory is self-contained -------------------------------------------------------------------------

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
TINY_RUN = ["train.max_steps=1", "data.max_samples=16", "data.max_length=32", "train.batch_size=4",
            "train.eval_batches=1", "train.eval_every=null", "log.progress=false", "output.plot=false"]


def tiny_mmlu(folder):
    """Two anatomy questions to score and one few-shot example, in the original CSV layout."""
    import csv

    for split, rows in {"val": [["Which bone is in the arm?", "femur", "humerus", "tibia", "fibula", "B"],
                                ["Where is the heart?", "chest", "foot", "hand", "knee", "A"]],
                        "dev": [["Which organ pumps blood?", "liver", "lung", "heart", "skin", "C"]]}.items():
        (folder / split).mkdir(parents=True)
        with open(folder / split / f"anatomy_{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows(rows)
    return folder


def test_eval_mmlu_scores_a_run_from_another_working_directory(tmp_path, monkeypatch):
    import yaml

    monkeypatch.chdir(REPO)  # the recipe and its data are given relative to the project
    run = tmp_path / "run"
    train = CliRunner().invoke(app, ["train", "recipes/quickstart.yaml", "data.source=data/stories260k_samples.jsonl",
                                     "data.format=text", *TINY_RUN, "-o", str(run)])
    assert train.exit_code == 0, train.output
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert saved["data"]["source"] == str(REPO / "recipes" / "data" / "stories260k_samples.jsonl")
    data = tiny_mmlu(tmp_path / "mmlu")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    out = CliRunner().invoke(app, ["eval", "mmlu", "--model", str(run), "--data", str(data), "--split", "val",
                                   "--subjects", "anatomy", "--shots", "1", "--json", "scores.json"])
    assert out.exit_code == 0, out.output
    assert json.loads((tmp_path / "elsewhere" / "scores.json").read_text())["results"]["questions"] == 2


def test_scoring_a_run_needs_no_training_data_and_keeps_its_label_names(tmp_path):
    from memft.eval import models
    from memft.recipe import load
    from memft.train.loop import Trainer

    lines = (REPO / "recipes" / "data" / "tiny_sst2.tsv").read_text().splitlines()
    named = [lines[0]] + [f"{text}\t{'positive' if label == '1' else 'negative'}"
                          for text, label in (x.rsplit("\t", 1) for x in lines[1:])]
    data = tmp_path / "sst2_named.tsv"
    data.write_text("\n".join(named) + "\n")
    r = load(REPO / "recipes" / "classify_sst2.yaml", [*TINY_RUN, f"data.source={data}"])
    trainer = Trainer(r, run_dir=tmp_path / "run").setup()
    trainer.train()
    assert trainer.data.label_names == ["negative", "positive"]
    data.unlink()  # the run's data is gone: scoring must not need it

    loaded = models.load(str(tmp_path / "run"))
    assert loaded.task == "sequence_classification" and loaded.label_names == ["negative", "positive"]
    trained = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    scored = dict(loaded.model.named_parameters())
    assert all(torch.equal(p, scored[n]) for n, p in trained.items())  # the checkpoint's weights, adapters included
