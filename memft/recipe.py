"""The recipe: one YAML file that says what to fine-tune, on what, how, and where to write it.

`load(path, overrides)` returns a validated `Recipe` or raises `RecipeError` listing every problem
at once, each with its field path, the bad value, what was expected, the YAML line and, for unknown
keys, a "did you mean". Strategy params are validated by each strategy's own params model
(see `memft.registry`), so `strategies.0.params.r` errors point into the LoRA schema.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from memft.errors import RecipeError
from memft.textio import read_text

SEED_LIMIT = 2**32
"""Seeds must be below numpy's limit (`np.random.seed` takes 0 <= seed < 2**32)."""


class Section(BaseModel):
    """Base for every recipe block: unknown keys are errors, field docstrings are the help text."""

    # allow_inf_nan=False: `.inf` and `.nan` are YAML floats, but no recipe number may be one
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True,
                              allow_inf_nan=False)


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


class UpcycleConfig(Section):
    experts: int = Field(ge=2)
    """Experts per layer; each starts as an exact copy of the layer's dense FFN."""
    top_k: int = Field(default=2, ge=1)
    """Experts each token is routed to (at most `experts`)."""
    router_std: float = Field(default=0.02, ge=0)
    """Std of the new routers' normal(0, std) init, drawn from a generator seeded with `model.seed`. The output
    does not depend on it at initialisation (the experts are identical); it sets how uneven the first routing is."""

    @model_validator(mode="after")
    def _top_k_within_experts(self) -> UpcycleConfig:
        if self.top_k > self.experts:
            raise ValueError(
                f"`top_k` ({self.top_k}) cannot exceed `experts` ({self.experts}): each token is routed to "
                "`top_k` of the experts; lower `top_k` or raise `experts`"
            )
        return self


Dtype = Literal["float32", "bfloat16", "float16", "float64"]
Device = Literal["auto", "cpu", "cuda"]


class ModelConfig(Section):
    name: str = "stories260K"
    """What to fine-tune: a built-in name from `configs/` (`memft recipes` lists them; e.g. `stories260K`,
    `tiny-llama`, `tiny-mixtral`), a local directory with config.json and weights, or a Hugging Face hub id."""
    task: Literal["causal_lm", "sequence_classification"] = "causal_lm"
    """`causal_lm` trains next-token prediction; `sequence_classification` puts a classification head on the model."""
    num_labels: int | None = Field(default=None, ge=2)
    """Classes for `sequence_classification`; by default inferred from the data's labels."""
    dtype: Dtype = "float32"
    """Weight dtype. float64 is for exactness tests; on a GPU float32 weights train under bf16 autocast."""
    device: Device = "auto"
    """`auto` picks CUDA when a GPU is present, else the CPU."""
    seed: int = Field(default=0, ge=0, lt=SEED_LIMIT)
    """Seed for randomly initialised built-in models and new heads (0 <= seed < 2**32)."""
    tokenizer: str | None = None
    """Tokenizer to use instead of the model's own (a built-in name, local directory or hub id)."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] = "sdpa"
    """Attention kernel: `sdpa` (PyTorch scaled-dot-product attention) or `eager` (plain matmuls); on CUDA also
    `flash_attention_2` (needs the `flash-attn` package) and `flex_attention` (PyTorch's; its backward runs on CUDA
    only)."""
    config_overrides: dict[str, Any] = Field(default_factory=dict)
    """Config values to change before building the model, e.g. `{num_hidden_layers: 8}` (random-init built-ins only)."""
    trust_remote_code: bool = False
    """Run model code shipped with a hub repository. Off by default: only enable it for code you trust."""
    upcycle: UpcycleConfig | None = None
    """Sparse upcycling, e.g. `{experts: 4, top_k: 2}` (also `router_std`, default 0.02): turn a dense Llama-family
    causal LM into a Mixtral MoE whose experts are copies of each layer's FFN, with new seeded routers. It computes
    the dense model's function at initialisation. null: no upcycling."""

    _name_not_blank = field_validator("name")(_not_blank)

    @field_validator("attn_implementation")
    @classmethod
    def _kernel_installed(cls, value: str) -> str:
        import importlib.util

        if value == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise ValueError("`flash_attention_2` needs the `flash-attn` package (CUDA only: `pip install flash-attn "
                             "--no-build-isolation`), which is not installed; use `sdpa`, PyTorch's own fused kernel")
        return value

    @model_validator(mode="after")
    def _upcycle_needs_a_causal_lm(self) -> ModelConfig:
        if self.upcycle is not None and self.task != "causal_lm":
            raise ValueError(
                f"`model.upcycle` works with `model.task: causal_lm` only (got `{self.task}`): it upcycles a dense "
                "causal LM into a Mixtral causal LM; drop `model.upcycle` or use `task: causal_lm`"
            )
        return self


