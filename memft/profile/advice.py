"""What to change when a recipe does not fit a memory budget: candidates, each profiled, ranked.

Every candidate is a set of recipe overrides (the same `key=value` strings `memft train` takes), so a
suggestion can be pasted onto the command line as is. Each is predicted by the same profiler, and its
speed cost is the factor our side-by-side benchmarks measured (docs/benchmarks.md: an H100 on OLMoE's
widths), stated in words beside the change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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


def candidates(recipe: Recipe, moe: bool = False) -> list[Change]:
    """Changes worth trying for `recipe` (`moe`: its model routes to experts), each a list of overrides."""
    names = [s.name for s in recipe.strategies]
    specs = [s.model_dump(mode="json", exclude_defaults=True) for s in recipe.strategies]
    t = recipe.train

    def with_strategies(*extra: dict, drop: tuple[str, ...] = ()) -> list[str]:
        kept = [s for s in specs if s["name"] not in drop]
        return [f"strategies={[*kept, *extra]}".replace("'", "")]

    out = []
    if not t.gradient_checkpointing and "revffn" not in names:
        out.append(Change("gradient checkpointing", ["train.gradient_checkpointing=true"],
                          "1.3x step time measured on an H100 (each layer's forward runs twice)"))
    if t.optimizer == "adamw" and any(s in names for s in ("full", "lora", "qlora")):
        out.append(Change("8-bit AdamW", ["train.optimizer=adamw_8bit"],
                          "about the same speed; optimizer state 4x smaller"))
    if "full" in names:
        out.append(Change("LoRA instead of full fine-tuning", with_strategies({"name": "lora"}, drop=("full",)),
                          "trains adapters, not the weights"))
        out.append(Change("QLoRA instead of full fine-tuning", with_strategies({"name": "qlora"}, drop=("full",)),
                          "trains adapters on a 4-bit base; matmuls dequantize (1.04x step time vs LoRA on an H100)"))
    if "lora" in names:
        lora = next(s for s in specs if s["name"] == "lora")
        out.append(Change("QLoRA instead of LoRA", with_strategies({**lora, "name": "qlora"}, drop=("lora",)),
                          "4-bit base weights; matmuls dequantize (1.04x step time on an H100)"))
    for name in ("lora", "qlora"):
        spec = next((s for s in specs if s["name"] == name), None)
        if moe and spec is not None and spec.get("params", {}).get("target_experts") is not False:
            out.append(Change(f"{name} without the routed experts",
                              with_strategies({**spec, "params": {**spec.get("params", {}), "target_experts": False}},
                                              drop=(name,)),
                              "adapters on attention and shared layers only (no expert factors, their gradients or AdamW state)"))
    if "tokentune" not in names and "revffn" not in names:
        out.append(Change("TokenTune (25% of tokens carry gradients)",
                          with_strategies({"name": "tokentune", "params": {"fraction": 0.25}}),
                          "exact forward, gradients from a quarter of the tokens (1.2x step time on an H100)"))
    if "lcsb" not in names and "revffn" not in names and any(s in names for s in ("lora", "qlora", "full")):
        out.append(Change("LCSB (1 of 4 layer groups gets gradients per step)",
                          with_strategies({"name": "lcsb", "params": {"groups": 4}}),
                          "each layer trained every 4th step; faster (0.6x step time on an H100)"))
    if t.batch_size > 1:
        half = t.batch_size // 2
        accum = t.grad_accum * t.batch_size // half
        out.append(Change(f"micro-batch {half}, accumulation {accum}",
                          [f"train.batch_size={half}", f"train.grad_accum={accum}"],
                          "same tokens per step, more micro-steps (lower throughput on a GPU)"))
    if recipe.data.max_length > 256:
        out.append(Change(f"sequences of {recipe.data.max_length // 2} tokens",
                          [f"data.max_length={recipe.data.max_length // 2}"],
                          "truncates longer examples (changes the data)"))
    return out


def rank(recipe: Recipe, overrides: list[str], budget: int, predict, moe: bool = False) -> list[tuple[Change, object]]:
    """Each candidate's profile (`predict(overrides) -> Profile`; changes the recipe refuses are left out),
    those that fit first, each group by predicted peak."""
    results = []
    for change in candidates(recipe, moe):
        try:
            profile = predict([*overrides, *change.overrides])
        except UserError:
            continue  # the change conflicts with this recipe (e.g. a strategy combination)
        results.append((change, profile))
    return sorted(results, key=lambda cp: (cp[1].peak > budget, cp[1].peak))


def combine(load, overrides: list[str], budget: int, predict, ranked: list[tuple[Change, object]],
            moe: bool = False, max_changes: int = 3) -> tuple[Change, object] | None:
    """When no single change fits: the change with the lowest peak (`ranked`, from `rank`), then the best
    change on top of it, and so on (at most `max_changes`) until the budget is met. `load(overrides) ->
    Recipe`, `predict(overrides) -> Profile`. None when even that does not fit."""
    chosen: list[Change] = []
    while ranked and len(chosen) < max_changes:
        change, best = ranked[0]
        chosen.append(change)
        if best.peak <= budget:
            merged = {o.split("=", 1)[0]: o for c in chosen for o in c.overrides}  # a later `key=` wins
            return Change(" + ".join(c.label for c in chosen), list(merged.values()),
                          "; ".join(c.cost for c in chosen)), best
        extra = [*overrides, *(o for c in chosen for o in c.overrides)]
        ranked = [(c, q) for c, q in rank(load(extra), extra, budget, predict, moe) if q.peak < best.peak]
    return None
