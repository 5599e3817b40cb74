"""The training loop: one process, one device. Read `Trainer.train()` top to bottom.

`Trainer(recipe).setup()` builds everything in dependency order (tokenizer -> data -> model ->
strategies -> optimizer -> checkpoint resume); `train()` runs forward -> backward -> step at the
accumulation boundary, calling the strategies' hooks at named points, and writes
`metrics.jsonl`, checkpoints, `summary.json` and the plot.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import random
import signal
import statistics
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

import memft
from memft import registry
from memft.data import build as build_data
from memft.data.batching import Batcher, count_targets, count_tokens, model_inputs
from memft.data.formats import pad_token_id
from memft.errors import RunFailed, UserError
from memft.models.blocks import unwrap
from memft.models.builtin import list_builtin
from memft.models.load import count_params, load_model, load_tokenizer, resolve_device, skeleton_model
from memft.models.moe import ROUTER_AUX_ATTR, RouterAux, router_aux_coef
from memft.outputs import check_writable_dir
from memft.recipe import Recipe
from memft.registry import BuildContext, LossOutput, at_least_float32
from memft.train import checkpoint, distributed
from memft.train import lock as run_lock
from memft.train.chunked_loss import head_loss, linear_cross_entropy, linear_head
from memft.train.meters import SavedTensorMeter, StepTimer, peak_memory
from memft.train.optim import StepInBackward, build_optimizer, build_scheduler, clip_gradients
from memft.train.trackers import Trackers

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
SUMMARY_FILE = "summary.json"
RECIPE_FILE = "recipe.yaml"
PLOT_FILE = "loss_memory.png"
LABELS_FILE = "labels.json"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def default_loss(model: torch.nn.Module, batch: dict, task: str) -> LossOutput:
    """Summed cross-entropy over the batch's targets (next tokens, or one label per example), plus the MoE
    load-balancing loss when the run trains with it (`train.router_aux_loss`)."""
    return with_router_aux(model, batch, [], lambda: _cross_entropy(model, batch, task))


def _cross_entropy(model: torch.nn.Module, batch: dict, task: str) -> LossOutput:
    inputs = model_inputs(batch)  # a packed batch: position_ids, no attention_mask (a block-diagonal mask)
    labels = batch["labels"]
    if task == "causal_lm":
        # position t predicts token t+1; -100 marks padding, prompt tokens and (packed rows) each example's first
        # token, so no example's last token predicts the next example's first. Shifting the labels, not the
        # logits, spares a copy of the logits and a zero-filled gradient of their full shape.
        labels = F.pad(labels[:, 1:], (0, 1), value=-100)
        if (head := linear_head(model)) is not None:  # never forms the B x S x V logits
            return LossOutput(*head_loss(model, head, inputs, lambda hidden: linear_cross_entropy(hidden, head, labels)))
    logits = model(**inputs).logits
    loss_sum = F.cross_entropy(at_least_float32(logits).reshape(-1, logits.size(-1)), labels.reshape(-1),
                               ignore_index=-100, reduction="sum")
    return LossOutput(loss_sum, int((labels != -100).sum()), logits=logits)


def step_loss(strategies: list, model: torch.nn.Module, batch: dict, task: str) -> LossOutput:
    """The first strategy's own loss (TokenTune, RevFFN, ...), else the plain one; with the load-balancing loss."""
    def loss() -> LossOutput:
        for s in strategies:
            out = s.loss(model, batch)
            if out is not None:
                return out
        return _cross_entropy(model, batch, task)

    return with_router_aux(model, batch, strategies, loss)


def with_router_aux(model: torch.nn.Module, batch: dict, strategies: list, loss_fn) -> LossOutput:
    """`loss_fn()`, plus `coef * aux * count` when the model trains with the MoE load-balancing loss: its routers'
    logits are recorded during the forward (`memft.models.moe.RouterAux`). Evaluation (no grad) adds nothing."""
    router_aux = getattr(model, ROUTER_AUX_ATTR, None)
    if router_aux is None or router_aux.recording or not torch.is_grad_enabled():
        return loss_fn()
    mask = batch.get("attention_mask")
    router_aux.start(mask if mask is not None else torch.ones_like(batch["input_ids"]))
    try:
        out = loss_fn()
        aux = router_aux.finish(lambda calls: _layer_router_logits(strategies, calls, batch))
    finally:
        router_aux.recording = False
    if aux is not None:
        out.loss_sum = out.loss_sum + router_aux.coef * aux * out.count  # the loop divides by the targets
        out.aux_loss = aux
    return out


def _layer_router_logits(strategies: list, calls: list[torch.Tensor], batch: dict) -> torch.Tensor:
    for s in strategies:
        merged = s.router_logits(calls, batch)
        if merged is not None:
            return merged
    if len(calls) != 1:
        raise RuntimeError(f"a MoE router ran {len(calls)} times in one forward and no strategy combines the calls")
    return calls[0]


def restore_strategies(strategies: list, state: dict, ckpt: Path) -> None:
    """Each strategy's own state (step counters, MEFT's host adapter, ...) from checkpoint `ckpt`."""
    tensors = checkpoint.load_tensors(ckpt)
    for s in strategies:
        s.load_state_dict(state.get("strategies", {}).get(s.name, {}))
        prefix = f"{s.name}."
        s.load_tensor_state({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})