class DataConfig(Section):
    source: str = "recipes/data/gsm8k_sample.jsonl"
    """A local file (.jsonl, .json, .csv, .tsv, .parquet, or .txt for `format: text`) or a Hugging Face `datasets`
    name. Relative paths are resolved from the working directory, then from the recipe's folder, then from the
    project root."""
    config_name: str | None = None
    """Dataset configuration for hub datasets (e.g. `sst2` for `glue`)."""
    split: str = "train"
    """Split to train on (hub datasets)."""
    format: Literal["text", "instruction", "classification", "chat"] = "text"
    """`text`: plain causal LM on `text_field`. `instruction`: prompt + response with the loss on the
    response only. `classification`: a text (or a pair) and a label. `chat`: conversations (OpenAI `messages` or
    ShareGPT `conversations`) rendered with a chat template, the loss on the turns `train_on` names."""
    text_field: str = "text"
    """Column with the text (`text` and `classification` formats). For header-less TSVs use the column
    number, e.g. `"3"` for CoLA's sentence."""
    text_pair_field: str | None = None
    """Second text column for pair classification (e.g. MNLI's hypothesis)."""
    label_field: str = "label"
    """Column with the class label (`classification`); integers or strings."""
    prompt_field: str | None = None
    """Column with the prompt (`instruction`). By default detected: `instruction` (Alpaca), `prompt` or `question`."""
    input_field: str | None = None
    """Optional column with extra input appended to the prompt (Alpaca's `input`). Detected when absent."""
    response_field: str | None = None
    """Column with the response (`instruction`). By default detected: `output` (Alpaca), `response` or `answer`."""
    template: str = "alpaca"
    """Prompt template for `instruction`: `alpaca`, `plain`, or a string with `{prompt}` and optionally `{input}`."""
    messages_field: str | None = None
    """Column with the conversations (`chat`): a list of messages, each `{role, content}` (OpenAI; roles system,
    user, assistant, tool) or `{from, value}` (ShareGPT; human, gpt, system, tool/function/observation). By default
    detected: `messages`, then `conversations`."""
    system: str | None = None
    """System prompt put first in every conversation that has no system turn (`chat`); null: none is added (a
    template may still add its own default)."""
    chat_template: str | None = None
    """How conversations become text (`chat`): null uses the tokenizer's own chat template; `chatml` is memft's
    built-in ChatML (`<|im_start|>role\ncontent<|im_end|>\n`); any other value is a Jinja template string, as
    `tokenizer.chat_template` holds one. The template used is set on the run's tokenizer."""
    train_on: Literal["assistant", "last", "all"] = "assistant"
    """Which tokens of a conversation get a loss (`chat`): `assistant`, every assistant turn with its end-of-turn
    marker; `last`, the last assistant turn only; `all`, every token (system, user and tool turns and headers too)."""
    txt_split: Literal["paragraph", "line"] = "paragraph"
    """How a `.txt` source becomes examples (`format: text`): `paragraph`, one per block of lines between blank
    lines (the lines joined by newlines); `line`, one per non-blank line."""
    header: Literal["auto", "yes", "no"] = "auto"
    """Whether a CSV/TSV file has a header row. `auto` treats the first row as a header unless it looks like data."""
    max_length: int = Field(default=256, ge=8)
    """Tokens per example after truncation (BOS and EOS included)."""
    truncation: Literal["right", "left"] = "right"
    """Which end to cut when an example is longer than `max_length`."""
    pack: bool | Literal["stream"] = False
    """false | true (whole examples per row) | stream (`text`: cut into blocks). `true`: several whole examples per
    row of at most `max_length` tokens (`text`, `instruction`, `chat`), each attending only to itself and with no
    loss across examples, so the loss and gradients are those of the examples one by one, with less padding.
    `stream` (`text` only): concatenate the texts and cut the stream into `max_length` blocks that attend across
    documents (GPT-style pretraining; no truncation, no padding)."""
    max_samples: int | None = Field(default=None, ge=1)
    """Use only the first N examples of the source (before shuffling)."""
    shuffle: bool = True
    """Shuffle the training examples every epoch (seeded by `train.seed`)."""
    eval_split: float | str | None = 0.05
    """Held-out evaluation data: a fraction of the source (0 < x < 1, e.g. 0.05), another split name or file,
    or null."""

    _source_not_blank = field_validator("source")(_not_blank)

    @field_validator("chat_template")
    @classmethod
    def _named_or_jinja(cls, value: str | None) -> str | None:
        from memft.data.chat import check_chat_template

        if value is not None:
            check_chat_template(value)  # a ValueError with the sentence
        return value

    @model_validator(mode="after")
    def _chat_keys_need_chat(self) -> DataConfig:
        if self.format == "chat":
            return self
        # compared with the defaults, not `model_fields_set`: a run's recipe.yaml holds every field
        given = [f"`{k}`" for k in ("messages_field", "system", "chat_template") if getattr(self, k) is not None]
        given += ["`train_on`"] if self.train_on != "assistant" else []
        if given:
            raise ValueError(f"{', '.join(given)} apply{'s' if len(given) == 1 else ''} to `data.format: chat` only "
                             f"(got `format: {self.format}`); set `data.format: chat`, or remove {', '.join(given)}")
        return self

    @field_validator("pack", mode="before")
    @classmethod
    def _pack_choice(cls, value):
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.strip().lower() in ("true", "yes", "on", "1")
        if isinstance(value, bool) or value == "stream":
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError("must be true (pack whole examples), false, or stream (`text`: one stream cut into blocks)")

    @field_validator("eval_split", mode="before")
    @classmethod
    def _fraction_or_name(cls, value):
        if isinstance(value, bool):
            raise ValueError("must be a fraction between 0 and 1, a split name or file, or null")
        if isinstance(value, (int, float)) and not 0 < value < 1:  # also nan and inf
            raise ValueError("a fraction must be between 0 and 1 (exclusive), e.g. 0.05; use null for no eval data")
        if isinstance(value, str) and not value.strip():
            raise ValueError("must not be empty: give a split name or file, a fraction such as 0.05, or null")
        return value


