"""Predict a recipe's activation bytes at full size from real steps of small twins of its model.

Activation memory is what autograd saves for backward (`SavedTensorMeter`). Every saved tensor of a
Transformer has a shape made of the batch, the sequence and one or two of the model's widths, so the
total is a sum of a few monomials (tokens x hidden, tokens x vocab, batch x seq^2, ...) with
small integer-like coefficients that only the code knows: which tensors HF's layers, the attention
kernel, the MoE dispatch and each strategy keep.

Rather than writing those coefficients down per architecture (and getting them wrong when
transformers or a strategy changes), we measure them: build *twins* of the model (same class, layer
pattern, strategies and dtype, but widths of a few dozen; the real depth, or 1 and 2 layers when every
layer costs the same), run real training forwards of each on the CPU at a few batch shapes, and solve
for the coefficients by least squares. The fit is exact when
every saved tensor is one of the monomials below (then the twins' residual is ~0, reported as
`fit_residual`), and the full-size prediction is the monomials evaluated at the real widths.
"""

from __future__ import annotations

import copy
import math
import multiprocessing
import os
import random
import sys
import threading
import time
from dataclasses import dataclass

import torch

from memft.models.load import EXPERT_COUNT_KEYS, is_moe

TOKEN_ID_KEYS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id",
                 "decoder_start_token_id")


@dataclass
class Widths:
    """The dimensions a saved tensor's shape can be made of."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    experts: int = 0
    top_k: int = 0
    expert_intermediate: int = 0
    shared_intermediate: int = 0

    @classmethod
    def of(cls, config) -> Widths:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        experts = next((getattr(config, k) for k in EXPERT_COUNT_KEYS if isinstance(getattr(config, k, None), int)), 0)
        moe = is_moe(config)
        return cls(hidden=config.hidden_size, intermediate=getattr(config, "intermediate_size", 0) or 0, heads=heads,
                   kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
                   vocab=config.vocab_size, experts=experts if moe else 0,
                   top_k=(getattr(config, "num_experts_per_tok", 0) or 0) if moe else 0,
                   expert_intermediate=(getattr(config, "moe_intermediate_size", None) or config.intermediate_size)
                   if moe else 0,
                   shared_intermediate=getattr(config, "shared_expert_intermediate_size", 0) or 0)


def features(w: Widths, batch: int, seq: int, grad_tokens: int | None = None,
             weight_casts: bool = False) -> dict[str, float]:
    """The monomials saved bytes are made of, for one forward of `batch` sequences of `seq` tokens.

    `grad_tokens`: when a strategy lets only some tokens carry gradients (TokenTune), their count; the
    token monomials then appear twice, once for all tokens and once for those.
    `weight_casts`: under autocast, the low-precision copy of each trainable weight is saved too.
    """
    n = batch * seq
    out = _token_features("tokens", n, w) | {
        "batch": batch,
        "seq x head_dim": seq * w.head_dim,
        "batch x seq^2": batch * seq * seq,
        "batch x heads x seq^2": batch * w.heads * seq * seq,
        "experts": w.experts,
        "experts x hidden": w.experts * w.hidden,
        "experts x expert width": w.experts * w.expert_intermediate,
        "experts x hidden x expert width": w.experts * w.hidden * w.expert_intermediate,  # peft's fused-expert deltas
        "constant": 1,
    }
    if weight_casts:
        q, kv = w.heads * w.head_dim, w.kv_heads * w.head_dim
        out |= {"hidden": w.hidden, "intermediate": w.intermediate, "query width": q, "key/value width": kv,
                "vocab": w.vocab, "hidden x hidden": w.hidden ** 2, "hidden x intermediate": w.hidden * w.intermediate,
                "hidden x query width": w.hidden * q, "hidden x key/value width": w.hidden * kv,
                "hidden x vocab": w.hidden * w.vocab, "hidden x shared expert width": w.hidden * w.shared_intermediate}
    if grad_tokens is not None:
        out |= _token_features("grad tokens", grad_tokens, w) | {
            "grad tokens x seq": grad_tokens * seq, "grad tokens x heads x seq": grad_tokens * w.heads * seq,
            "grad tokens x head_dim": grad_tokens * w.head_dim}
    return out


def _token_features(label: str, n: int, w: Widths) -> dict[str, float]:
    return {
        label: n,
        f"{label} x hidden": n * w.hidden,
        f"{label} x intermediate": n * w.intermediate,
        f"{label} x query width": n * w.heads * w.head_dim,
        f"{label} x key/value width": n * w.kv_heads * w.head_dim,
        f"{label} x heads": n * w.heads,
        f"{label} x vocab": n * w.vocab,
        f"{label} x experts": n * w.experts,
        f"{label} x top-k": n * w.top_k,
        f"{label} x top-k x hidden": n * w.top_k * w.hidden,
        f"{label} x top-k x expert width": n * w.top_k * w.expert_intermediate,
        f"{label} x shared expert width": n * w.shared_intermediate,
    }


LOGIT_FEATURES = ("tokens x vocab", "grad tokens x vocab")
"""Features that belong to the logits and loss rather than to the decoder layers."""


def leading_layers(config) -> int | None:
    """How many first decoder layers differ from the rest (the dense layers an MoE model starts with), when
    every later layer has the same structure; None when the pattern never settles (sparse steps, alternating
    layer types). A layer's cost past the leading ones does not depend on where it is."""
    if (getattr(config, "decoder_sparse_step", None) or 1) != 1:
        return None
    if len(set(getattr(config, "layer_types", None) or [None])) != 1:
        return None
    dense = sorted(getattr(config, "mlp_only_layers", None) or [])
    if dense != list(range(len(dense))):  # dense layers scattered through the stack
        return None
    return max(len(dense), getattr(config, "first_k_dense_replace", None) or 0)


