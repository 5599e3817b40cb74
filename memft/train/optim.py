"""Optimizer and learning-rate schedule from the recipe's `train` block."""

from __future__ import annotations

import collections.abc
import functools
import math
import queue
import threading
import weakref
from collections.abc import Callable

import torch
from transformers import get_scheduler

from memft.recipe import TrainConfig

FUSED_DEVICES = ("cuda", "cpu")
"""Where torch's fused AdamW kernel runs."""


def build_optimizer(groups: list[dict], cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (torch's fused kernel on CUDA and CPU), memft's stochastic-rounding AdamW or bitsandbytes' 8-bit AdamW
    over `groups`; with `optimizer_in_backward`, one of them per parameter, stepped by backward (`StepInBackward`)."""
    def make(one: list[dict], salt: int = 0) -> torch.optim.Optimizer:
        if cfg.optimizer_state == "host":
            return HostAdamW(one, lambda host: _optimizer(host, cfg, torch.device("cpu")))
        return _optimizer(one, cfg, device, salt=salt)

    # the host steps overlap with backward on a GPU only: on the CPU they would compete with backward for the same
    # cores (1.02-1.12x, benchmarks/host_overlap.py) and the gradients queued for them would outlive their layer
    overlap = device.type == "cuda"
    return StepInBackward(groups, make, overlap_host_step=overlap) if cfg.optimizer_in_backward else make(groups)


def _optimizer(groups: list[dict], cfg: TrainConfig, device: torch.device, salt: int = 0) -> torch.optim.Optimizer:
    kwargs = dict(lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.precision == "bf16_stochastic_rounding":
        return StochasticRoundingAdamW(groups, seed=cfg.seed, salt=salt, **kwargs)
    if cfg.optimizer == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **kwargs)
    # the fused kernel runs on CUDA and on the CPU (HF Trainer's default): 3.7x faster than foreach on this CPU
    # (24 x 1M float32 parameters, one thread) and bitwise equal to it in float64
    return torch.optim.AdamW(groups, fused=device.type in FUSED_DEVICES, **kwargs)


class StepInBackward(torch.optim.Optimizer):
    """The optimizer step inside backward: each parameter is updated by its own optimizer the moment its gradient
    is complete (`register_post_accumulate_grad_hook`), and the gradient is freed at once, so the gradients of the
    whole model never exist together; at most about one layer's are alive (torchtune's `optimizer_in_bwd`).

    AdamW updates every parameter from its own gradient and moments alone, so stepping them one at a time is the
    ordinary step (tests/test_optim_in_backward.py: float64, 1e-12). What needs every gradient first cannot run
    this way and is refused at validate: gradient accumulation, global-norm clipping, strategies that change
    gradients after backward. The global norm is still measured (`grad_norm`), from each gradient before its step.

    With `HostAdamW` inner optimizers (`train.optimizer_state: host`) the hook only starts the gradient's copy to
    the host and frees the device gradient; one worker thread (`_HostStepWorker`) runs the CPU AdamW steps and
    write-backs in hook order while backward goes on. `overlap_host_step=False` steps them inside the hook instead
    (benchmarks/host_overlap.py compares the two; the results are bitwise equal, tests/test_host_optimizer_state.py).

    To the loop, the scheduler and checkpoints this is one optimizer: `param_groups` are the per-parameter
    optimizers' groups themselves (the scheduler's lr reaches them), `step()` waits for the host steps still running
    (so the scheduler's next lr, a checkpoint or the next forward never meets a half-finished step) and raises the
    worker's failure if it had one (`zero_grad()` and the state dicts wait too), and the state dict has the layout
    of one optimizer with one group per parameter.
    """

    def __init__(self, groups: list[dict], make, overlap_host_step: bool = True):
        params, self.inner = [], []
        for group in groups:
            options = {k: v for k, v in group.items() if k != "params"}
            for p in group["params"]:
                params.append(p)
                self.inner.append(make([{"params": [p], **options}], len(params) - 1))
        super().__init__(params, {})
        self.param_groups = [o.param_groups[0] for o in self.inner]
        self.state = _InnerStates(params, self.inner)
        self._squares = None
        self.overlap_host_step = overlap_host_step
        self._worker = _HostStepWorker()
        self._hooks = [p.register_post_accumulate_grad_hook(self._stepper(o)) for p, o in zip(params, self.inner)]

    def _stepper(self, optimizer: torch.optim.Optimizer):
        on_host = isinstance(optimizer, HostAdamW)

        def step(p: torch.Tensor) -> None:
            g = p.grad.detach()
            square = g.to(torch.promote_types(g.dtype, torch.float32)).square().sum()
            self._squares = square if self._squares is None else self._squares + square.to(self._squares.device)
            if on_host and self.overlap_host_step:
                # the CPU step runs beside the rest of backward: it needs only the host copy started here, and no
                # later node of this backward reads this weight (the node that made its gradient was the last; the
                # step in the hook relies on that too), so the write-back may land any time before `step()` returns
                self._worker.submit(optimizer.start_step())
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    def grad_norm(self) -> torch.Tensor:
        """The global L2 norm of the gradients stepped since the last call (0 when none was)."""
        squares, self._squares = self._squares, None
        return torch.zeros(()) if squares is None else squares.sqrt()

    def step(self, closure=None):  # every parameter was stepped during backward, the host steps may still run
        self._worker.wait()
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:  # each gradient was freed in its hook
        self._worker.wait()

    def state_dict(self) -> dict:
        self._worker.wait()
        state, groups, extra = {}, [], {}
        for i, o in enumerate(self.inner):
            one = o.state_dict()
            if 0 in one["state"]:
                state[i] = one["state"][0]
            groups.append({**one["param_groups"][0], "params": [i]})
            for key, value in one.items():  # e.g. HostAdamW's float32 masters, one per inner optimizer
                if key not in ("state", "param_groups"):
                    extra.setdefault(key, {})[i] = value[0]
        return {"state": state, "param_groups": groups, **extra}

    def load_state_dict(self, state_dict: dict) -> None:
        self._worker.wait()
        saved = state_dict["param_groups"]
        if len(saved) != len(self.inner):
            raise ValueError(f"the state has {len(saved)} parameter groups; this optimizer steps {len(self.inner)} "
                             "parameters one by one")
        extra = {k: v for k, v in state_dict.items() if k not in ("state", "param_groups")}
        for i, o in enumerate(self.inner):
            one = {0: state_dict["state"][i]} if i in state_dict["state"] else {}
            more = {key: {0: values[i] if i in values else values[str(i)]} for key, values in extra.items()}
            o.load_state_dict({"state": one, "param_groups": [{**saved[i], "params": [0]}], **more})
        self.param_groups = [o.param_groups[0] for o in self.inner]


class _HostStepWorker:
    """One daemon thread that runs the host steps handed to it (`submit`), one at a time in the order given;
    `wait()` returns once all have run and raises the first failure among them. After a failure the rest are
    skipped: that step is lost either way, and `wait()` says why.

    A daemon thread, so a run that dies mid-backward exits at once instead of finishing its queue; started at the
    first `submit`, and ended when its owner is collected (the thread holds the queue, never the owner).
    """

    def __init__(self):
        self._jobs: queue.Queue = queue.Queue()
        self._failures: list[BaseException] = []
        self._thread: threading.Thread | None = None

    def submit(self, job: Callable[[], None]) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=_run_jobs, args=(self._jobs, self._failures), daemon=True,
                                            name="memft-host-adamw")
            self._thread.start()
            weakref.finalize(self, self._jobs.put, None)
        self._jobs.put(job)

    def wait(self) -> None:
        self._jobs.join()
        if self._failures:
            failure = self._failures[0]
            self._failures.clear()
            raise failure


def _run_jobs(jobs: queue.Queue, failures: list[BaseException]) -> None:
    while (job := jobs.get()) is not None:
        try:
            if not failures:
                job()
        except BaseException as exc:  # handed to the thread that waits (`_HostStepWorker.wait`)
            failures.append(exc)
        finally:
            job = None  # hold no gradient once `wait()` may return
            jobs.task_done()


class _InnerStates(collections.abc.Mapping):
    """`StepInBackward.state` as one optimizer's: each parameter's state, read live from its own optimizer."""

    def __init__(self, params: list[torch.Tensor], inner: list[torch.optim.Optimizer]):
        # an inner optimizer's own key: the parameter itself, or HostAdamW's host master of it
        self._owner = {p: (o, o.param_groups[0]["params"][0]) for p, o in zip(params, inner)}

    def __getitem__(self, p: torch.Tensor) -> dict:
        o, key = self._owner.get(p, (None, None))
        if o is None or key not in o.state:  # no defaultdict entry is made
            raise KeyError(p)
        return o.state[key]

    def __iter__(self):
        return (p for p, (o, key) in self._owner.items() if key in o.state)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class HostAdamW(torch.optim.Optimizer):
    """`train.optimizer_state: host`: float32 master weights and the AdamW moments in host memory (pinned when a
    GPU is present), stepped there by torch's fused CPU AdamW; the device keeps only the weights in `model.dtype`
    and their gradients. A step copies each gradient to the host, steps the masters, and writes them back cast to
    the weight's dtype. With bf16 weights the update is float32 AdamW on the masters, so no update is lost.
    `start_step()` splits the step where the device's part ends, for `StepInBackward` to run the rest on a thread.

    To the loop, the scheduler and checkpoints it is one optimizer: `param_groups` are the host optimizer's (the
    scheduler's lr reaches it), and the state dict is the host optimizer's plus the masters (`"master"`), so a
    resumed run continues from the same float32 values.
    """

    def __init__(self, groups: list[dict], make):
        pin = torch.cuda.is_available()
        self.weights, host_groups = [], []
        for group in groups:
            masters = []
            for p in group["params"]:
                master = p.detach().to("cpu", torch.promote_types(p.dtype, torch.float32), copy=True)
                masters.append(master.pin_memory() if pin else master)
                self.weights.append(p)
            host_groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": masters})
        self.masters = [m for g in host_groups for m in g["params"]]
        self.host = make(host_groups)
        super().__init__(self.weights, {})
        self.param_groups, self.state = self.host.param_groups, self.host.state

    @torch.no_grad()
    def step(self, closure=None):
        self.start_step()()
        return None

    @torch.no_grad()
    def start_step(self) -> Callable[[], None]:
        """Start each gradient's copy to the host (into pinned memory on CUDA, not waited for) and return the rest of
        the step, which may run on any thread: wait for the copies, step the masters, write the weights back.

        The rest reads only the host copies taken here, never `p.grad`, so the device gradients may be freed as
        soon as this returns: the caching allocator hands a freed block only to work queued after the copy on the
        same stream. On the CPU a gradient already in the master's dtype is its own host copy (`.to` returns it);
        the rest then holds the only reference once the gradient is freed, and nothing else writes to it.
        """
        grads = [None if p.grad is None else p.grad.detach().to("cpu", master.dtype, non_blocking=True)
                 for p, master in zip(self.weights, self.masters)]
        landed = []  # one event per GPU, behind the copies on the stream backward made the gradients on
        for device in {p.device for p in self.weights if p.device.type == "cuda" and p.grad is not None}:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            landed.append(event)
        return functools.partial(self._step_on_host, grads, landed)

    @torch.no_grad()  # grad mode is per thread: the write-back into a leaf needs it off on the worker too
    def _step_on_host(self, grads: list[torch.Tensor | None], landed: list[torch.cuda.Event]) -> None:
        for event in landed:
            event.synchronize()  # the gradients' copies have landed
        for master, grad in zip(self.masters, grads):
            master.grad = grad
        self.host.step()  # reads the lr at this moment: `StepInBackward.step()` waits before the scheduler steps
        for p, master in zip(self.weights, self.masters):
            if master.grad is not None:
                p.copy_(master, non_blocking=True)
                master.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.weights:
            p.grad = None

    def state_dict(self) -> dict:
        return {**self.host.state_dict(), "master": dict(enumerate(self.masters))}

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        saved = state_dict.pop("master")
        with torch.no_grad():
            for i, master in enumerate(self.masters):
                master.copy_(saved[i] if i in saved else saved[str(i)])
        self.host.load_state_dict(state_dict)
        self.param_groups, self.state = self.host.param_groups, self.host.state


def stochastic_round_to_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """float32 `x` rounded to bf16 up or down at random, with the probability of each neighbour in proportion to
    x's closeness to it: E[result] = x (unbiased), where round-to-nearest drops every change below half a step.

    bf16 is float32's upper 16 bits: adding a uniform 16-bit integer to the lower bits carries into the kept bits
    with exactly that probability, then truncation keeps the upper half (the float32 bit pattern is sign-magnitude,
    so this acts on the magnitude for either sign). Values that are already bf16 are returned unchanged.
    """
    bits = x.float().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)  # -65536 == 0xFFFF0000 as int32


UPDATE_CHUNK = 1 << 22
"""Elements per slice of a weight updated at once by `StochasticRoundingAdamW` (its float32 working copies)."""


class StochasticRoundingAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected moments; torch's `AdamW` formula) computed in float32 (float64
    for float64 weights), its results written back in the weight's dtype: for bf16 weights the new weight and both
    moments by `stochastic_round_to_bf16` (the moments are bf16, as torch's AdamW keeps them for bf16 weights: 4
    bytes per weight), for others exactly.

    Randomness: each weight's rounding noise comes from a generator seeded by (seed, salt + its index, step), so a
    resumed run draws the same noise and different weights draw independent noise (`salt`: the index of the first
    weight, for the one-weight optimizers of `StepInBackward`).
    """

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, seed: int = 0, salt: int = 0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.seed, self.salt = seed, salt

    @torch.no_grad()
    def step(self, closure=None):
        index = self.salt
        for group in self.param_groups:
            (b1, b2), lr, eps, wd = group["betas"], group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                state, work = self.state[p], torch.promote_types(p.dtype, torch.float32)
                if not state:  # the moments in the weight's dtype, as torch's AdamW keeps them
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = int(state["step"])
                gen = None
                if p.dtype == torch.bfloat16:
                    gen = torch.Generator(p.device).manual_seed(hash((self.seed, index, t)) % 2**63)
                # in chunks: the float32 working copies of a large weight (an embedding) stay bounded
                flat = [x.view(-1) for x in (p, p.grad, state["exp_avg"], state["exp_avg_sq"])]
                for start in range(0, p.numel(), UPDATE_CHUNK):
                    w, g, m, v = (x[start:start + UPDATE_CHUNK] for x in flat)
                    g = g.to(work)
                    m_new = m.to(work, copy=True).lerp_(g, 1 - b1)
                    v_new = v.to(work, copy=True).mul_(b2).addcmul_(g, g, value=1 - b2)
                    new = w.to(work, copy=True).mul_(1 - lr * wd)
                    denom = (v_new.sqrt() / math.sqrt(1 - b2 ** t)).add_(eps)
                    new.addcdiv_(m_new, denom, value=-lr / (1 - b1 ** t))
                    for stored, value in ((m, m_new), (v, v_new), (w, new)):
                        stored.copy_(value if gen is None else stochastic_round_to_bf16(value, gen))
        return None


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    """Linear warmup for `warmup_steps`, then constant / linear decay / cosine decay to 0 at `total_steps`."""
    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[cfg.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=total_steps)


def clip_gradients(grads: list[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """The global L2 norm of `grads` (on any devices: the model's and strategies' host gradients alike), and with
    `max_norm` every gradient scaled in place by `min(1, max_norm / (norm + 1e-6))`, torch's `clip_grad_norm_` rule.

    Takes gradients rather than parameters so that gradients no optimizer parameter holds (MEFT's host rows,
    `Strategy.outside_grads`) count in the norm and are clipped like every other one.
    """
    norm = torch.nn.utils.get_total_norm(grads)
    if max_norm is not None and grads:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for g in grads:
            by_device.setdefault(g.device, []).append(g)
        for device, group in by_device.items():
            torch._foreach_mul_(group, coef.to(device))
    return norm
