"""The strategy registry: the one place that names, validates, orders and combines strategies.

A strategy is a named, validated transformation of the model plus optional hooks into the loop.
Each strategy module registers itself with `@register`; `compose()` turns the recipe's
`strategies:` list into instances, applied in the fixed order given by `Strategy.order`:

    load / quantize (10) -> LoRA / QLoRA (20) -> MEFT adapters (30) -> RevFFN / TokenTune / LCSB (40+)

Conflicts are declared on the strategy (`conflicts`), never scattered through the loop.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from memft.recipe import Recipe


def _compiles(patterns: list[str]) -> list[str]:
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"{pattern!r} is not a regular expression: {exc}") from None
    return patterns


Patterns = Annotated[list[str], AfterValidator(_compiles)]
"""A list of regular expressions (over parameter names), checked when the recipe is validated."""


class StrategyParams(BaseModel):
    """Base for a strategy's params model: unknown keys are errors, docstrings are the help."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


@dataclass
class BuildContext:
    """What `apply()` may need to know about the run."""

    recipe: Recipe
    device: torch.device
    is_moe: bool = False
    total_steps: int | None = None
    """Optimizer steps the run will take (None outside training), for strategies that follow the lr schedule."""
    notes: list[str] = field(default_factory=list)
    """Sentences for the plan printed by `--dry-run` and at the start of training."""


@dataclass
class LossOutput:
    """A strategy's replacement loss: the *sum* over `count` targets (tokens or examples)."""

    loss_sum: torch.Tensor
    count: int
    logits: torch.Tensor | None = None
    """The logits the loss was taken on, when the caller may want them (evaluation accuracy)."""
    aux_loss: torch.Tensor | None = None
    """The MoE load-balancing loss (unweighted) already included in `loss_sum` as `coef * aux_loss * count`."""


@dataclass
class MemoryEstimate:
    """What a strategy adds to `memft profile`'s prediction beyond the model it applied to (meta device)."""

    device: dict[str, int] = field(default_factory=dict)
    """Device bytes outside the model's parameters and saved activations, by name."""
    host: dict[str, int] = field(default_factory=dict)
    """Host-memory bytes, by name."""
    notes: list[str] = field(default_factory=list)

    def merge(self, other: MemoryEstimate | None) -> None:
        if other is not None:
            self.device |= other.device
            self.host |= other.host
            self.notes += other.notes


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """Losses are taken in float32 for half-precision logits and stay float64 for float64 ones."""
    import torch

    return t.to(torch.promote_types(t.dtype, torch.float32))


