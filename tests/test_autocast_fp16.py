"""`train.autocast: fp16`: float16 autocast with torch's dynamic loss scaler. Overflowing steps are skipped and the
scale backs off, the run learns, the scaler's state is checkpointed so a resumed run takes the same steps, and the
combinations the scaler cannot serve are refused at validate."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from memft.errors import RecipeError
from memft.recipe import load
from memft.train import checkpoint
from memft.train.loop import Trainer

REPO = Path(__file__).resolve().parents[1]
QUICK = ["train.autocast=fp16", "data.max_samples=80", "data.max_length=128", "train.batch_size=4",
         "log.progress=false", "output.plot=false", "train.eval_every=null", "train.max_steps=8", "output.save_every=4",
         "output.keep_last=5", "train.warmup_steps=0"]


def lines(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def test_fp16_learns_skips_overflowing_steps_and_resumes_to_the_same_steps(tmp_path):
    straight = Trainer(load(REPO / "recipes" / "quickstart.yaml", QUICK), run_dir=tmp_path / "a").setup()
    assert isinstance(straight.scaler, torch.amp.GradScaler)
    straight.train()
    a = lines(tmp_path / "a")
    scales = [m["loss_scale"] for m in a]
    assert scales[0] == 65536.0 and scales[-1] < scales[0]  # the first steps overflowed: the scale backed off
    skipped = [m for m in a if m["grad_norm"] is None]  # an overflowing step: no update, its norm not a number
    assert skipped and all(m["loss_scale"] > a[-1]["loss_scale"] for m in skipped)
    assert a[-1]["loss"] < a[0]["loss"] - 1.0
    saved = json.loads((checkpoint.latest(tmp_path / "a") / checkpoint.STATE_FILE).read_text())
    assert saved["state"]["loss_scaler"]["scale"] == straight.scaler.get_scale()

    first = Trainer(load(REPO / "recipes" / "quickstart.yaml", QUICK), run_dir=tmp_path / "b").setup()
    first.total_steps = 6  # checkpoints at 4 and 6; as if killed before 6's
    first.train()
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-000006")
    (tmp_path / "b" / "summary.json").unlink()
    Trainer(load(REPO / "recipes" / "quickstart.yaml", QUICK), run_dir=tmp_path / "b").setup().train()
    b = lines(tmp_path / "b")
    assert [(m["loss"], m["loss_scale"], m["grad_norm"]) for m in b] == [
        (m["loss"], m["loss_scale"], m["grad_norm"]) for m in a]
    wa, wb = (load_file(d / "checkpoints" / "step-000008" / "trainable.safetensors") for d in (tmp_path / "a",
                                                                                            tmp_path / "b"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("extra,words", [
    (["train.optimizer_in_backward=true", "train.max_grad_norm=null"], "updates each weight during backward"),
    (["model.dtype=bfloat16"], "`model.dtype` is `bfloat16`"),
    (["train.optimizer_state=host"], "the host optimizer's are its float32 masters"),
    (["strategies=[{name: meft}]"], "MEFT's host adapter steps its own AdamW"),
])
def test_what_the_loss_scaler_cannot_serve_is_refused(extra, words):
    with pytest.raises(RecipeError, match=words):
        load(REPO / "recipes" / "quickstart.yaml", ["train.autocast=fp16", *extra])