class TrainConfig(Section):
    seed: int = Field(default=0, ge=0, lt=SEED_LIMIT)
    """Seed for data order, dropout and strategy randomness (0 <= seed < 2**32)."""
    lr: float = Field(default=2e-4, gt=0)
    """Peak learning rate."""
    weight_decay: float = Field(default=0.0, ge=0)
    """Decoupled AdamW weight decay."""
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)
    """AdamW betas, each in [0, 1)."""
    optimizer: Literal["adamw", "adamw_8bit"] = "adamw"
    """`adamw` (PyTorch, fused on CUDA) or `adamw_8bit` (bitsandbytes 8-bit states)."""
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    """Learning-rate schedule after warmup."""
    warmup_steps: int = Field(default=0, ge=0)
    """Optimizer steps of linear warmup from 0 to `lr`."""
    batch_size: int = Field(default=8, ge=1)
    """Examples per micro-batch."""
    grad_accum: int = Field(default=1, ge=1)
    """Micro-batches per optimizer step; the loss is normalised by the tokens of the whole step."""
    max_steps: int | None = Field(default=100, ge=1)
    """Optimizer steps to run. Set to null to run `epochs` instead."""
    epochs: float = Field(default=1.0, gt=0)
    """Passes over the training data, used when `max_steps` is null."""
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    """Clip the global gradient norm to this value; null disables clipping."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer in backward instead of keeping its activations (the classical baseline)."""
    router_aux_loss: Literal["auto", "on", "off"] = "auto"
    """MoE models: add the router load-balancing loss (Switch Transformer's, as transformers computes it: every MoE
    layer's real tokens together, padding excluded) times `router_aux_loss_coef` to the training loss, with every
    strategy; logged as `aux_loss`. `auto` does what transformers' own loss does: on when the model config sets
    `output_router_logits: true` (hub configs ship false; `model.config_overrides` can set it), off otherwise.
    `on` / `off`: always / never. Dense models: ignored."""
    router_aux_loss_coef: float | None = Field(default=None, ge=0)
    """Weight of the load-balancing loss; null: the model config's `router_aux_loss_coef` (Mixtral's and Qwen's
    configs: 0.001, OLMoE's: 0.01)."""
    autocast: Literal["auto", "off", "bf16", "fp16"] = "auto"
    """`auto` uses bf16 autocast on a CUDA GPU that supports it and nothing on the CPU. `fp16`: float16 autocast
    with a dynamic loss scaler (`torch.amp.GradScaler`), for GPUs without bf16; float32 weights only."""
    eval_every: int | None = Field(default=50, ge=1)
    """Evaluate the held-out loss every N optimizer steps; a fresh run also evaluates at step 0, and every run
    at its last step (null: only those)."""
    eval_batches: int | None = Field(default=20, ge=1)
    """Micro-batches of held-out data per evaluation; null: all of it."""
    precision: Literal["model", "bf16_stochastic_rounding"] = "model"
    """How weights are updated. `model`: in `model.dtype`, as the optimizer does (a bf16 weight loses every update
    smaller than half its rounding step). `bf16_stochastic_rounding`: bf16 weights (needs `model.dtype: bfloat16`)
    updated by AdamW in float32, the results (weight and bf16 moments) rounded up or down at random in proportion
    to their distance to each neighbour, so small updates survive on average (unbiased). Needs `optimizer: adamw`."""
    optimizer_state: Literal["device", "host"] = "device"
    """Where AdamW keeps its state. `host`: float32 master weights and both moments in host memory, stepped there by
    torch's fused CPU AdamW; the device holds only the weights in `model.dtype` and their gradients (a bf16 model
    then trains with float32 updates; with `optimizer_in_backward`, one layer's gradients). Needs `optimizer: adamw`
    and `precision: model`."""
    optimizer_in_backward: bool = False
    """Update each parameter the moment backward completes its gradient, and free the gradient at once, so the
    model's gradients never exist together (`adamw` or `adamw_8bit`, the same updates). Needs `grad_accum: 1` and
    `max_grad_norm: null`: both need every gradient before the first update."""

    @field_validator("router_aux_loss", mode="before")
    @classmethod
    def _yaml_switch(cls, value):
        return {True: "on", False: "off"}[value] if isinstance(value, bool) else value  # YAML 1.1 reads `on` as true

    @model_validator(mode="after")
    def _step_in_backward_needs_one_pass(self) -> TrainConfig:
        if not self.optimizer_in_backward:
            return self
        if self.autocast == "fp16":
            raise ValueError(
                "`autocast: fp16` scales the loss and must unscale every gradient, and skip the step when one "
                "overflowed, before any update; `optimizer_in_backward: true` updates each weight during backward. "
                "Use `train.autocast: bf16` (no scaler), or `train.optimizer_in_backward: false`")
        if self.grad_accum > 1:
            raise ValueError(
                "`optimizer_in_backward: true` updates each weight during the micro-batch's backward, so gradients "
                f"cannot accumulate over `grad_accum: {self.grad_accum}` micro-batches; set `train.grad_accum: 1` "
                "(and raise `train.batch_size`), or `train.optimizer_in_backward: false`")
        if self.max_grad_norm is not None:
            raise ValueError(
                "`optimizer_in_backward: true` updates each weight before the global gradient norm is known, so "
                f"clipping to `max_grad_norm: {self.max_grad_norm}` cannot apply; set `train.max_grad_norm: null` "
                "(the norm is still logged as `grad_norm`), or `train.optimizer_in_backward: false`")
        return self