def twin_config(config, w: Widths, layers: int | None = None):
    """`config` with its widths replaced by `w` (layer pattern, norms, flags unchanged; depth `layers` if given)."""
    twin = copy.deepcopy(config)
    if layers is not None:
        twin.num_hidden_layers = layers
    values = {"hidden_size": w.hidden, "intermediate_size": w.intermediate, "num_attention_heads": w.heads,
              "num_key_value_heads": w.kv_heads, "vocab_size": w.vocab, "num_experts_per_tok": w.top_k,
              "moe_intermediate_size": w.expert_intermediate, "shared_expert_intermediate_size": w.shared_intermediate}
    if getattr(config, "head_dim", None):
        values["head_dim"] = w.head_dim
    for key in EXPERT_COUNT_KEYS:
        values[key] = w.experts
    for key, value in values.items():
        if getattr(config, key, None):  # only what the architecture has
            setattr(twin, key, value)
    for key in TOKEN_ID_KEYS:
        token = getattr(config, key, None)
        if isinstance(token, int) and token >= w.vocab:
            setattr(twin, key, w.vocab - 1)
    return twin


def sample_widths(real: Widths, config, rng: random.Random) -> Widths:
    """Small random widths of the same architecture (multiples of 8, so every kernel choice stays the same)."""
    heads = rng.choice([2, 4, 6]) if real.heads > 1 else 1
    kv_heads = heads if real.kv_heads == real.heads else rng.choice([d for d in range(1, heads + 1) if heads % d == 0
                                                                     and d < heads] or [1])
    head_dim = rng.choice([8, 16, 24])
    hidden = rng.randrange(32, 104, 8) if getattr(config, "head_dim", None) else heads * head_dim
    intermediate = rng.randrange(16, 136, 8) if real.intermediate else 0
    experts = rng.randrange(2, 7) if real.experts else 0
    # Mixtral-style experts are `intermediate_size` wide; Qwen-MoE-style ones have their own width
    expert_width = (rng.randrange(16, 72, 8) if getattr(config, "moe_intermediate_size", None) else intermediate
                    ) if experts else 0
    return Widths(hidden=hidden, intermediate=intermediate, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                  vocab=rng.randrange(64, 328, 8), experts=experts,
                  top_k=rng.randrange(1, min(experts, 3) + 1) if experts else 0, expert_intermediate=expert_width,
                  shared_intermediate=rng.randrange(16, 72, 8) if real.shared_intermediate else 0)


