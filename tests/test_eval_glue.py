"""`memft eval glue`: metrics against hand-computed values, the prompted form against lm-evaluation-harness itself."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memft.cli import app
from memft.errors import UserError
from memft.eval import glue


def test_metrics_equal_hand_computed_values():
    golds, preds = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]  # tp 2, tn 1, fp 1, fn 1
    assert glue.accuracy(golds, preds) == 3 / 5
    assert glue.matthews(golds, preds) == pytest.approx((2 * 1 - 1 * 1) / (3 * 3 * 2 * 2) ** 0.5)
    assert glue.f1(golds, preds) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert glue.matthews([1, 1, 0], [1, 1, 1]) == 0.0  # an empty confusion row: 0, as scikit-learn
    assert glue.f1([0, 0], [0, 0]) == 0.0
    xs, ys = [1.0, 2.0, 2.0, 3.0], [1.0, 3.0, 2.0, 4.0]
    assert glue.pearson(xs, ys) == pytest.approx(3.0 / (2.0 * 5.0) ** 0.5)
    # ranks (1, 2.5, 2.5, 4) and (1, 3, 2, 4): ties share their mean rank
    assert glue.spearman(xs, ys) == pytest.approx(4.5 / (4.5 * 5.0) ** 0.5)
    assert glue.metrics("mrpc", golds, preds) == {"acc": 0.6, "f1": pytest.approx(2 / 3)}


def test_local_files_read_as_glue_labels(shared_data):
    sst2, cola = glue.load("sst2", shared_data / "glue", 3), glue.load("cola", shared_data / "glue", 3)
    assert sst2[0] == {"sentence": "it 's a charming and often affecting journey . ", "label": 1}  # not stripped
    assert cola[0] == {"sentence": "The sailors rode the breeze clear of the rocks.", "label": 1}
    with pytest.raises(UserError, match="MRPC/dev.tsv"):
        glue.load("mrpc", shared_data / "glue")


def test_a_run_trained_on_string_labels_maps_back_to_glue_ids():
    # memft numbers string labels in sorted order; GLUE's MNLI is entailment 0, neutral 1, contradiction 2
    assert glue.as_glue_labels("mnli", [0, 1, 2], ["contradiction", "entailment", "neutral"]) == [2, 0, 1]
    assert glue.as_glue_labels("sst2", [0, 1], None) == [0, 1]
    with pytest.raises(UserError, match="not rte's labels"):
        glue.as_glue_labels("rte", [0], ["negative", "positive"])


def harness_glue(model, tok, rows, task):
    """The harness's own tasks/glue/<task>/default.yaml (prompt functions included), fed `rows` through
    `custom_dataset`."""
    lm_eval = pytest.importorskip("lm_eval")
    import datasets
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import __file__ as tasks_init
    from lm_eval.tasks._yaml_loader import load_yaml

    def local(**_):
        split = datasets.Dataset.from_list([{**r, "idx": i} for i, r in enumerate(rows)])
        return datasets.DatasetDict({"train": split, "validation": split, "validation_matched": split})

    config = load_yaml(Path(tasks_init).parent / "glue" / task / "default.yaml")
    for key in ("tag", "dataset_path", "dataset_name"):
        config.pop(key, None)
    config["custom_dataset"] = local
    out = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=8, device="cpu"),
                                  tasks=[config], num_fewshot=0, log_samples=True, bootstrap_iters=0)
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return [[r[0][0] for r in s["resps"]] for s in samples], out["results"][task]


@pytest.mark.parametrize("task,metric", [("sst2", "acc"), ("cola", "mcc")])
def test_the_prompted_form_equals_lm_evaluation_harness(shared_data, task, metric):
    from memft.models.load import load_model, load_tokenizer
    from memft.recipe import ModelConfig

    cfg = ModelConfig(name="stories260K")  # the real pretrained model: its answers are not all one class
    model, tok = load_model(cfg).model.eval(), load_tokenizer(cfg)
    rows = glue.load(task, shared_data / "glue", 40)
    preds, lls = glue.choose(model, tok, task, rows)
    theirs, results = harness_glue(model, tok, rows, task)
    for mine, their in zip(lls, theirs, strict=True):
        assert mine == pytest.approx(their, abs=1e-4)
    ours = glue.metrics(task, [r["label"] for r in rows], preds)
    assert ours[metric] == pytest.approx(results[f"{metric},none"], abs=1e-12)


SENTENCES = ["The cat sat on the mat.", "A dog barked at the mailman", "Is the sky blue?", " It rained all day . "]


@pytest.mark.parametrize("task", ["mrpc", "qqp", "rte", "qnli", "mnli", "wnli"])
def test_the_pair_task_prompts_are_the_harness_prompts(task):
    """No local data for these: a few made-up pairs through both, on a seeded tiny Llama."""
    from memft.models.load import load_model, load_tokenizer
    from memft.recipe import ModelConfig

    cfg = ModelConfig(name="tiny-llama", seed=5)
    model, tok = load_model(cfg).model.eval(), load_tokenizer(cfg)
    a, b = glue.TASKS[task].fields
    rows = [{a: SENTENCES[i], b: SENTENCES[(i + 1) % 4], "label": i % len(glue.TASKS[task].choices)} for i in range(4)]
    _, lls = glue.choose(model, tok, task, rows)
    theirs, _ = harness_glue(model, tok, rows, task)
    for mine, their in zip(lls, theirs, strict=True):
        assert mine == pytest.approx(their, abs=1e-4)


def test_eval_glue_on_a_classification_run(tmp_path, shared_data):
    run = tmp_path / "run"
    train = CliRunner().invoke(app, ["train", "recipes/classify_sst2.yaml", "model.name=tiny-llama",
                                     f"data.source={shared_data / 'glue' / 'SST-2' / 'dev.tsv'}", "data.max_samples=64",
                                     "data.max_length=64", "train.max_steps=2", "train.batch_size=8",
                                     "train.eval_every=null", "log.progress=false", "output.plot=false",
                                     f"output.dir={run}"])
    assert train.exit_code == 0, train.output
    out = tmp_path / "sst2.json"
    result = CliRunner().invoke(app, ["eval", "glue", "--task", "sst2", "--model", str(run), "--data",
                                      str(shared_data / "glue"), "--limit", "50", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["form"] == "classifier" and report["examples"] == 50
    preds = [p["pred"] for p in report["predictions"]]
    golds = [r["label"] for r in glue.load("sst2", shared_data / "glue", 50)]
    assert report["results"]["acc"] == sum(p == g for p, g in zip(preds, golds)) / 50
    bad = CliRunner().invoke(app, ["eval", "glue", "--task", "sts", "--model", str(run), "--data", "x"])
    assert bad.exit_code == 2 and "unknown GLUE task" in bad.output


def test_a_classifier_directory_whose_tokenizer_has_no_pad_token_is_scored_as_each_example_alone(tmp_path, shared_data):
    """A decoder classifier pools the last token that is not the pad id: the config must name the id `classify`
    pads with (EOS here), or transformers refuses batches of more than one."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from memft.models.load import load_model, load_tokenizer
    from memft.recipe import ModelConfig

    cfg = ModelConfig(name="tiny-llama", task="sequence_classification", seed=4)
    tok = load_tokenizer(cfg)
    assert tok.pad_token_id is None
    model = load_model(cfg, num_labels=2).model.eval()
    model.config.pad_token_id = None
    model.save_pretrained(tmp_path / "clf")
    tok.save_pretrained(tmp_path / "clf")
    out = tmp_path / "sst2.json"
    result = CliRunner().invoke(app, ["eval", "glue", "--task", "sst2", "--model", str(tmp_path / "clf"),
                                      "--data", str(shared_data / "glue"), "--limit", "6", "--json", str(out)])
    assert result.exit_code == 0, result.output
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "clf").eval()
    alone = []
    for r in glue.load("sst2", shared_data / "glue", 6):
        with torch.no_grad():
            alone.append(int(reloaded(**tok(r["sentence"], return_tensors="pt")).logits.argmax(-1)))
    assert [p["pred"] for p in json.loads(out.read_text())["predictions"]] == alone


def test_mrpc_dev_tsv_as_published_starts_with_a_bom(tmp_path):
    (tmp_path / "MRPC").mkdir()
    (tmp_path / "MRPC" / "dev.tsv").write_bytes(
        "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tHe said so .\tHe did say so .\n".encode())
    assert glue.load("mrpc", tmp_path) == [{"sentence1": "He said so .", "sentence2": "He did say so .", "label": 1}]


def test_a_latin1_glue_file_is_one_sentence(tmp_path):
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "dev.tsv").write_bytes("sentence\tlabel\ncaf\u00e9 .\t1\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"GLUE sst2 file .*dev.tsv is not UTF-8 text: .* byte offset 18 "):
        glue.load("sst2", tmp_path)