class OutputConfig(Section):
    dir: str = "runs/{recipe}"
    """Run directory. `{recipe}` is replaced by the recipe file's stem."""
    checkpoints: bool = True
    """Write checkpoints. `false` is for benchmarks and throw-away runs: nothing to resume from."""
    save_every: int | None = Field(default=50, ge=1)
    """Write a checkpoint every N optimizer steps (one is always written at the end); null: only at the end."""
    keep_last: int = Field(default=2, ge=1)
    """How many step checkpoints to keep."""
    resume: Literal["auto", "never"] = "auto"
    """`auto` continues from the newest complete checkpoint in `dir`; `never` refuses a directory that has one."""
    plot: bool = True
    """Write `loss_memory.png` (loss and peak memory over steps) at the end."""

    @field_validator("dir")
    @classmethod
    def _not_the_working_directory(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty (the run would write into the working directory); "
                             "e.g. `runs/{recipe}`")
        return value


class DistributedConfig(Section):
    """How several processes share the training, when torchrun starts them (`memft train RECIPE --nproc N`);
    one process ignores it. See docs/distributed.md."""

    mode: Literal["fsdp", "ddp"] = "fsdp"
    """`fsdp`: parameters, gradients and optimizer state sharded over the ranks (FSDP2's `fully_shard` per decoder
    layer), about 1/N each; `ddp`: every rank keeps whole weights and the gradients are all-reduced."""
    cpu_offload: bool = False
    """FSDP's CPU offload: sharded parameters, gradients and optimizer state live in host memory and the optimizer
    steps there; each layer's weights come to the GPU for its forward and backward only."""
    param_dtype: Literal["model", "bfloat16"] = "model"
    """The dtype FSDP gathers each layer's weights in for its forward and backward (FSDP2's mixed-precision policy):
    `model` keeps `model.dtype`; `bfloat16` computes with bfloat16 copies of float32 shards, which halves the gathered
    weights and their traffic, while the shards, their gradients (reduced over the ranks in float32) and the
    optimizer stay in `model.dtype`."""
    reshard_after_forward: bool = True
    """Free each layer's gathered weights after its forward and gather them again for backward (less memory, one
    more all-gather per layer); false keeps them from forward to backward."""
    load_on_rank0: bool = True
    """Rank 0 alone reads the weights; the other ranks build the model on the meta device (no storage) and receive
    their shards from rank 0, so a node's host memory holds the model once, not once per rank. QLoRA (bitsandbytes
    quantizes as it loads), `model.upcycle` and CPU offload on GPUs load on every rank instead."""
    timeout_s: int = Field(default=600, ge=10)
    """How long a collective may wait for the other ranks before the job stops with an error (a rank that died
    or hangs), instead of waiting forever."""


class WandbConfig(Section):
    project: str = "memft"
    """The Weights & Biases project the run is logged to."""
    entity: str | None = None
    """The team or user that owns the project (default: your W&B default entity)."""
    name: str | None = None
    """The run's display name (default: the run directory's name)."""
    tags: list[str] = Field(default_factory=list)
    """Tags on the W&B run."""
    mode: Literal["online", "offline", "disabled"] = "online"
    """`offline` writes the run under `<run dir>/wandb/` for `wandb sync` later (no network needed)."""