@dataclass
class Fit:
    coefficients: dict[str, float]
    """Bytes per unit of each feature (with `per_layer`: the part outside the decoder layers)."""
    residual: float
    """Largest relative error of the fit on the twins themselves (0: every saved tensor is a feature)."""
    twins: int
    per_layer: dict[str, float] | None = None
    """Bytes per unit of each feature for one decoder layer, when the fit was made at depths 1 and 2."""
    layers: int = 0

    def predict(self, w: Widths, batch: int, seq: int, grad_tokens: int | None = None) -> tuple[float, float]:
        """(total bytes, of which logits and loss) for a forward of `batch` x `seq` at widths `w`."""
        f = features(w, batch, seq, grad_tokens, weight_casts=True)
        total = sum(self.coefficients.get(k, 0.0) * v for k, v in f.items())
        if self.per_layer is not None:
            total += self.layers * sum(self.per_layer.get(k, 0.0) * v for k, v in f.items())
        logits = sum(self.coefficients.get(k, 0.0) * f[k] for k in LOGIT_FEATURES if k in f)
        return total, logits


SHAPES_PER_TWIN = 3
"""Batch shapes measured on each twin (building a twin costs more than running it)."""
MAX_TWIN_SEQ = 64
"""Twins run sequences of 8 to this many tokens (or the recipe's `max_length`, when shorter)."""


