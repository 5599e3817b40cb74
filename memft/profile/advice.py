"""What to change when a recipe does not fit a memory budget: candidates, each profiled, ranked.

Every candidate is a set of recipe overrides (the same `key=value` strings `memft train` takes), so a
suggestion can be pasted onto the command line as is. Each is predicted by the same profiler, and its
speed cost is the factor our side-by-side benchmarks measured (docs/benchmarks.md: an H100 on OLMoE's
widths), stated in words beside the change (or, for the levers not measured on a GPU yet, what it does).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from memft import registry
from memft.errors import UserError
from memft.recipe import Recipe

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_bytes(text: str) -> int:
    """`24GiB`, `80GB`, `24G` (binary), `512MiB` or a plain number of bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in UNITS:
        raise UserError(f"`--gpu-memory {text}`: give a size like 24GiB, 80GB or 24G")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


@dataclass
class Change:
    label: str
    overrides: list[str]
    cost: str
    """Expected effect on speed (or on what is trained), in words."""
    note: str = ""
    """Why a change that does not lower the peak is still listed (`saves nothing here: ...`)."""
    combined: bool = False
    host: str = ""
    """The clause on host memory that `rank` added to `cost` (`(89.7 GiB more host memory)`), "" when none."""
    same_training: bool = True
    """It trains the same weights on the same tokens every step, only stored or stepped differently (False: adapters
    instead of the weights, a share of the layers or tokens, shorter sequences)."""