def apply_strategies(model: torch.nn.Module, strategies: list, ctx: BuildContext) -> torch.nn.Module:
    """The strategies in their composition order (see memft.registry), then gradient checkpointing if asked."""
    for s in strategies:
        model = s.apply(model, ctx)
    if ctx.recipe.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
        ctx.notes.append("gradient checkpointing: every decoder layer is recomputed in backward")
    config = unwrap(model).config
    coef = router_aux_coef(ctx.recipe, config)
    if coef and not any(s.computes_router_aux for s in strategies):
        setattr(model, ROUTER_AUX_ATTR, RouterAux(model, coef))
        ctx.notes.append(f"MoE load-balancing loss x{coef:g} in the training loss (logged as `aux_loss`)")
    if ctx.is_moe:
        config.output_router_logits = False  # memft adds the loss itself; transformers would compute another copy
    return model


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer in backward. Reentrant checkpointing saves each layer's input through
    autograd (so the saved-tensor meter sees it) and works with frozen embeddings once inputs require grad."""
    kwargs = {"use_reentrant": True}
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(target, "activation_checkpointing_enable"):
        target.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        target.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    target.enable_input_require_grads()


class RunInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped a run; `str()` says where and what was saved, in one sentence.

    A KeyboardInterrupt, so no `except Exception` on its way up swallows it. The CLI prints it and exits
    with `exit_code`, 128 + the signal number as a shell reports it (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, signal_name: str, step: int, total: int, checkpoint: Path | None, *,
                 why_nothing: str | None = None, aborted: bool = False, during_setup: bool = False):
        super().__init__(signal_name)
        self.signal_name, self.step, self.total, self.checkpoint = signal_name, step, total, checkpoint
        self.why_nothing, self.aborted, self.during_setup = why_nothing, aborted, during_setup
        self.exit_code = 128 + signal.Signals[signal_name].value
        self.resume_command = "`memft train` with the same recipe and output dir"
        """How to resume, for the sentence; the CLI puts in the command line it was given."""

    @classmethod
    def in_setup(cls, signal_name: str = "SIGINT") -> RunInterrupted:
        return cls(signal_name, 0, 0, None, during_setup=True)

    def __str__(self) -> str:
        if self.during_setup:
            return f"interrupted ({self.signal_name}) while setting up the run, before training started; nothing was saved"
        resume = f"{self.resume_command} again resumes it"
        if self.aborted:
            kept = (f"the newest complete checkpoint {self.checkpoint} is kept; {resume}" if self.checkpoint
                    else "no checkpoint had been written, nothing to resume")
            where = f"during step {self.step + 1}" if self.step < self.total else f"after step {self.step}"
            return f"interrupted again ({self.signal_name}) {where} of {self.total}, stopped at once; {kept}"
        saved = f"saved checkpoint {self.checkpoint}; {resume}" if self.checkpoint else f"nothing was saved ({self.why_nothing})"
        return f"interrupted ({self.signal_name}) at step {self.step} of {self.total}; {saved}"


def _releases_run_dir(train):
    """Wrap `Trainer.train` so the run directory's lock is released however it ends (done, failed, interrupted)."""
    @functools.wraps(train)
    def wrapper(self, *args, **kwargs):
        try:
            return train(self, *args, **kwargs)
        finally:
            self.release_run_dir()

    return wrapper