def fit(measure, config, *, max_seq: int, partial_gradients: bool = False, weight_casts: bool = False,
        by_depth: bool = False, leading: int = 0, seed: int = 0, workers: int | None = None, block: int = 1) -> Fit:
    """Measure twins with `measure(twin_config, [(batch, seq), ...], twin) -> [(bytes, grad_tokens or None), ...]` and
    fit the feature coefficients. `partial_gradients`: a strategy reports grad tokens; `weight_casts`: the
    forward runs under autocast (more features each).

    `by_depth` (layers alike past the `leading` ones, strategies indifferent to depth): each twin is built
    with `leading` + 1 and `leading` + 2 layers instead of the real depth; their difference is one layer's
    cost, fitted on its own, and the prediction is the rest (the leading layers included) plus the other
    layers times one layer. Much faster for deep models, and as exact. `block`: the layers repeat their
    costs in blocks of this many (LCSB's groups: each block adds one layer to every group), so the twins are
    `leading` + `block` and `leading` + 2 `block` layers deep and a block's cost is spread over its layers.

    `workers`: processes that measure twins side by side (default: the idle cores, `measure_all`). The fit is the
    same for any number.
    """
    real = Widths.of(config)
    names = [k for k, v in features(real, 2, 16, 8 if partial_gradients else None, weight_casts).items() if v]
    rng = random.Random(seed)
    # twice as many measurements as features: with fewer, features that move together at twin widths (but
    # not at real ones) share their coefficient arbitrarily; Mistral's lm_head cast was missed that way
    twins = math.ceil(2 * (len(names) + 6) / SHAPES_PER_TWIN)
    drawn = []  # every twin's widths and shapes first, in the order one loop would draw them
    for _ in range(twins):
        w = sample_widths(real, config, rng)
        drawn.append((w, [(rng.randint(1, 3), rng.randrange(8, min(max_seq, MAX_TWIN_SEQ) + 1))
                          for _ in range(SHAPES_PER_TWIN)]))
    depths = (leading + block, leading + 2 * block) if by_depth else (None,)
    jobs = [(twin_config(config, w, layers=d), shapes, twin) for twin, (w, shapes) in enumerate(drawn) for d in depths]
    measured = iter(measure_all(measure, jobs, workers))
    rows, outside, layer = [], [], []
    for w, shapes in drawn:
        if by_depth:
            one, two = next(measured), next(measured)
            costs = [(2 * a - b, (b - a) / block, g) for (a, g), (b, _) in zip(one, two)]
        else:
            costs = [(total, 0, g) for total, g in next(measured)]
        for (batch, seq), (rest, per_layer, grad_tokens) in zip(shapes, costs):
            f = features(w, batch, seq, grad_tokens, weight_casts)
            rows.append([f.get(k, 0.0) for k in names])
            outside.append(rest)
            layer.append(per_layer)
    a = torch.tensor(rows, dtype=torch.float64)
    scale = a.abs().amax(0).clamp_min(1)

    def solve(target: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
        b = torch.tensor(target, dtype=torch.float64)
        return torch.linalg.lstsq(a / scale, b[:, None], driver="gelsd").solution[:, 0] / scale, b

    base, b_out = solve(outside)
    per, b_layer = solve(layer) if by_depth else (None, None)
    fitted, measured = a @ base, b_out
    if by_depth:  # judge the fit on what the twins really measured, at both depths
        fitted = torch.cat([fitted + block * (a @ per), fitted + 2 * block * (a @ per)])
        measured = torch.cat([b_out + block * b_layer, b_out + 2 * block * b_layer])
    residual = float(((fitted - measured).abs() / measured.clamp_min(1)).max())
    return Fit(dict(zip(names, base.tolist())), residual if math.isfinite(residual) else float("inf"), twins,
               dict(zip(names, per.tolist())) if by_depth else None, config.num_hidden_layers - leading)


_JOBS: tuple | None = None
"""(measure, jobs) of the `measure_all` in progress: forked workers inherit them (a closure cannot be pickled)."""


def measure_all(measure, jobs: list[tuple], workers: int | None = None) -> list:
    """`measure(*job)` for each job, in order, on up to `workers` processes (default: `idle_cores()`).

    Each twin's measurement is a function of its config, shapes and number alone (`build_model` seeds torch, the
    batches and the strategies' draws are seeded by the twin), so it is the same in any process and order: workers
    only change how long the fit takes. Twins are a few dozen wide and run on one thread each, so on an idle 2-core
    machine two workers fit in about half the time; on cores other processes keep busy a worker only adds the cost
    of its fork (measured: 1.6x slower under a load of 4 on 2 cores), hence the default. Workers are forked (Linux),
    so they start with this process's imports and `measure`; elsewhere, inside a daemonic process (which may not
    fork), or with one worker, the jobs run here. A job that fails in a worker runs again here, so its error is
    raised as the caller would see it."""
    global _JOBS
    forking = (sys.platform.startswith("linux") and not multiprocessing.current_process().daemon and _JOBS is None
               and _safe_to_fork())
    if workers is None:
        workers = idle_cores() if forking and len(jobs) > 1 else 1
    workers = min(workers, len(jobs))
    if workers < 2 or not forking:
        return [measure(*job) for job in jobs]
    _JOBS = (measure, jobs)
    try:
        with multiprocessing.get_context("fork").Pool(workers, initializer=_start_worker) as pool:
            results = pool.map(_measure_job, range(len(jobs)), chunksize=1)
    finally:
        _JOBS = None
    return [measure(*job) if result is None else result for job, result in zip(jobs, results)]


def _safe_to_fork() -> bool:
    """No other Python thread runs but a rich spinner's: a fork copies every lock as it is at that moment, and a
    lock another thread held then (a logging handler's, a tracker's) would hang the worker that takes it. The
    spinner's console lock is the one exception, and workers never write to that console (`_start_worker`)."""
    return all(t is threading.main_thread() or type(t).__name__ == "_RefreshThread" for t in threading.enumerate())


def _start_worker() -> None:
    torch.set_num_threads(1)
    # fresh streams: the caller's may be locked by a thread that was writing when it forked (the CLI's spinner),
    # and what twins print (load bars) the caller prints already
    sys.stdout = sys.stderr = open(os.devnull, "w")


def _measure_job(index: int):
    """One job of `measure_all` in a worker; None when it fails (it is measured again in the caller)."""
    measure, jobs = _JOBS
    try:
        return measure(*jobs[index])
    except Exception:
        return None


IDLE_SAMPLE_S = 0.05
"""How long `idle_cores` watches the CPUs."""


def idle_cores() -> int:
    """The cores this process may use that were idle over the last `IDLE_SAMPLE_S` (from /proc/stat; this process
    waits meanwhile, so its own core counts as idle), at least 1."""
    cores = len(os.sched_getaffinity(0))

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        return ticks[3] + ticks[4], sum(ticks)

    try:
        idle, total = sample()
        time.sleep(IDLE_SAMPLE_S)
        idle2, total2 = sample()
    except (OSError, ValueError):
        return cores
    share = (idle2 - idle) / max(total2 - total, 1)  # of every CPU of the machine
    return max(1, min(cores, round(share * (os.cpu_count() or cores))))