class SamplesConfig(Section):
    prompts: list[str] = Field(min_length=1)
    """Prompts the model answers at every evaluation (rendered as the run's examples are: a chat turn, an
    instruction, or the start of a text); the replies go to `samples.jsonl` and the trackers."""
    max_new_tokens: int = Field(default=64, ge=1)
    """At most this many new tokens per reply."""
    temperature: float = Field(default=0.0, ge=0)
    """0: greedy, so the replies change only with the model. Above 0 the sampling is seeded with `train.seed` and
    draws from its own generator, so training's randomness is the same with or without samples."""


class LogConfig(Section):
    every: int = Field(default=1, ge=1)
    """Write a line to metrics.jsonl every N optimizer steps."""
    progress: bool = True
    """Show a progress bar (turned off automatically when the output is not a terminal)."""
    tensorboard: bool = False
    """Also write the metrics.jsonl numbers as TensorBoard scalars under `<run dir>/tensorboard/` (needs the
    `tensorboard` package: `pip install memft[tensorboard]`); a resumed run continues the same event files."""
    wandb: WandbConfig | None = None
    """Also log the metrics.jsonl numbers to Weights & Biases (`{project: NAME}`, or `true` for the defaults; needs
    the `wandb` package: `pip install memft[wandb]`); a resumed run continues the same W&B run."""

    samples: SamplesConfig | None = None
    """Generate replies to a few prompts at each evaluation (`{prompts: [...]}`; causal LM runs), written to
    `samples.jsonl` and to the trackers."""

    @field_validator("wandb", mode="before")
    @classmethod
    def _true_means_defaults(cls, value):
        return {} if value is True else None if value is False else value


class MMLUEvalConfig(Section):
    data: str = "hub"
    """A folder with the original per-subject CSVs (`<dir>/<split>/<subject>_<split>.csv`), or `hub` (cais/mmlu)."""
    split: str = "test"
    """The split scored (`test` or `val`); the few-shot examples come from `dev`."""
    shots: int = Field(default=5, ge=0, le=5)
    """Few-shot examples before each question."""
    subjects: list[str] | None = None
    """Subjects to score (default: all 57)."""
    limit: int | None = Field(default=None, ge=1)
    """Only the first N questions of each subject."""
    batch_size: int = Field(default=16, ge=1)
    """Sequences per forward pass."""


class GLUEEvalConfig(Section):
    task: Literal["sst2", "cola", "mrpc", "rte", "qnli", "qqp", "mnli", "wnli", "stsb"]
    """The GLUE task whose validation metric is reported."""
    data: str = "hub"
    """A folder in the original GLUE layout (`<dir>/SST-2/dev.tsv`, ...), or `hub` (nyu-mll/glue)."""
    limit: int | None = Field(default=None, ge=1)
    """Only the first N validation examples."""
    batch_size: int = Field(default=32, ge=1)
    """Examples per forward pass."""


class EvalConfig(Section):
    mmlu: MMLUEvalConfig | None = None
    """MMLU few-shot, scored as lm-evaluation-harness scores it (see `memft eval mmlu`)."""
    glue: list[GLUEEvalConfig] = Field(default_factory=list)
    """GLUE tasks (see `memft eval glue`): a classifier's metric, or the prompted form for a causal LM."""


class StrategySpec(Section):
    name: str
    """Registered strategy name: `full`, `lora`, `qlora` (and the later methods: see `memft recipes`)."""
    params: dict[str, Any] = Field(default_factory=dict)
    """The strategy's own settings, validated by its params model (`memft schema` lists them)."""