class Trainer:
    """Builds a run from a recipe and trains it."""

    def __init__(self, recipe: Recipe, run_dir: str | Path | None = None):
        self.recipe = recipe
        self.run_dir = Path(run_dir or recipe.output.dir)
        self.notes: list[str] = []
        self.stop_signal: str | None = None
        """Set by SIGINT / SIGTERM during `train()`: stop at the next step boundary."""
        self.activation_bytes: int | None = None
        """Bytes autograd saved for backward in this process's first training forward (None before it)."""
        self.scaler: torch.amp.GradScaler | None = None
        """The dynamic loss scaler of `train.autocast: fp16`."""
        self.trackers: Trackers | None = None
        """TensorBoard / W&B while `train()` runs (`log.tensorboard`, `log.wandb`)."""
        self.world: distributed.World | None = None
        self._saving = False
        """This process's rank when torchrun started several (`setup()`); None in a single process."""

    @property
    def ranks(self) -> int:
        return self.world.size if self.world is not None else 1

    @property
    def main(self) -> bool:
        """Whether this process writes the run's files and logs (the only one, or rank 0)."""
        return self.world is None or self.world.main

    # ------------------------------------------------------------------ setup
    def setup(self, *, for_training: bool = True) -> Trainer:
        """Everything a run needs, in dependency order; `for_training=False` (`--dry-run`) stops before the
        optimizer and the run directory. To score a finished run, `setup_for_scoring()` needs no data."""
        r = self.recipe
        check_output_dir(self.run_dir)  # before the model loads, so a bad `output.dir` costs no waiting
        absolute_local_paths(r)  # the run's recipe.yaml then works from any working directory
        self.device = resolve_device(r.model.device)
        self.world = distributed.join(r, self.device)  # None in one process; else this rank of a torchrun job
        if self.world is not None:
            self.device = self.world.device
        self.strategies = registry.compose(r)

        # the tokenizer comes first: data needs it, and classification data tells the head its size
        self.tokenizer = load_tokenizer(r.model)
        self.data = build_data(r.data, self.tokenizer, seed=r.train.seed)
        self.label_names = self.data.label_names
        self.pad_id = pad_token_id(self.tokenizer)
        if r.model.task == "sequence_classification" and r.model.num_labels is None:
            r.model.num_labels = self.data.num_labels  # recorded in the run's recipe.yaml for export
        elif r.model.num_labels is not None and (self.data.num_labels or 0) > r.model.num_labels:
            raise UserError(f"`model.num_labels` is {r.model.num_labels} but the data has {self.data.num_labels} "
                            f"classes ({', '.join(map(str, self.data.label_names or []))}); raise it or leave it null")

        # several ranks read the same global micro-batches of batch_size x ranks rows, each its own rows of them
        rows = r.train.batch_size * self.ranks
        self.batcher = Batcher(self.data.train, rows, self.pad_id, shuffle=r.data.shuffle, seed=r.train.seed)
        self.eval_batcher = (Batcher(self.data.eval, rows, self.pad_id, shuffle=False, seed=0)
                             if self.data.eval else None)
        micro_total = math.ceil(r.train.epochs * self.batcher.batches_per_epoch)
        self.total_steps = r.train.max_steps or max(1, micro_total // r.train.grad_accum)
        self._build_model()
        if not for_training:
            return self

        groups = None
        for s in self.strategies:
            groups = s.param_groups(self.model) or groups
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if not trainable:
            raise UserError("no parameter requires a gradient after applying the strategies; nothing would train")
        self.optimizer = build_optimizer(groups or [{"params": trainable}], r.train, self.device)
        self.scheduler = build_scheduler(self.optimizer, r.train, self.total_steps)
        # fp16 autocast: a dynamic loss scaler keeps small gradients from flushing to zero (a skipped step on overflow)
        self.scaler = torch.amp.GradScaler(self.device.type) if r.train.autocast == "fp16" else None
        self.step, self.micro = 0, 0
        self._prepare_run_dir()
        return self

    def setup_for_scoring(self) -> Trainer:
        """The model as the run in `run_dir` trained it (strategies applied; load its checkpoint next), without
        reading its training data: `model.num_labels` is in the run's recipe.yaml, the label names in labels.json."""
        r = self.recipe
        self.device = resolve_device(r.model.device)
        self.strategies = registry.compose(r)
        self.tokenizer = load_tokenizer(r.model)
        if r.data.format == "chat":  # the template the run rendered its conversations with, as training set it
            from memft.data.chat import set_chat_template

            set_chat_template(self.tokenizer, r.data)
        self.pad_id = pad_token_id(self.tokenizer)
        self.label_names = self._saved_label_names()
        self.total_steps = r.train.max_steps
        self._build_model()
        return self

    def _build_model(self) -> None:
        """Load the model and apply the strategies (the tokenizer, `pad_id` and `total_steps` are set)."""
        r = self.recipe
        if r.model.attn_implementation in ("flash_attention_2", "flex_attention") and self.device.type != "cuda":
            raise UserError(f"`model.attn_implementation: {r.model.attn_implementation}` runs on CUDA only (this run "
                            f"is on {self.device.type}); use `sdpa` or `eager` here")
        load_kwargs = registry.load_kwargs(self.strategies, r)
        from_rank0 = self.world is not None and self.world.loads_from_rank0(
            r, load_kwargs.get("quantization_config") is not None, self.notes)
        # in a job loading from rank 0, the other ranks build the same modules on the meta device: no host memory
        skeleton = from_rank0 and not self.world.main
        build = skeleton_model if skeleton else load_model
        loaded = build(r.model, num_labels=r.model.num_labels, pad_token_id=self.pad_id,
                       **({} if skeleton else load_kwargs))
        self.model_source, self.is_moe = loaded.source, loaded.is_moe
        model = loaded.model
        ctx = BuildContext(recipe=r, device=torch.device("meta") if skeleton else self.device, is_moe=loaded.is_moe,
                           total_steps=self.total_steps, notes=self.notes)
        model = apply_strategies(model, self.strategies, ctx)  # adapters follow their base weights (to meta)
        if self.world is not None:  # before the optimizer, which must step the sharded parameters
            # FSDP moves each unit to the device as it shards it: one layer is whole on the GPU at a time, never
            # the model; with `from_rank0`, rank 0 then sends each rank its shards
            self.model = self.world.shard(model, r, from_rank0=from_rank0)
        else:
            self.model = model.to(self.device) if not load_kwargs.get("quantization_config") else model
        self.params = count_params(self.model)
        seed_everything(r.train.seed)  # after model building, which seeds with `model.seed`
        self.autocast = autocast_context(r, self.device)

    def _save_labels(self) -> None:
        """A classification run's classes, for scoring it later without its data (see `setup_for_scoring`)."""
        if self.recipe.model.task == "sequence_classification":
            labels = {"num_labels": self.recipe.model.num_labels, "label_names": self.label_names}
            (self.run_dir / LABELS_FILE).write_text(json.dumps(labels, indent=1))

    def _saved_label_names(self) -> list[str] | None:
        """What `_save_labels` wrote; a run from before labels.json existed reads its data, if it is still there."""
        r = self.recipe
        if r.model.task != "sequence_classification":
            return None
        saved = self.run_dir / LABELS_FILE
        if saved.is_file():
            return json.loads(saved.read_text())["label_names"]
        try:
            data = build_data(r.data, self.tokenizer, seed=r.train.seed)
        except UserError:
            return None  # the data is gone too: the class ids stand for the labels
        r.model.num_labels = r.model.num_labels or data.num_labels
        return data.label_names

    def _prepare_run_dir(self) -> None:
        """Lock the run directory (until `train()` ends), then resume from its newest usable checkpoint or
        start the run over."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # the lock comes first: a second run must not delete or read for writing anything of this one's (rank 0
        # holds it for the whole job)
        self._run_lock = run_lock.acquire(self.run_dir, self.notes) if self.main else None
        if self.world is not None:
            self.world.barrier()  # the others read the run directory only once rank 0 holds it
        try:
            self._resume_or_start()
        except BaseException:
            self.release_run_dir()
            raise

    def release_run_dir(self) -> None:
        """Remove this run's lock on its directory (idempotent); `train()` does it however it ends."""
        held = getattr(self, "_run_lock", None)
        if held is not None:
            held.release()

    def _resume_or_start(self) -> None:
        r = self.recipe
        saved_recipe = self.run_dir / RECIPE_FILE
        found = self._resume_candidates(self.notes)
        if found:
            self._resume(found)
        if self.world is not None:
            self.world.barrier()  # every rank has read the old recipe and checkpoint before rank 0 writes
        if not self.main:
            return
        if not found and (self.run_dir / METRICS_FILE).exists():
            (self.run_dir / METRICS_FILE).unlink()  # a run that never reached a checkpoint starts over
        saved_recipe.write_text(yaml.safe_dump(r.model_dump(mode="json"), sort_keys=False))
        self._save_labels()

    def _saved_recipe(self) -> dict | None:
        return saved_recipe_tree(self.run_dir) if (self.run_dir / RECIPE_FILE).exists() else None

    def _resume_candidates(self, notes: list[str]) -> list[Path]:
        """The usable checkpoints a start would resume from, newest first (empty: start fresh). Reads only.

        Raises:
            UserError: resuming is refused (`output.resume: never`, a recipe that would train something
                else, checkpoints that are all damaged).
        """
        r = self.recipe
        found = checkpoint.usable(self.run_dir, notes)
        if not found:
            return []
        if r.output.resume == "never":
            raise UserError(f"{self.run_dir} already holds checkpoint {found[0].name}; set `output.resume=auto` "
                            "to continue it, choose another `output.dir`, or delete its checkpoints to start over "
                            "in it")
        old = self._saved_recipe()
        if old is not None:
            refused, allowed = _recipe_differences(old, r.model_dump(mode="json"))
            if refused:
                raise UserError(_refused_resume_message(self.run_dir, found[0], refused))
            notes += [f"resume: recipe changed since the checkpoint: {line}; the new value is used" for line in allowed]
        return found

    def _resume(self, found: list[Path]) -> None:
        """Restore the newest of `found` that loads; a damaged one is skipped with a note (and kept on disk)."""
        r, old, rejected = self.recipe, self._saved_recipe(), []
        for ckpt in found:
            try:
                state = checkpoint.load(ckpt, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)
                if not {"step", "micro_batches"} <= state.keys():
                    raise checkpoint.CheckpointDamaged(ckpt, f"the `state` in its {checkpoint.STATE_FILE} lacks "
                                                             "`step` or `micro_batches`")
                restore_strategies(self.strategies, state, ckpt)
                break
            except checkpoint.CheckpointDamaged as exc:
                rejected.append((ckpt, exc.reason))
                self.notes.append(f"skipped checkpoint {ckpt.name}: {exc.reason}")
        else:
            damaged = sorted(rejected + checkpoint.survey(self.run_dir)[1], key=lambda d: d[0].name, reverse=True)
            raise checkpoint.unusable_error(self.run_dir / checkpoint.CHECKPOINTS_DIR, damaged)
        self._apply_train_settings(old["train"]["lr"] if old else r.train.lr)
        self.step = state["step"]
        self.micro = self._micro_batches_now(state["micro_batches"], state.get("rows_per_micro_batch"), ckpt)
        if self.scaler is not None and "loss_scaler" in state:  # the scale and its growth count, for the same steps
            self.scaler.load_state_dict(state["loss_scaler"])
        torn = _truncate_metrics(self.run_dir / METRICS_FILE, self.step) if self.main else 0
        if self.main:
            _truncate_metrics(self.run_dir / SAMPLES_FILE, self.step)
        if torn:
            self.notes.append(f"resume: dropped {torn} unreadable line(s) from {METRICS_FILE} (a crash mid-write "
                              "tears the last one)")
        self.notes.append(f"resumed from {ckpt} at step {self.step}" + (
            "; the run already finished, nothing to do" if self.step >= self.total_steps else ""))

    def _micro_batches_now(self, micro: int, rows: int | None, ckpt: Path) -> int:
        """The micro-batches read so far, in this run's batches: a checkpoint written with another number of ranks
        (or batch size) counted batches of another size. Resuming 2 ranks of 2 rows in 1 process with 2 micro-batches
        of 2 rows continues at the same example; a position between two of the new batches is refused."""
        now = self.batcher.batch_size
        if rows is None or rows == now:
            return micro
        before = -(-len(self.batcher.examples) // rows)  # that run's batches per epoch (the last one may be short)
        epoch, index = divmod(micro, before)
        if index * rows % now:
            raise UserError(f"checkpoint {ckpt.name} stopped after {index * rows} examples of epoch {epoch}, read "
                            f"{rows} at a time; batches of {now} (`train.batch_size` x ranks) cannot continue there: "
                            f"choose a batch size x ranks that divides {index * rows}")
        return epoch * self.batcher.batches_per_epoch + index * rows // now

    def plan_resume(self) -> UserError | None:
        """For `--dry-run`: add a `resume:` line to the plan saying whether a real start would start fresh,
        resume (from which checkpoint and step) or be refused; return that refusal. Reads only: nothing in the
        run directory changes and no lock is taken."""
        busy = run_lock.holder(self.run_dir)
        if busy:
            self.notes.append(f"resume: {busy} is training in it now; a real start would be refused until it ends")
        try:
            found = self._resume_candidates(self.notes)
        except UserError as exc:
            self.notes.append("resume: a real start would be refused (the error below says why)")
            return UserError(f"a real start in {self.run_dir} would be refused: {exc}")
        if not found:
            stale = (self.run_dir / METRICS_FILE).exists()
            self.notes.append(f"resume: would start fresh in {self.run_dir}"
                              + (f" (deleting its {METRICS_FILE}: no checkpoint backs it)" if stale else ""))
            return None
        step = checkpoint.check(found[0])["state"].get("step")
        finished = step is not None and step >= self.total_steps
        self.notes.append(f"resume: would resume from checkpoint {found[0].name} at step {step} of {self.total_steps}"
                          + ("; the run already finished, nothing to do" if finished else ""))
        return None

    def _apply_train_settings(self, checkpoint_lr: float) -> None:
        """After restoring optimizer and scheduler state, make the recipe's lr, betas and weight decay win."""
        t = self.recipe.train
        scale = t.lr / checkpoint_lr  # strategies' own groups keep their lr ratio to `train.lr`
        self.scheduler.base_lrs = [base * scale for base in self.scheduler.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_lr()):
            group.update(lr=lr, initial_lr=group.get("initial_lr", lr) * scale, betas=t.betas,
                         weight_decay=t.weight_decay)
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    # ------------------------------------------------------------------ the loop
    @_releases_run_dir
    def train(self, progress=None) -> dict:
        r = self.recipe
        if self.step >= self.total_steps and (self.run_dir / SUMMARY_FILE).exists():
            return json.loads((self.run_dir / SUMMARY_FILE).read_text())  # already finished: nothing to do
        # SIGINT / SIGTERM ask to stop at the next step boundary, which saves the last step (see _stop_on_signals)
        metrics_file = (self.run_dir / METRICS_FILE).open("a") if self.main else nullcontext()  # rank 0 logs
        with self._stop_on_signals(), metrics_file as metrics, self._trackers():
            timer, evaluation = StepTimer(self.device), {}
            losses, step_times, step_tokens, step_samples = [], [], [], []
            started = time.perf_counter()
            if self.step == 0 and (self.eval_batcher or r.log.samples):
                self._evaluate_and_log(metrics)
            with self._when_a_rank_is_lost():
                while self.step < self.total_steps:
                    if self._stop_asked():
                        self._stop_at_step_boundary()
                    timer.start()
                    window = [self._next_batch() for _ in range(r.train.grad_accum)]
                    window = [self._on_step_start(b) for b in window]
                    record = self._optimizer_step(window)

                    tokens = sum(count_tokens(b) for b in window)
                    samples = sum(b["input_ids"].size(0) for b in window)
                    rates = timer.stop(tokens=tokens, samples=samples)
                    step_times.append(rates["step_time_s"])
                    step_tokens.append(tokens)
                    step_samples.append(samples)
                    losses.append(record["loss"])
                    if self.step % r.log.every == 0 or self.step == self.total_steps:
                        self._log(metrics, {"step": self.step, **record, **rates, **peak_memory(self.device),
                                            **self._strategy_metrics()})
                    last = self.step == self.total_steps
                    if (self.eval_batcher or r.log.samples) and (last or (r.train.eval_every
                                                                          and self.step % r.train.eval_every == 0)):
                        evaluation = self._evaluate_and_log(metrics)
                    if r.output.checkpoints and (last or (r.output.save_every
                                                          and self.step % r.output.save_every == 0)):
                        self.save()
                    if progress and self.main:
                        progress(self.step, self.total_steps, record["loss"],
                                 peak_memory(self.device)["peak_mem_bytes"])
            if self._stop_asked():  # asked during the last step: it is saved, stop before the summary
                self._stop_at_step_boundary()
        if not losses and self.eval_batcher:  # resumed at the last step: nothing trained, still report
            evaluation = self.evaluate()
        summary = self._summary(losses, step_times, step_tokens, step_samples, self.activation_bytes, evaluation,
                                time.perf_counter() - started)
        if not self.main:
            return summary
        if r.eval:
            from memft.eval.run import evaluate_run

            summary["eval"] = evaluate_run(self)
        (self.run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        if r.output.plot:
            from memft.train.plot import plot_metrics

            plot_metrics(self.run_dir / METRICS_FILE, self.run_dir / PLOT_FILE, title=self.run_dir.name)
        return summary

    def _optimizer_step(self, window: list[dict]) -> dict:
        """Forward and backward over the accumulation window, then one optimizer step; returns what is logged
        of it (`loss`, `lr`, `grad_norm`, `aux_loss` for MoE runs with the load-balancing loss)."""
        r = self.recipe
        self.model.train()
        targets = sum(self._count_targets(b) for b in window)  # of the global micro-batches, on every rank
        step_loss, step_aux = 0.0, None
        for batch in window:
            weight = 1.0
            if self.world is not None:  # this rank's rows; FSDP averages the gradients over the ranks
                batch, real = self.world.rows(batch)
                weight = self.world.size if real else 0.0
            # the activation meter watches the first forward of this process only: its bytes are per micro-batch
            meter = SavedTensorMeter(self.model) if self.activation_bytes is None else nullcontext()
            with meter, self.autocast:
                out = self._loss(batch)
            # normalise by the targets of the whole accumulation window, not per micro-batch
            loss = out.loss_sum / max(targets, 1)
            scaled = loss * weight if weight != 1.0 else loss
            (scaled if self.scaler is None else self.scaler.scale(scaled)).backward()
            if self.activation_bytes is None:
                self.activation_bytes = meter.bytes
            step_loss += loss.item() * (weight > 0)  # a host-device sync point
            if out.aux_loss is not None:  # the load-balancing term, unweighted, averaged over the micro-batches
                step_aux = (step_aux or 0.0) + out.aux_loss.item() / len(window) * (weight > 0)
            del out, loss, scaled  # free the graph's outputs before the next micro-batch
        if self.world is not None:  # the job's loss: the ranks' parts summed; the aux loss: their mean
            step_loss, aux = self.world.sum(step_loss, step_aux or 0.0)
            step_aux = aux / self.world.size if step_aux is not None else None
        if not math.isfinite(step_loss):
            raise RunFailed(self._nonfinite_message(step_loss))
        for s in self.strategies:
            s.after_backward(self.step)
        if isinstance(self.optimizer, StepInBackward):  # already stepped, gradient by gradient
            grad_norm = self.optimizer.grad_norm()
        else:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)  # the norm, the clipping and the update see true gradients
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            grad_norm = clip_gradients(grads + [g for s in self.strategies for g in s.outside_grads()],
                                       r.train.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        scaled = {}
        if self.scaler is None:
            self.optimizer.step()
        else:  # skips the update when a gradient overflowed, and adapts the scale
            scaled = {"loss_scale": self.scaler.get_scale()}
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.scheduler.step()
        for s in self.strategies:
            s.after_optimizer_step(self.step)
        # flush the gradients as soon as we can, no need for this memory anymore
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)  # FSDP: a DTensor
        return {"loss": step_loss, "lr": lr, "grad_norm": norm if math.isfinite(norm) else None, **scaled,
                **({"aux_loss": step_aux} if step_aux is not None else {})}

    @contextmanager
    def _when_a_rank_is_lost(self):
        """In a torchrun job, a collective that fails because another rank died or hangs (past
        `distributed.timeout_s`) stops this rank with one sentence instead of a traceback."""
        try:
            yield
        except RuntimeError as exc:
            if self.world is None or not distributed.lost_rank(exc):
                raise
            last = checkpoint.latest(self.run_dir) if self.recipe.output.checkpoints else None
            resume = (f"rerun the same command to resume from {last}" if last is not None
                      else "no checkpoint was written yet: rerun the same command to start over")
            where = f"saving step {self.step}" if self._saving else f"step {self.step + 1}"
            raise RunFailed(f"rank {self.world.rank} lost the other ranks in {where}: one of them "
                            f"stopped, was killed or did not answer within `distributed.timeout_s` "
                            f"({self.recipe.distributed.timeout_s} s); {resume}") from None

    @contextmanager
    def _stop_on_signals(self):
        """While training, SIGINT and SIGTERM set `stop_signal`, and the loop stops at the next step boundary;
        a second one (a Ctrl-C while waiting for a long step) aborts the step at once. The previous handlers are
        put back afterwards. Python sets handlers in the main thread only: elsewhere signals are left alone."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self.stop_signal = None
        previous = {s: signal.signal(s, self._on_stop_signal) for s in STOP_SIGNALS}
        try:
            yield
        except RunInterrupted:
            raise
        except KeyboardInterrupt:
            raise RunInterrupted(self.stop_signal or "SIGINT", self.step, self.total_steps,
                                 checkpoint.latest(self.run_dir), aborted=True) from None
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)

    def _on_stop_signal(self, signum: int, frame) -> None:
        if self.stop_signal is not None:
            self.stop_signal = signal.Signals(signum).name
            raise KeyboardInterrupt  # asked twice: do not wait for the step to finish
        self.stop_signal = signal.Signals(signum).name

    def _stop_asked(self) -> bool:
        """Whether to stop at this step boundary: a signal reached this process, or, in a torchrun job, any rank
        (all of them stop at the same step, or the save that follows would wait on a rank still training)."""
        asked = self.stop_signal is not None
        if self.world is not None:
            asked = self.world.max(float(asked))[0] > 0
            self.stop_signal = self.stop_signal or ("SIGTERM" if asked else None)
        return asked

    def _stop_at_step_boundary(self):
        """Save the last completed step (unless it is saved already) and raise `RunInterrupted`."""
        r, saved, why_nothing = self.recipe, None, None
        if not r.output.checkpoints:
            why_nothing = "checkpoints are off"
        elif self.step == 0:
            why_nothing = "no step had finished"
        else:
            latest = checkpoint.latest(self.run_dir)
            saved = latest if latest is not None and latest.name == checkpoint.step_dir_name(self.step) else self.save()
        raise RunInterrupted(self.stop_signal, self.step, self.total_steps, saved, why_nothing=why_nothing)

    # ------------------------------------------------------------------ pieces of a step
    def _next_batch(self) -> dict:
        epoch, index = divmod(self.micro, self.batcher.batches_per_epoch)
        self.micro += 1
        return {k: v.to(self.device) for k, v in self.batcher.batch(epoch, index).items()}

    def _on_step_start(self, batch: dict) -> dict:
        for s in self.strategies:
            batch = s.on_step_start(self.step, batch)
        return batch

    def _count_targets(self, batch: dict) -> int:
        for s in self.strategies:
            n = s.count_targets(batch)
            if n is not None:
                return n
        return count_targets(batch)

    def _strategy_metrics(self) -> dict:
        return {k: v for s in self.strategies for k, v in s.metrics().items()}

    def _loss(self, batch: dict) -> LossOutput:
        return step_loss(self.strategies, self.model, batch, self.recipe.model.task)

    def _evaluate_and_log(self, metrics) -> dict[str, float]:
        """The held-out evaluation (when there is eval data) and the sample replies (`log.samples`)."""
        evaluation = self.evaluate() if self.eval_batcher else {}
        if evaluation:
            self._log(metrics, {"step": self.step, **evaluation})
        if self.recipe.log.samples is not None and self.recipe.model.task == "causal_lm":
            self._write_samples()
        return evaluation

    def _write_samples(self) -> None:
        """`log.samples`: the model's replies to the recipe's prompts as it is now, in samples.jsonl and the
        trackers. Sampling draws from a forked generator, so training's random numbers are unchanged."""
        from memft.generate import Generator, Sampling

        cfg = self.recipe.log.samples
        sampling = Sampling(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=self.recipe.train.seed)
        gen = Generator.of(self.model, self.tokenizer, self.recipe.data, [s.name for s in self.strategies])
        self.model.eval()
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), self.autocast:
            rows = [{"step": self.step, "prompt": p, "reply": gen.complete(p, sampling).text} for p in cfg.prompts]
        self.model.train()
        if not self.main:  # every rank generates (FSDP gathers the weights for each forward); rank 0 writes
            return
        with (self.run_dir / SAMPLES_FILE).open("a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        if self.trackers is not None:
            self.trackers.log_samples(self.step, rows)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """`eval_loss`: mean cross-entropy per target over the held-out batches (always the plain model's loss);
        for classification also `eval_accuracy`, the share of examples whose arg-max class is the label."""
        self.model.eval()
        total, count, correct = 0.0, 0, 0
        classify = self.recipe.model.task == "sequence_classification"
        n = self.eval_batcher.batches_per_epoch
        for i in range(min(n, self.recipe.train.eval_batches or n)):
            batch, real = {k: v.to(self.device) for k, v in self.eval_batcher.batch(0, i).items()}, True
            if self.world is not None:  # each rank its rows; every rank runs every forward
                batch, real = self.world.rows(batch)
            with self.autocast:
                out = default_loss(self.model, batch, self.recipe.model.task)
            if real:
                total, count = total + out.loss_sum.item(), count + out.count
                if classify:
                    correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
        if self.world is not None:
            total, count, correct = self.world.sum(total, count, correct)
        self.model.train()
        result = {"eval_loss": total / max(count, 1)}
        if classify:
            result["eval_accuracy"] = correct / max(count, 1)
        return result

    def save(self) -> Path:
        state = {"step": self.step, "micro_batches": self.micro, "rows_per_micro_batch": self.batcher.batch_size,
                 "strategies": {s.name: s.state_dict() for s in self.strategies},
                 **({"loss_scaler": self.scaler.state_dict()} if self.scaler is not None else {})}
        tensors = {f"{s.name}.{k}": v for s in self.strategies for k, v in s.tensor_state().items()}
        if self.world is not None:  # every rank writes its shards (memft.train.dist_checkpoint)
            from memft.train import dist_checkpoint as writer
        else:
            writer = checkpoint
        # a rank lost now is lost while saving this step, not in the next one; a save that raises ends the run,
        # so the flag stays up for `_when_a_rank_is_lost` to read
        self._saving = True
        try:
            saved = writer.save(self.run_dir, self.step, model=self.model, optimizer=self.optimizer,
                                scheduler=self.scheduler, state=state, keep_last=self.recipe.output.keep_last,
                                tensors=tensors)
        except checkpoint.NonFiniteState as exc:
            raise RunFailed(self._nonfinite_state_message(exc)) from None
        self._saving = False
        return saved

    @contextmanager
    def _trackers(self):
        """TensorBoard / W&B for the run's records while it trains (`log.tensorboard`, `log.wandb`)."""
        if not self.main:
            yield
            return
        self.trackers = Trackers(self.recipe, self.run_dir, self.step)
        try:
            yield
        finally:
            self.trackers.close()
            self.trackers = None

    def _log(self, file, record: dict) -> None:
        if not self.main:
            return
        file.write(json.dumps(record) + "\n")
        file.flush()
        if self.trackers is not None:
            self.trackers.log(record)

    def _nonfinite_message(self, value: float) -> str:
        return f"the loss became {value} at step {self.step + 1}; stopping. " + self._way_out(self.step)

    def _nonfinite_state_message(self, exc: checkpoint.NonFiniteState) -> str:
        return (f"step {self.step} left {exc}, so checkpoint {checkpoint.step_dir_name(self.step)} was not written "
                "and the run stops. " + self._way_out(self.step - 1))

    def _way_out(self, started_from: int) -> str:
        """What to do after a blow-up in the step that began from step `started_from`'s state, truthfully: a resume
        from that very state recomputes the same gradients on the same batch, whatever the learning rate."""
        t, last = self.recipe.train, self._newest_finite_checkpoint()
        lower = f"a lower `train.lr` (now {t.lr:g})" + ("" if t.max_grad_norm else " or `train.max_grad_norm: 1.0`")
        over = (f"start over with {lower} in another `output.dir` (or delete "
                f"{self.run_dir / checkpoint.CHECKPOINTS_DIR} to start over in this one)")
        if last is None:
            return f"No finite checkpoint had been written: {over}."
        if last.name == checkpoint.step_dir_name(started_from):
            return (f"The newest finite checkpoint, {last.name}, is the state the failed step began from, so a resume "
                    f"from it will most likely fail the same way at any learning rate: {over}.")
        return f"The last good checkpoint is {last}: rerun with {lower}, and `output.resume: auto` continues from it."

    def _newest_finite_checkpoint(self) -> Path | None:
        """The newest usable checkpoint whose values are all finite (an older memft could save NaN weights)."""
        try:
            found = checkpoint.usable(self.run_dir)
        except UserError:
            return None
        return next((path for path in found if checkpoint.is_finite(path)), None)

    def _summary(self, losses, step_times, tokens, samples, activation_bytes, evaluation, wall) -> dict:
        # the first step of a process pays for warm-up (allocator, kernels): leave it out of the rates
        skip = 1 if len(step_times) > 1 else 0
        timed, tokens, samples = step_times[skip:], tokens[skip:], samples[skip:]
        memory = peak_memory(self.device)
        ranks = {}
        if self.world is not None:  # each rank's peak and share of the job's tokens/s; the peak is the largest
            per_rank = self.world.gather({"rank": self.world.rank, **memory, "tokens_per_s":
                                          sum(tokens) / sum(timed) / self.world.size if timed else None,
                                          **distributed.state_bytes(self.model, self.optimizer)})
            memory = {k: max(r[k] for r in per_rank) for k in memory}
            ranks = {"world_size": self.world.size, "distributed": self.world.mode, "ranks": per_rank}
        return {
            "memft_version": memft.__version__,
            "strategies": [s.name for s in self.strategies],
            "gradient_checkpointing": self.recipe.train.gradient_checkpointing,
            "model": self.model_source,
            "is_moe": self.is_moe,
            "dtype": self.recipe.model.dtype,
            "device": _device_name(self.device),
            "torch_version": torch.__version__,
            "steps": self.step,
            "steps_this_run": len(losses),
            "final_loss": losses[-1] if losses else None,
            "eval_loss": evaluation.get("eval_loss"),
            "eval_accuracy": evaluation.get("eval_accuracy"),
            "tokens_per_s": sum(tokens) / sum(timed) if timed else None,
            "samples_per_s": sum(samples) / sum(timed) if timed else None,
            "step_time_s": statistics.median(timed) if timed else None,
            **memory,
            **ranks,
            "activation_bytes": activation_bytes,
            "trainable_params": self.params["trainable_params"],
            "total_params": self.params["total_params"],
            "wall_time_s": wall,
            **self._strategy_metrics(),
        }


# ---------------------------------------------------------------------- helpers


def saved_recipe_tree(run_dir: Path) -> dict:
    """The recipe a run saved in its directory, as a dict; a missing or damaged file is a UserError."""
    path = Path(run_dir) / RECIPE_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} is not a memft run directory (no {RECIPE_FILE}); pass the `output.dir` of a run")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is damaged ({type(exc).__name__}); restore it from the recipe the run was "
                        "started with") from None
    if not isinstance(tree, dict):
        raise UserError(f"{path} is damaged (not a mapping); restore it from the recipe the run was started with")
    return tree