class Strategy:
    """Lifecycle of one strategy. Hooks default to doing nothing; override what the method needs.

    Structure only: a strategy does not inherit behaviour from another strategy.
    """

    name: ClassVar[str]
    Params: ClassVar[type[StrategyParams]] = StrategyParams
    order: ClassVar[int] = 50
    """Position in the composition order (lower applies first)."""
    summary: ClassVar[str] = ""
    """One line for `memft recipes` / `memft schema`."""
    conflicts: ClassVar[dict[str, str]] = {}
    """Strategy names this one cannot be combined with -> the sentence that says why and what to use."""
    trains_base: ClassVar[bool] = False
    """True when the strategy decides which base-model weights train (`full`, `lora`, `qlora`)."""
    adds_trainable: ClassVar[bool] = False
    """True when the strategy brings trainable parameters of its own (e.g. MEFT's adapters)."""
    computes_router_aux: ClassVar[bool] = False
    """True when the strategy's `loss()` adds the MoE load-balancing loss itself (RevFFN's reversible stack, which
    replays routing in its own backward); the loop then adds none."""
    rewires: ClassVar[str] = ""
    """Non-empty when the trained weights only make sense in the strategy's rewired model (RevFFN's two-stream
    stack): says what, and `memft export` refuses to write a plain transformers model from them."""

    step_in_backward: ClassVar[str] = ""
    """Why `train.optimizer_in_backward` cannot run with this strategy (its gradients are changed or completed
    after backward, or the combination is untested); empty when it can."""

    def __init__(self, params: StrategyParams):
        self.params = params

    def check(self, recipe: Recipe) -> list[str]:
        """Problems with this strategy in this recipe (impossible combinations), as sentences."""
        return []

    def load_kwargs(self, recipe: Recipe) -> dict[str, Any]:
        """Extra keyword arguments for loading the model (e.g. a 4-bit quantization config)."""
        return {}

    def apply(self, model: nn.Module, ctx: BuildContext) -> nn.Module:
        """Wrap / replace / freeze / add parameters. Returns the (possibly new) model."""
        return model

    def param_groups(self, model: nn.Module) -> list[dict] | None:
        """Optimizer parameter groups, if the strategy needs its own (default: all trainable params)."""
        return None

    def on_step_start(self, step: int, batch: dict) -> dict:
        """Called once per micro-batch of an optimizer step, for all of them before the step's first
        forward (so `count_targets` can normalise the loss over the whole step). E.g. pick tokens."""
        return batch

    def count_targets(self, batch: dict) -> int | None:
        """How many targets `loss()` will sum over for this batch, if not the default (tokens with labels)."""
        return None

    def loss(self, model: nn.Module, batch: dict) -> LossOutput | None:
        """Compute the loss instead of the loop's default forward + cross-entropy (None: default)."""
        return None

    def router_logits(self, calls: list[torch.Tensor], batch: dict) -> torch.Tensor | None:
        """One MoE layer's router logits for the whole batch, `(B*T, E)`, from the calls its router got in one
        forward, when this strategy runs a layer more than once (TokenTune: every row without autograd, then the
        selected rows with it); None: not this strategy's doing."""
        return None

    def after_backward(self, step: int) -> None:
        """Called after the backward of each optimizer step's last micro-batch, before clipping."""

    def outside_grads(self) -> list[torch.Tensor]:
        """Gradients of this step that no optimizer parameter holds (e.g. MEFT's host key/value rows), read after
        `after_backward`: they count in the global `grad_norm` and `train.max_grad_norm` scales them in place."""
        return []

    def after_optimizer_step(self, step: int) -> None:
        """Called after `optimizer.step()`."""

    def metrics(self) -> dict[str, Any]:
        """Extra values for the logged lines of `metrics.jsonl` (and the last ones for `summary.json`)."""
        return {}

    def grad_tokens(self, batch: dict) -> int | None:
        """How many of `batch`'s tokens carry gradients, when this strategy chooses them (None: all of them)."""
        return None

    depth_uniform: bool = True
    """`memft profile` may fit this strategy on twins one layer apart and scale by depth (False: its cost per layer
    depends on the depth, as with LCSB's groups or RevFFN's reversible stack; see `depth_block`)."""

    def depth_block(self, layers: int) -> int | None:
        """For `memft profile`: its activation costs repeat in blocks of this many layers of a `layers`-deep model,
        so twins one and two blocks deep extrapolate exactly (1: every layer alike); None: fit at full depth."""
        return 1 if self.depth_uniform else None

    def vary_for_profile(self, rng) -> None:
        """Profiler twins only (`memft profile` fits activations on small copies of the model): re-draw what sets
        `grad_tokens`, so that tokens with and without gradients can be told apart (a fixed fraction would make
        them proportional), or shrink what would not fit a twin (MEFT's width)."""

    def estimate(self, model: nn.Module, recipe: Recipe, tokens: int, device: torch.device) -> MemoryEstimate | None:
        """Memory `memft profile` cannot see in `model` (built on the meta device, this strategy applied) or in
        its saved activations, for micro-batches of `tokens` tokens on `device` (the profiled one): e.g.
        host-memory state."""
        return None

    def tensor_state(self) -> dict[str, torch.Tensor]:
        """Tensors to checkpoint that live outside the model's trainable parameters (e.g. MEFT's host adapter)."""
        return {}

    def load_tensor_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what `tensor_state` returned."""

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state to put in checkpoints (e.g. a schedule position)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""


_REGISTRY: dict[str, type[Strategy]] = {}


def load_kwargs(strategies: list[Strategy], recipe: Recipe) -> dict[str, Any]:
    """What the strategies ask of model loading, merged (e.g. QLoRA's 4-bit `quantization_config`)."""
    merged: dict[str, Any] = {}
    for s in strategies:
        merged.update(s.load_kwargs(recipe))
    return merged


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator that adds a strategy under `cls.name`; duplicate names are refused."""
    name = getattr(cls, "name", None)
    if not name or not name.isidentifier():
        raise ValueError(f"strategy {cls.__qualname__} needs a `name` that is an identifier, got {name!r}")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise KeyError(f"There is already a strategy called '{name}'; choose a unique name.")
    _REGISTRY[name] = cls
    return cls


def available() -> dict[str, type[Strategy]]:
    """All registered strategies, by name, in composition order."""
    _import_builtins()
    return dict(sorted(_REGISTRY.items(), key=lambda kv: (kv[1].order, kv[0])))


def get(name: str) -> type[Strategy]:
    _import_builtins()
    return _REGISTRY[name]


def _import_builtins() -> None:
    import memft.strategies  # noqa: F401  (registers the built-in strategies)


def check_specs(specs: list[dict], recipe: Recipe | None, lines: dict[tuple, int]) -> list[str]:
    """Validate every `{name, params}` entry and their combination; return all problems."""
    from memft.recipe import describe_errors

    known = available()
    problems: list[str] = []
    seen: dict[str, int] = {}
    instances: list[Strategy] = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict):
            continue  # the recipe schema already reported it
        name = spec.get("name")
        line = lines.get(("strategies", i, "name")) or lines.get(("strategies", i))
        at = f"  [line {line}]" if line else ""
        if not isinstance(name, str):
            continue  # not a name at all: the recipe schema already reported it
        if name not in known:
            guess = difflib.get_close_matches(str(name), list(known), n=1)
            hint = f"did you mean `{guess[0]}`?" if guess else f"known: {', '.join(known)}"
            problems.append(f"`strategies.{i}.name`: unknown strategy {name!r}; {hint}{at}")
            continue
        if name in seen:
            problems.append(f"`strategies.{i}.name`: `{name}` is listed twice (also at `strategies.{seen[name]}`){at}")
            continue
        seen[name] = i
        cls = known[name]
        try:
            params = cls.Params.model_validate(spec.get("params") or {})
        except ValidationError as exc:
            problems += describe_errors(exc, lines, prefix=("strategies", i, "params"), owner=cls.Params)
            continue
        instances.append(cls(params))
    reported: set[frozenset] = set()
    for s in instances:  # a conflict declared by either side, whatever the list order, reported once
        for other in instances:
            why = s.conflicts.get(other.name)
            pair = frozenset((s.name, other.name))
            if why and pair not in reported:
                reported.add(pair)
                problems.append(f"`strategies`: `{s.name}` and `{other.name}` cannot be combined: {why}")
    if len(instances) == len(specs) and not any(s.trains_base or s.adds_trainable for s in instances):
        problems.append(
            "`strategies`: nothing would train; add one of `full`, `lora` or `qlora` "
            "(the others change how gradients are computed, not which weights learn)"
        )
    if recipe is not None:
        for s in instances:
            problems += [f"`strategies` ({s.name}): {p}" for p in s.check(recipe)]
            if recipe.train.optimizer_in_backward and s.step_in_backward:
                problems.append(f"`strategies` ({s.name}): `train.optimizer_in_backward` cannot be used with "
                                f"`{s.name}`: {s.step_in_backward}; set `train.optimizer_in_backward: false`")
    return problems


def compose(recipe: Recipe) -> list[Strategy]:
    """Instances of the recipe's strategies, validated, in composition order."""
    known = available()
    out = [known[s.name](known[s.name].Params.model_validate(s.params)) for s in recipe.strategies]
    return sorted(out, key=lambda s: s.order)