class Recipe(Section):
    description: str = ""
    """One line shown by `memft recipes`."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    strategies: list[StrategySpec] = Field(default_factory=lambda: [StrategySpec(name="full")])
    """Ordered list of memory-saving strategies; memft applies them in its fixed composition order."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    eval: EvalConfig | None = None
    """Benchmarks scored on the trained model at the end of the run, e.g. `{mmlu: {shots: 5}}`; the scores go to
    summary.json under `eval`, each full report to `eval_<name>.json` in the run directory."""

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Recipe:
        if self.data.format == "classification" and self.model.task != "sequence_classification":
            raise ValueError(
                "`data.format: classification` needs `model.task: sequence_classification`; "
                "set `model.task: sequence_classification`"
            )
        if self.model.task == "sequence_classification" and self.data.format != "classification":
            raise ValueError(
                "`model.task: sequence_classification` needs `data.format: classification` "
                f"(got `{self.data.format}`)"
            )
        if self.data.pack == "stream" and self.data.format != "text":
            raise ValueError(f"`data.pack: stream` works with `data.format: text` only (got `{self.data.format}`); "
                             "use `data.pack: true` to pack whole examples")
        if self.data.pack is True and self.data.format == "classification":
            raise ValueError("`data.pack: true` packs causal examples (`text`, `instruction`, `chat`); a classifier "
                             "reads one example per row: set `data.pack: false`")
        if self.train.optimizer_state == "host":
            clash = [f"`train.{k}: {v}`" for k, v, ok in (
                ("optimizer", self.train.optimizer, "adamw"), ("precision", self.train.precision, "model")) if v != ok]
            if clash:
                raise ValueError(
                    f"`train.optimizer_state: host` steps float32 master weights with torch's AdamW on the host, "
                    f"which {' and '.join(clash)} would replace; use `optimizer: adamw` and `precision: model` "
                    "with it, or `train.optimizer_state: device`")
        if self.train.autocast == "fp16":
            if self.model.dtype != "float32":
                raise ValueError(
                    f"`train.autocast: fp16` computes in float16 over float32 weights, whose gradients the loss "
                    f"scaler unscales; `model.dtype` is `{self.model.dtype}`: set `model.dtype: float32`, or "
                    "`train.autocast: off`")
            if self.train.optimizer_state == "host":
                raise ValueError(
                    "`train.autocast: fp16` with `train.optimizer_state: host`: the loss scaler unscales the gradients "
                    "of the optimizer's parameters, and the host optimizer's are its float32 masters, which get theirs "
                    "only inside its step; use `train.autocast: bf16`, or `train.optimizer_state: device`")
            if any(s.name == "meft" for s in self.strategies):
                raise ValueError(
                    "`train.autocast: fp16` with `meft`: MEFT's host adapter steps its own AdamW from its gradients, "
                    "which the loss scaler would leave scaled; use `train.autocast: bf16` or `off` with `meft`")
        if self.train.precision == "bf16_stochastic_rounding":
            if self.model.dtype != "bfloat16":
                raise ValueError(
                    "`train.precision: bf16_stochastic_rounding` rounds updates into bf16 weights, but "
                    f"`model.dtype` is `{self.model.dtype}`; set `model.dtype: bfloat16`, or `train.precision: model`")
            if self.train.optimizer != "adamw":
                raise ValueError(
                    "`train.precision: bf16_stochastic_rounding` is memft's own AdamW step; bitsandbytes' 8-bit AdamW "
                    "rounds to nearest inside its kernel; set `train.optimizer: adamw`, or `train.precision: model`")
        return self


# --------------------------------------------------------------------------------------------
# loading, overrides and error reporting