def saved_recipe(run_dir: Path) -> Recipe:
    """The validated recipe of a run directory (`memft eval --model RUN`, `memft export RUN`)."""
    from pydantic import ValidationError

    from memft.recipe import describe_errors

    try:
        return Recipe.model_validate(saved_recipe_tree(run_dir))
    except ValidationError as exc:
        raise UserError(f"{Path(run_dir) / RECIPE_FILE} is not a recipe this memft reads: "
                        + "; ".join(describe_errors(exc, {}))) from None


def absolute_local_paths(recipe: Recipe) -> None:
    """Make the recipe's local paths absolute (data, eval data, a local model or tokenizer), so the run
    directory's recipe.yaml means the same files from any working directory. Built-in model names, hub ids,
    `hub` and split names are left alone, and so is anything that does not exist here."""

    def absolute(value: str | None) -> str | None:
        if value is None or not Path(value).expanduser().exists():
            return value
        return os.path.abspath(os.path.expanduser(value))

    builtins = {name for name, _ in list_builtin()}
    m, d = recipe.model, recipe.data
    if m.name.removesuffix(".json") not in builtins:
        m.name = absolute(m.name)
    if m.tokenizer is not None and m.tokenizer.removesuffix(".json") not in builtins:
        m.tokenizer = absolute(m.tokenizer)
    d.source = absolute(d.source)
    if isinstance(d.eval_split, str) and Path(d.eval_split).expanduser().is_file():  # not `dev`, beside the data
        d.eval_split = absolute(d.eval_split)
    if recipe.eval is not None:
        for section in [recipe.eval.mmlu, *recipe.eval.glue]:
            if section is not None and section.data != "hub":
                section.data = absolute(section.data)