def candidates(recipe: Recipe, moe: bool = False) -> list[Change]:
    """Changes worth trying for `recipe` (`moe`: its model routes to experts), each a list of overrides."""
    names = [s.name for s in recipe.strategies]
    specs = [s.model_dump(mode="json", exclude_defaults=True) for s in recipe.strategies]
    t = recipe.train

    def with_strategies(*extra: dict, drop: tuple[str, ...] = ()) -> list[str]:
        kept = [s for s in specs if s["name"] not in drop]
        return [f"strategies={[*kept, *extra]}".replace("'", "")]

    out = []
    full = "full" in names  # the weights themselves train (also under revffn, lcsb, tokentune)
    host = t.optimizer_state == "host"
    if recipe.model.dtype == "float32":
        # on a GPU float32 weights already train under bf16 autocast: bf16 ones halve the bytes, not the speed
        lost = ("; full fine-tuning then rounds each update into bf16, so small ones are lost "
                "(`train.precision=bf16_stochastic_rounding` keeps them on average)") if full and not host else ""
        kept = " (the float32 masters on the host keep every update)" if full and host else ""
        out.append(Change("bf16 weights", ["model.dtype=bfloat16"], "bf16 weights" + (lost or kept)))
    if full and t.precision == "model" and t.optimizer == "adamw" and not host:
        # listed after plain bf16: at an equal peak `combine` keeps the first, and host state needs `precision: model`
        to_bf16 = [] if recipe.model.dtype == "bfloat16" else ["model.dtype=bfloat16"]
        out.append(Change("bf16 weights, stochastic rounding" if to_bf16 else "stochastic rounding",
                          [*to_bf16, "train.precision=bf16_stochastic_rounding"],
                          ("bf16 weights; " if to_bf16 else "") + "memft's AdamW rounds each float32 update into the "
                          "bf16 weight and moments at random, so small updates survive on average (stories260K: train "
                          "loss +0.3% vs float32, round-to-nearest bf16 +3.9%); its step's speed on a GPU is not "
                          "measured yet"))
    if full and t.optimizer in ("adamw", "adamw_8bit") and t.precision == "model" and not host:
        eight_bit = t.optimizer != "adamw"
        out.append(Change("AdamW state in host memory" + (" (instead of 8-bit AdamW)" if eight_bit else ""),
                          [*(["train.optimizer=adamw"] if eight_bit else []), "train.optimizer_state=host"],
                          "the optimizer step runs on the CPU (fused AdamW on float32 master weights and moments in "
                          "host memory); each step copies the gradients to the host and the weights back, "
                          "overlapped with backward only beside the step in backward on a GPU"))
    refuses_step_in_backward = any(registry.get(n).step_in_backward for n in names)  # lcsb, meft: see validate
    if full and not t.optimizer_in_backward and t.grad_accum == 1 and not refuses_step_in_backward:
        clipped = t.max_grad_norm is not None
        out.append(Change("optimizer step in backward",
                          ["train.optimizer_in_backward=true", *(["train.max_grad_norm=null"] if clipped else [])],
                          "the same AdamW updates, each weight stepped as soon as backward completes its gradient"
                          + (f"; drops the global-norm clipping (`max_grad_norm: {t.max_grad_norm}`), whose norm "
                             "needs every gradient first (the norm is still logged)" if clipped else "")))
    if not t.gradient_checkpointing and "revffn" not in names:
        out.append(Change("gradient checkpointing", ["train.gradient_checkpointing=true"],
                          "1.3x step time measured on an H100 (each layer's forward runs twice)"))
    if t.optimizer == "adamw" and not host and any(s in names for s in ("full", "lora", "qlora")):
        out.append(Change("8-bit AdamW", ["train.optimizer=adamw_8bit"],
                          "about the same speed; optimizer state 4x smaller"))
    if full:
        out.append(Change("LoRA instead of full fine-tuning", with_strategies({"name": "lora"}, drop=("full",)),
                          "trains adapters, not the weights", same_training=False))
        out.append(Change("QLoRA instead of full fine-tuning", with_strategies({"name": "qlora"}, drop=("full",)),
                          "trains adapters on a 4-bit base; matmuls dequantize (1.04x step time vs LoRA on an H100)",
                          same_training=False))
    if "lora" in names:
        lora = next(s for s in specs if s["name"] == "lora")
        out.append(Change("QLoRA instead of LoRA", with_strategies({**lora, "name": "qlora"}, drop=("lora",)),
                          "4-bit base weights; matmuls dequantize (1.04x step time on an H100)", same_training=False))
    for name in ("lora", "qlora"):
        spec = next((s for s in specs if s["name"] == name), None)
        if moe and spec is not None and spec.get("params", {}).get("target_experts") is not False:
            out.append(Change(f"{name} without the routed experts",
                              with_strategies({**spec, "params": {**spec.get("params", {}), "target_experts": False}},
                                              drop=(name,)),
                              "adapters on attention and shared layers only (no expert factors, their gradients or "
                              "AdamW state)", same_training=False))
    if "tokentune" not in names and "revffn" not in names:
        out.append(Change("TokenTune (25% of tokens carry gradients)",
                          with_strategies({"name": "tokentune", "params": {"fraction": 0.25}}),
                          "exact forward, gradients from a quarter of the tokens (1.2x step time on an H100)",
                          same_training=False))
    if ("lcsb" not in names and "revffn" not in names and not t.optimizer_in_backward
            and any(s in names for s in ("lora", "qlora", "full"))):
        out.append(Change("LCSB (1 of 4 layer groups gets gradients per step)",
                          with_strategies({"name": "lcsb", "params": {"groups": 4}}),
                          "each layer trained every 4th step; faster (0.6x step time on an H100)",
                          same_training=False))
    if t.batch_size > 1 and not t.optimizer_in_backward:  # a step in backward cannot accumulate
        half = t.batch_size // 2
        accum = t.grad_accum * t.batch_size // half
        out.append(Change(f"micro-batch {half}, accumulation {accum}",
                          [f"train.batch_size={half}", f"train.grad_accum={accum}"],
                          "same tokens per step, more micro-steps (lower throughput on a GPU)"))
    if recipe.data.max_length > 256:
        out.append(Change(f"sequences of {recipe.data.max_length // 2} tokens",
                          [f"data.max_length={recipe.data.max_length // 2}"],
                          "truncates longer examples (changes the data)", same_training=False))
    return out