def parse_override(item: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (["train", "lr"], 1e-4). The value is parsed as YAML."""
    if "=" not in item:
        raise RecipeError("overrides", [f"`{item}` is not an override; write it as `key.path=value`, e.g. `train.lr=1e-4`"])
    key, _, raw = item.partition("=")
    if not key.strip():
        raise RecipeError("overrides", [f"`{item}` has no key before `=`"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_override(tree: dict, path: list[str], value: Any) -> None:
    """Set `value` at `path` inside nested dicts/lists, creating dicts on the way (lists must exist)."""
    node: Any = tree
    for i, part in enumerate(path):
        last = i == len(path) - 1
        where = ".".join(path[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError("overrides", [f"`{'.'.join(path)}`: `{where}` is not an item of a list of {len(node)}"])
            idx = int(part)
            if last:
                node[idx] = value
            else:
                if node[idx] is None:
                    node[idx] = {}
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if not isinstance(node.get(part), (dict, list)):
                    node[part] = {}
                node = node[part]
        else:
            raise RecipeError("overrides", [f"`{'.'.join(path)}`: `{'.'.join(path[:i])}` is not a mapping"])


def _compose(text: str) -> yaml.Node | None:
    """The YAML node tree (with line marks), or None when the text does not parse (safe_load reports that)."""
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None


def _line_index(root: yaml.Node | None) -> dict[tuple, int]:
    """Map each key path of a YAML document to its 1-based line number."""
    lines: dict[tuple, int] = {}

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                p = path + (key_node.value,)
                lines[p] = key_node.start_mark.line + 1
                walk(value_node, p)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                p = path + (i,)
                lines[p] = item.start_mark.line + 1
                walk(item, p)

    walk(root, ())
    return lines


def _duplicate_keys(root: yaml.Node | None) -> list[str]:
    """A problem for each key given twice in one mapping, at any depth: YAML keeps the last silently."""
    problems: list[str] = []

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            first_line: dict[str, int] = {}
            for key_node, value_node in node.value:
                key, line = key_node.value, key_node.start_mark.line + 1
                if isinstance(key_node, yaml.ScalarNode) and key != "<<":  # `<<` merges are meant to repeat
                    where = ".".join(map(str, path + (key,)))
                    if key in first_line:
                        problems.append(f"`{where}`: key given twice, at lines {first_line[key]} and {line}; "
                                        "the second would silently replace the first: keep one")
                    else:
                        first_line[key] = line
                walk(value_node, path + (key,))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, path + (i,))

    walk(root, ())
    return problems


def _section(annotation) -> type[BaseModel] | None:
    """The pydantic model of a nested section, also when it is optional (`X | None`)."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _model_for(path: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the field at `path` (for 'did you mean')."""
    model: type[BaseModel] | None = Recipe
    for part in path:
        if model is None or isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        if part == "strategies":
            model = StrategySpec
        elif section := _section(field.annotation):
            model = section
        else:
            return None
    return model


def describe_errors(exc: ValidationError, lines: dict[tuple, int], prefix: tuple = (),
                    owner: type[BaseModel] | None = None) -> list[str]:
    """Turn pydantic errors into one sentence each: path, bad value, expectation, line, suggestion."""
    out = []
    for err in exc.errors():
        loc = prefix + tuple(err["loc"])
        loc = tuple(p for p in loc if not (isinstance(p, str) and p.startswith("function-after")))
        path = ".".join(str(p) for p in loc) or "(recipe)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            parent = owner if owner is not None and loc[:-1] == prefix else _model_for(loc[:-1])
            known = list(parent.model_fields) if parent else []
            guess = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f"; did you mean `{guess[0]}`?" if guess else (f"; known keys: {', '.join(known)}" if known else "")
            text = f"`{path}`: unknown key{hint}"
        elif err["type"] in ("missing",):
            text = f"`{path}`: required but missing"
        else:
            value = err.get("input")
            shown = "" if isinstance(value, dict) or loc == () else f" (got {value!r})"
            text = f"`{path}`: {msg}{shown}"
        line = _nearest_line(lines, loc)
        out.append(f"{text}{f'  [line {line}]' if line else ''}")
    return out


def _nearest_line(lines: dict[tuple, int], loc: tuple) -> int | None:
    for n in range(len(loc), 0, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None


def resolve_recipe_path(path: str | Path) -> Path:
    """A recipe path as given, or the name of a built-in recipe in `recipes/` (with or without .yaml)."""
    p = Path(path)
    if p.is_file():
        return p
    from memft.paths import RECIPES_DIR

    for candidate in (RECIPES_DIR / p.name, RECIPES_DIR / f"{p.name}.yaml"):
        if candidate.is_file():
            return candidate
    raise RecipeError(str(path), ["no such recipe file; `memft recipes` lists the built-in ones"])


EMPTY_RECIPE = ("the recipe is empty (no keys, only comments or `null`); a recipe says at least which `model` to "
                "train on which `data` with which `strategies`, e.g. `model: {name: stories260K}`; "
                "`memft recipes` lists complete examples")


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe, including each strategy's params.

    Raises:
        RecipeError: with every problem found (YAML syntax, unknown keys, bad values, unknown or
            incompatible strategies).
    """
    file = resolve_recipe_path(path)
    text = read_text(file, what="recipe")
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(str(file), [f"not valid YAML{where}: {getattr(exc, 'problem', exc)}"]) from None
    if tree is None:  # an empty file, only comments, or `null`
        tree = {}
    if not isinstance(tree, dict):
        raise RecipeError(str(file), ["the recipe must be a mapping with keys such as `model`, `data`, `strategies`, `train`"])
    root = _compose(text)
    if duplicates := _duplicate_keys(root):
        raise RecipeError(str(file), duplicates)
    for item in overrides:
        apply_override(tree, *parse_override(item))
    if not tree:
        raise RecipeError(str(file), [EMPTY_RECIPE])
    return validate(tree, source=str(file), lines=_line_index(root), recipe_path=file)



def validate(tree: dict, source: str = "recipe", lines: dict[tuple, int] | None = None,
             recipe_path: Path | None = None) -> Recipe:
    """Validate a recipe given as a dict (see `load`)."""
    from memft import registry

    lines = lines or {}
    problems: list[str] = []
    recipe = None
    try:
        recipe = Recipe.model_validate(tree)
    except ValidationError as exc:
        problems += describe_errors(exc, lines)
    specs = tree.get("strategies") if isinstance(tree.get("strategies"), list) else None
    if recipe is not None:
        specs = [s.model_dump() for s in recipe.strategies]
    if specs is not None:
        problems += registry.check_specs(specs, recipe, lines)
    if recipe is not None and not problems:
        problems += _check_files(recipe, recipe_path, lines)
        problems += _check_packages(recipe, lines)
    if problems:
        raise RecipeError(source, problems)
    assert recipe is not None
    if recipe_path is not None:
        recipe.output.dir = recipe.output.dir.replace("{recipe}", recipe_path.stem)
        _resolve_data_path(recipe, recipe_path)
    return recipe


def _looks_like_path(s: str) -> bool:
    return s.startswith((".", "/", "~")) or Path(s).suffix.lower() in {".jsonl", ".json", ".csv", ".tsv", ".parquet",
                                                                        ".txt"}


def _resolve_data_path(recipe: Recipe, recipe_path: Path) -> None:
    src = recipe.data.source
    if _looks_like_path(src) and not Path(src).expanduser().exists():
        beside = recipe_path.parent / src
        from memft.paths import PROJECT_ROOT

        for cand in (beside, PROJECT_ROOT / src):
            if cand.exists():
                recipe.data.source = str(cand)
                return


def _check_files(recipe: Recipe, recipe_path: Path | None, lines) -> list[str]:
    """Missing local files are user errors found at validate time."""
    problems = []

    def problem(field: tuple, text: str) -> None:
        line = lines.get(field)
        problems.append(f"`{'.'.join(field)}`: {text}{f'  [line {line}]' if line else ''}")

    src = recipe.data.source
    if _looks_like_path(src):
        if recipe_path is not None:
            _resolve_data_path(recipe, recipe_path)
        found = Path(recipe.data.source).expanduser()
        if not found.exists():
            problem(("data", "source"), f"file not found (got {src!r})")
        elif found.is_dir():
            problem(("data", "source"), f"is a directory, not a data file (got {src!r}); name one "
                                        ".jsonl, .json, .csv, .tsv, .parquet or .txt file in it")
    if why := _model_path_problem(recipe.model.name):
        problem(("model", "name"), f"{why} (got {recipe.model.name!r})")
    return problems


def _check_packages(recipe: Recipe, lines) -> list[str]:
    """Optional packages the recipe asks for (the trackers), found at validate time."""
    import importlib.util

    problems = []
    for field, package, on in (("tensorboard", "tensorboard", recipe.log.tensorboard),
                               ("wandb", "wandb", recipe.log.wandb is not None
                                and recipe.log.wandb.mode != "disabled")):
        if on and importlib.util.find_spec(package) is None:
            line = lines.get(("log", field))
            problems.append(f"`log.{field}` needs the `{package}` package, which is not installed: "
                            f"`pip install {package}` (or `pip install memft[{package}]`), or turn `log.{field}` off"
                            + (f"  [line {line}]" if line else ""))
    return problems


def _model_path_problem(name: str) -> str | None:
    """Why a `model.name` meant as a local path (see `memft.models.load`) cannot be loaded, or None."""
    from memft.models.builtin import find_builtin, looks_like_model_path

    if not looks_like_model_path(name) or find_builtin(name) is not None:
        return None
    path = Path(name).expanduser()
    if not path.exists():
        return ("no such local model: a local model is a directory with config.json and weights, or a config "
                ".json file (a hub id is `name` or `org/name`; `memft recipes` lists the built-ins)")
    if path.is_dir() and not (path / "config.json").is_file():
        return "the directory has no config.json, so it is not a model directory (a Hugging Face save_pretrained folder)"
    if not path.is_dir():
        return "is a file but not a config .json; give a model directory or a config .json file"
    return None


def schema_rows(model: type[BaseModel] = Recipe, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(path, type, default, help) for every recipe field, sections expanded, for `memft schema`."""
    rows = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        ann = field.annotation
        section = _section(ann)
        if section is not None and section is not StrategySpec:
            if section is not ann:  # an optional section: say so, then its fields
                rows.append((path, "section or null", "null", (field.description or "").strip()))
            rows += schema_rows(section, path + ".")
            continue
        if name == "strategies":
            rows.append((path, "list[{name, params}]", "[{name: full}]", field.description or ""))
            rows += schema_rows(StrategySpec, path + ".N.")
            continue
        default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
        type_name = getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
        rows.append((path, type_name if type_name != "Literal" else str(ann).replace("typing.", ""),
                     "null" if default == "None" else default, (field.description or "").strip()))
    return rows


def defaults_yaml(model: type[BaseModel] = Recipe, indent: int = 0) -> str:
    """Every field of a recipe at its default, as YAML with each field's first clause of help as a comment: what a
    missing block or key means (`memft schema --yaml`; docs/recipes.md §1 is this text)."""
    import json
    import re

    lines, pad = [], "  " * indent
    for name, field in model.model_fields.items():
        section = _section(field.annotation)
        help_text = " ".join((field.description or "").split())
        short = re.split(r"(?<!e\.g)(?<!i\.e)\. ", help_text, maxsplit=1)[0].rstrip(".")
        choices = get_args(field.annotation) if getattr(field.annotation, "__origin__", None) is Literal else ()
        if choices:  # the choices say it best; the help is in `memft schema`
            short = " | ".join(map(str, choices))
        short = short if len(short) <= 80 else short[:79].rsplit(" ", 1)[0] + " ..."
        if section is not None and section is not StrategySpec and section is field.annotation:
            lines.append(f"{pad}{name}:")
            lines.append(defaults_yaml(section, indent + 1))
            continue
        if name == "strategies":
            value = "[{name: full}]"
        elif field.is_required():
            value = "REQUIRED"
        else:
            default = field.get_default(call_default_factory=True)
            value = json.dumps(default.model_dump(mode="json") if isinstance(default, BaseModel) else default)
            value = "null" if value == "null" else value.replace('"', "") if isinstance(default, str) and \
                re.fullmatch(r"[\w./{}-]+", default) else value
        key = f"{pad}{name}: {value}"
        lines.append(f"{key:<34} # {short}" if short else key)
    return "\n".join(lines)