def check_output_dir(run_dir: Path) -> None:
    """A `UserError` unless `run_dir` is a folder memft can write, or one it can create (see `memft.outputs`)."""
    check_writable_dir(run_dir, "`output.dir`")


def autocast_context(recipe: Recipe, device: torch.device):
    wanted = recipe.train.autocast
    if wanted == "fp16":  # with `Trainer.scaler`, the dynamic loss scaler
        return torch.autocast(device.type, dtype=torch.float16)
    if device.type == "cuda" and (wanted == "bf16" or (wanted == "auto" and torch.cuda.is_bf16_supported())):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if wanted == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    n = torch.get_num_threads()
    return f"cpu ({platform.processor() or platform.machine()}, {n} thread{'s' if n != 1 else ''})"


def _flatten(tree, prefix="") -> dict:
    if isinstance(tree, (dict, list)):
        out = {}
        for k, v in (tree.items() if isinstance(tree, dict) else enumerate(tree)):
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


# Recipe fields a resume may change: how fast and how long to train, what to log, evaluate and keep. Any other
# change alters what the trainable parameters mean (model, strategies, their params) or which data they are
# trained on (the data block, the seed, the batch size), so a resume with it is refused.
_MAY_CHANGE_ON_RESUME = (
    "description", "model.device", "model.attn_implementation", "model.trust_remote_code",
    "train.lr", "train.betas", "train.weight_decay", "train.schedule", "train.warmup_steps", "train.max_steps",
    "train.epochs", "train.max_grad_norm", "train.grad_accum", "train.gradient_checkpointing", "train.autocast",
    "train.router_aux_loss", "train.router_aux_loss_coef", "train.eval_every", "train.eval_batches",
    "train.batch_size",  # the data position is converted to the new batches (`_micro_batches_now`) or refused
    "output", "log", "eval", "distributed",
)