def rank(recipe: Recipe, overrides: list[str], budget: int, predict, moe: bool = False,
         base=None) -> list[tuple[Change, object]]:
    """Each candidate's profile (`predict(overrides) -> Profile`; changes the recipe refuses are left out),
    those that fit first, each group by predicted peak. With `base` (the recipe's own profile), a change that does
    not lower its peak says why (`Change.note`)."""
    results = []
    for change in candidates(recipe, moe):
        try:
            profile = predict([*overrides, *change.overrides])
        except UserError:
            continue  # the change conflicts with this recipe (e.g. a strategy combination)
        if base is not None:
            change.note = no_saving(base, profile)
            change.host = host_cost(base, profile)
            change.cost += change.host
        results.append((change, profile))
    return sorted(results, key=lambda cp: (cp[1].peak > budget, cp[1].peak))


LITTLE = 0.01
"""A change that lowers the peak by less than this share of it is marked as saving (almost) nothing."""
PARTS = {"weights": "weight_bytes", "gradients": "gradients", "optimizer state": "optimizer_state",
         "activations": "activations", "the loss's backward buffers": "backward_transient"}


def no_saving(base, profile) -> str:
    """Why `profile` (a change of `base`) lowers the peak by less than `LITTLE` of it, or by less than shown, in
    words; "" when it saves that much."""
    if any("upper bound" in n for n in profile.notes if n not in base.notes):
        # TokenTune's fit is not reliable yet: its activations are shown without selection
        return ("may save more than shown: its activations are shown at the bound without token selection "
                "(the fit with selection is not reliable yet)")
    if profile.peak < (1 - LITTLE) * base.peak:
        return ""
    deltas = {name: getattr(profile, attr) - getattr(base, attr) for name, attr in PARTS.items()}
    down = [name for name, d in deltas.items() if d < 0]
    up = [name for name, d in deltas.items() if d > 0]
    verb = ("raises the peak here" if profile.peak > base.peak else "saves nothing here" if profile.peak == base.peak
            else f"saves under {LITTLE:.0%} here")
    if up:
        return f"{verb}: more {' and '.join(up)}" + (f" outweigh less {' and '.join(down)}" if down else "")
    if profile.optimizer_in_backward and not base.optimizer_in_backward and "gradients" in down:
        return (f"{verb}: the activations set this peak, not the gradients, and with the step in backward the "
                f"most gradients alive at once ({fmt_bytes(profile.gradients)}: one layer's, or the largest weight's "
                "outside the layers) come on top of them")
    if down and set(down) <= {"activations", "the loss's backward buffers"}:
        if profile.grad_accum > 1 and base.grad_accum == 1:
            return f"{verb}: with accumulation the gradients stay beside every micro-batch's activations"
        start = base.activations + base.backward_transient + base.head_gradient
        if base.grad_accum == 1 and not base.optimizer_in_backward and base.gradients >= start:
            return f"{verb}: the peak is set by the gradients at the end of backward, not by activations"
    if down:
        return f"{verb}: it lowers only the {' and '.join(down)}, a small part of this peak"
    return f"{verb}: it changes none of weights, gradients, optimizer state or activations at this size"


MAX_CHANGES = 4
"""The most changes `combine` puts together: full fine-tuning of an 8B model on a 24 GiB GPU takes four (bf16 weights,
AdamW state in host memory, checkpointing, the step in backward)."""
BUILDS_ON = ("strategies", "train.batch_size", "train.grad_accum", "data.max_length")
"""Keys whose later value is computed from the earlier one (the strategies list with the earlier ones in it, half the
micro-batch again): another change may set them again. Any other key set twice would undo the first change."""


def combinations(load, overrides: list[str], budget: int, predict, ranked: list[tuple[Change, object]],
                 moe: bool = False, base=None) -> list[tuple[Change, object]]:
    """The rows `memft profile` shows above the single changes when none fits: `combine` over every change and, when
    that one trains something else (adapters instead of the weights, a share of the layers or tokens), also over the
    changes that keep the training (`Change.same_training`), e.g. full fine-tuning in bf16 with its AdamW state in
    host memory, checkpointing and the step in backward. Those that fit first, each group by peak."""
    rows = []
    found = combine(load, overrides, budget, predict, ranked, moe, base=base)
    if found is not None:
        rows.append(found)
    if found is None or not found[0].same_training:
        kept = [(c, q) for c, q in ranked if c.same_training]
        same = combine(load, overrides, budget, predict, kept, moe, same_training=True, base=base)
        if same is not None and (found is None or same[0].overrides != found[0].overrides):
            rows.append(same)
    return sorted(rows, key=lambda cq: (cq[1].peak > budget, cq[1].peak))