def _may_change_on_resume(key: str) -> bool:
    return any(key == field or key.startswith(field + ".") for field in _MAY_CHANGE_ON_RESUME)


def _as_compared(value):
    """Local paths by their resolved absolute form, so `data/x.jsonl` and `/repo/data/x.jsonl` are equal."""
    if isinstance(value, str) and value and Path(value).expanduser().exists():
        return str(Path(value).expanduser().resolve())
    return value


def _recipe_differences(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """Every field that differs between the run's saved recipe and the new one, as "`key` old -> new":
    (those a resume refuses, those it allows)."""
    a, b = _flatten(old), _flatten(new)
    changed = [k for k in sorted(set(a) | set(b)) if _as_compared(a.get(k)) != _as_compared(b.get(k))]
    line = {k: f"`{k}` {a.get(k)!r} -> {b.get(k)!r}" for k in changed}
    return ([line[k] for k in changed if not _may_change_on_resume(k)],
            [line[k] for k in changed if _may_change_on_resume(k)])


def _refused_resume_message(run_dir: Path, ckpt: Path, refused: list[str]) -> str:
    return (f"cannot resume {ckpt} with this recipe: {'; '.join(refused)} (since the run began) would change what "
            "its trainable parameters mean or which data they are trained on; to train the new recipe, choose "
            f"another `output.dir`, or, to discard this run and start over in it, delete {run_dir / 'checkpoints'} "
            "(memft never deletes checkpoints itself, and `output.resume: never` does not start over: it refuses a "
            "directory that holds checkpoints)")


def _truncate_metrics(path: Path, step: int) -> int:
    """Drop lines logged after the checkpoint we resume from, so each step appears once, and lines that do not
    parse (a crash mid-write tears the last one). Returns how many lines did not parse."""
    if not path.exists():
        return 0
    keep, torn = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record_step = json.loads(line)["step"]
            logged_before = record_step <= step
        except (ValueError, KeyError, TypeError):
            torn += 1
            continue
        if logged_before:
            keep.append(line)
    path.write_text("".join(line + "\n" for line in keep))
    return torn