def combine(load, overrides: list[str], budget: int, predict, ranked: list[tuple[Change, object]],
            moe: bool = False, max_changes: int = MAX_CHANGES, same_training: bool = False,
            base=None) -> tuple[Change, object] | None:
    """When no single change fits: the change with the lowest peak (`ranked`, from `rank`), then on top of it the
    others, in the order of their own peaks, until one fits; when none does, the one with the lowest peak, and so on
    (at most `max_changes`). `load(overrides) -> Recipe`, `predict(overrides) -> Profile`; `same_training`: only
    changes that keep the training (`Change.same_training`); `base` (the recipe's profile): the cost says the host
    memory the combination adds. A change that would set again a key an earlier one set (`BUILDS_ON` aside) is not
    tried on top of it: `merged` keeps the later value, which would undo the earlier change (8-bit AdamW, then AdamW
    state on the host with `optimizer: adamw`). The combination that fits, else the lowest one found; None when no
    second change lowers the peak."""
    if not ranked:
        return None
    chosen, best = [ranked[0][0]], ranked[0][1]
    order = {c.label: i for i, (c, _) in enumerate(ranked)}
    while best.peak > budget and len(chosen) < max_changes:
        extra = [*overrides, *merged(chosen)]
        taken = {o.split("=", 1)[0] for c in chosen for o in c.overrides} - set(BUILDS_ON)
        lower = []
        # most promising first: the first that fits ends the search (each try may fit new twins)
        for change in sorted(candidates(load(extra), moe), key=lambda c: order.get(c.label, len(order))):
            if (same_training and not change.same_training) or taken & {o.split("=", 1)[0] for o in change.overrides}:
                continue
            try:
                q = predict([*extra, *change.overrides])
            except UserError:
                continue
            if q.peak < best.peak:
                lower.append((change, q))
            if q.peak <= budget:
                break
        if not lower:
            break
        change, best = min(lower, key=lambda cq: cq[1].peak)
        chosen.append(change)
    if len(chosen) < 2:
        return None
    host = host_cost(base, best) if base is not None else ""
    return Change(" + ".join(c.label for c in chosen), merged(chosen),
                  "; ".join(beside(load, overrides, c, chosen, moe) for c in chosen) + host, host=host,
                  combined=True, same_training=all(c.same_training for c in chosen)), best


def beside(load, overrides: list[str], change: Change, chosen: list[Change], moe: bool = False) -> str:
    """`change`'s cost as it reads on top of the other `chosen` changes (bf16 weights lose small updates, but not
    beside AdamW state in host memory, whose float32 masters keep them); its own cost when it is not offered there."""
    try:
        others = candidates(load([*overrides, *merged([c for c in chosen if c is not change])]), moe)
    except UserError:
        others = []
    return next((c.cost for c in others if c.label == change.label), change.cost.removesuffix(change.host))


def host_cost(base, profile) -> str:
    """What `profile` keeps in host memory beyond `base`, as a clause to add to a change's cost ("" when nothing)."""
    more = sum(profile.host.values()) - sum(base.host.values())
    return f" ({fmt_bytes(more)} more host memory)" if more > 0 else ""


def fmt_bytes(n: int) -> str:
    """`17.7 GiB`, `512.0 KiB`: as the profile's tables write sizes (the CLI's own formatter)."""
    from memft.cli import _fmt_bytes

    return _fmt_bytes(n)


def merged(changes: list[Change]) -> list[str]:
    """The changes' overrides, one per key: a later change's `key=` wins (it was computed on top of the earlier)."""
    return list({o.split("=", 1)[0]: o for c in changes for o in c.overrides}.values())


def to_json(ranked: list[tuple[Change, object]], budget: int) -> list[dict]:
    """The advice as `memft profile --json` writes it: one entry per row of the table, in its order."""
    return [{"label": c.label, "overrides": c.overrides, "cost": c.cost, "peak": q.peak, "fits": q.peak <= budget,
             "note": c.note, "combined": c.combined, "same_training": c.same_training} for c, q in ranked]
