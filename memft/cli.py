"""The `memft` command line. Thin: parse, call one function, turn known errors into exit codes.

Exit codes: 0 success, 1 a run that failed (or an internal error), 2 bad input (a user mistake).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from memft.errors import RunFailed, UserError
from memft.recipe import Device, Dtype

app = typer.Typer(
    name="memft",
    help="Fine-tune dense and Mixture-of-Experts language models with less memory than plain backprop.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
console = Console()
err_console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        from memft import __version__

        console.print(f"memft {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print memft's version and exit.")] = False) -> None:
    """Fine-tune dense and Mixture-of-Experts language models with less memory than plain backprop."""

RecipeArg = Annotated[str, typer.Argument(help="Recipe YAML file, or the name of a built-in recipe (`memft recipes`).")]
OverridesArg = Annotated[Optional[list[str]], typer.Argument(
    help="Overrides as dotted `key=value` pairs, values parsed as YAML: `train.lr=1e-4 strategies.0.params.r=16`.",
    show_default=False)]


def _other_rank() -> bool:
    """A torchrun job's rank other than 0 (torchrun sets RANK)."""
    return os.environ.get("RANK", "0") != "0"


def handle_errors(fn):
    """User mistakes -> one clear message and exit 2; a failed run -> message and exit 1. In a torchrun job the
    other ranks leave the messages every rank has (a recipe mistake, an interrupt) to rank 0 and prefix their own
    failures with their rank."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        err_console.quiet = False
        rank = f"rank {os.environ['RANK']}: " if _other_rank() else ""
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            err_console.quiet = bool(rank)
            err_console.print(f"error: {exc}", highlight=False, markup=False, style="red")
            raise typer.Exit(code=2) from None
        except RunFailed as exc:
            err_console.print(f"{rank}run failed: {exc}", highlight=False, markup=False, style="red")
            raise typer.Exit(code=1) from None
        except KeyboardInterrupt as exc:
            # a training run says where it stopped and what it saved (memft.train.loop.RunInterrupted)
            err_console.quiet = bool(rank)
            message = str(exc) or "interrupted (SIGINT) before finishing"
            err_console.print(message, highlight=False, markup=False, soft_wrap=True)
            raise typer.Exit(code=getattr(exc, "exit_code", 130)) from None
        except OSError as exc:
            # the environment (a permission, a full disk), not an internal error: no traceback
            where = f"{exc.filename}: " if exc.filename is not None else ""
            err_console.print(f"error: {where}{exc.strerror or exc}", highlight=False, markup=False, style="red",
                              soft_wrap=True)
            raise typer.Exit(code=2) from None

    return wrapper


@app.command()
@handle_errors
def train(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved recipe and the plan; do not train.")] = False,
    output_dir: Annotated[Optional[str], typer.Option("--output-dir", "-o", help="Run directory (overrides `output.dir`).")] = None,
    nproc: Annotated[Optional[int], typer.Option("--nproc", min=1, help="Train in this many processes on this "
                                                 "machine, one per GPU (re-launches under torchrun; see "
                                                 "`distributed:` in the recipe).")] = None,
) -> None:
    """Fine-tune a model as a recipe says.

    Examples:

      memft train recipes/quickstart.yaml

      memft train recipes/lora.yaml train.lr=1e-4 strategies.0.params.r=16

      memft train recipes/qlora.yaml --dry-run

      memft train recipes/lora.yaml --nproc 4
    """
    from memft import recipe as recipe_mod
    from memft.train import distributed

    r = recipe_mod.load(recipe, overrides or [])
    if nproc is not None and not distributed.launched() and not dry_run:
        from memft.train.launch import launch

        distributed.check(r, nproc)
        raise typer.Exit(code=launch(nproc, ["train", recipe, *(overrides or []),
                                             *(["--output-dir", output_dir] if output_dir else [])], r))
    from memft.train.loop import RunInterrupted, Trainer

    trainer = Trainer(r, run_dir=output_dir)
    if dry_run:
        import yaml

        console.print(yaml.safe_dump(r.model_dump(mode="json"), sort_keys=False), highlight=False, markup=False)
        trainer.setup(for_training=False)
        refused = trainer.plan_resume()  # a `resume:` line in the plan; reads the run directory, changes nothing
        _print_plan(trainer)
        if refused is not None:
            raise refused
        return
    try:
        trainer.setup()
    except KeyboardInterrupt:  # Ctrl-C while loading the model: training has not started
        raise RunInterrupted.in_setup() from None
    _print_plan(trainer)
    with _Progress(enabled=r.log.progress) as progress:
        try:
            summary = trainer.train(progress=progress.update)
        except RunInterrupted as exc:
            exc.resume_command = _resume_command(recipe, overrides or [], output_dir, r.output.resume)
            raise
    _print_summary(summary, trainer.run_dir)


@app.command()
@handle_errors
def validate(recipe: RecipeArg, overrides: OverridesArg = None) -> None:
    """Check a recipe (schema, strategy params, combinations, files) without loading a model.

    Example: memft validate recipes/lora.yaml strategies.0.params.r=16
    """
    from memft import recipe as recipe_mod

    r = recipe_mod.load(recipe, overrides or [])
    names = " + ".join(s.name for s in r.strategies)
    console.print(f"ok: {recipe} is valid ({r.model.name}, {names}, {r.data.format} data)", highlight=False)


@app.command()
def recipes() -> None:
    """List the built-in recipes and models, one line each.

    Example: memft recipes
    """
    import yaml

    from memft.models.builtin import list_builtin
    from memft.paths import RECIPES_DIR
    from memft.textio import read_text

    table = Table(title="Built-in recipes (memft train recipes/NAME.yaml)", title_justify="left")
    table.add_column("recipe")
    table.add_column("what it does")
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        try:
            tree = yaml.safe_load(read_text(path, "recipe"))
            desc = str(tree.get("description", "")) if isinstance(tree, dict) else "(not a recipe)"
        except (yaml.YAMLError, UserError):
            desc = "(not valid YAML)"
        table.add_row(str(path.relative_to(RECIPES_DIR.parent)), desc)
    console.print(table)
    models = Table(title="Built-in models (model.name)", title_justify="left")
    models.add_column("name")
    models.add_column("what it is")
    for name, desc in list_builtin():
        models.add_row(name, desc)
    console.print(models)


@app.command()
def schema(as_yaml: Annotated[bool, typer.Option("--yaml", help="Every field at its default, as a recipe "
                                                              "(YAML with a comment per field).")] = False) -> None:
    """Every recipe field with its type, default and help, then each strategy's params.

    Example: memft schema | grep train.   or   memft schema --yaml > defaults.yaml
    """
    from rich.markup import escape

    from memft import registry
    from memft.recipe import defaults_yaml, schema_rows

    if as_yaml:
        print(defaults_yaml())
        return

    if not console.is_terminal:  # piped (grep, a pager, a file): one unwrapped line per field, tab-separated
        for title, rows in [("recipe", schema_rows())] + [(f"strategies: name: {name}", schema_rows(cls.Params))
                                                          for name, cls in registry.available().items()]:
            print(f"# {title}")
            for row in rows:
                print("\t".join(" ".join(cell.split()) for cell in row))
        return
    table = Table(title="Recipe fields", title_justify="left", show_lines=False)
    for col in ("field", "type", "default", "help"):
        table.add_column(col, overflow="fold")
    for row in schema_rows():
        table.add_row(*map(escape, row))
    console.print(table)
    for name, cls in registry.available().items():
        t = Table(title=f"strategies: name: {name} — {cls.summary}", title_justify="left")
        for col in ("params.", "type", "default", "help"):
            t.add_column(col, overflow="fold")
        for row in schema_rows(cls.Params):
            t.add_row(*map(escape, row))
        console.print(t)


@app.command()
@handle_errors
def bench(
    recipe: RecipeArg,
    variants: Annotated[str, typer.Option(help="Variants separated by `;`, each a comma-separated list of strategy "
                                               "names, `gradient_checkpointing`, and `key=value` overrides.")]
    = "full;lora;qlora;full,gradient_checkpointing",
    steps: Annotated[int, typer.Option(help="Optimizer steps per variant.")] = 5,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the results as JSON here.")] = None,
    evaluate: Annotated[bool, typer.Option("--eval", help="Score the recipe's held-out data at the end of each "
                                                          "variant (eval loss, accuracy).")] = False,
    overrides: OverridesArg = None,
) -> None:
    """Run variants of one recipe side by side and print ratios to the first.

    Each variant runs in its own process (so peak memory is its own) on the same model, data and batch.

    Examples:

      memft bench recipes/bench_moe.yaml --variants "full;lora;qlora;full,gradient_checkpointing"

      memft bench recipes/bench_moe.yaml --variants "lora;lora,strategies.0.params.r=64" --steps 10 --json out.json
    """
    from memft.bench import format_table, run_bench

    results = run_bench(recipe, variants, steps=steps, overrides=overrides or [], evaluate=evaluate,
                        json_out=json_out, log=lambda m: err_console.print(m, highlight=False, markup=False))
    console.print(format_table(results))


@app.command()
@handle_errors
def profile(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    gpu_memory: Annotated[Optional[str], typer.Option(help="Memory budget, e.g. 24GiB: says whether the recipe "
                                                           "fits and, if not, which changes would.")] = None,
    device: Annotated[Optional[str], typer.Option(help="Predict for this device (`cuda` or `cpu`; default: what "
                                                       "`model.device` resolves to here).")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the prediction as JSON here.")] = None,
    measure: Annotated[bool, typer.Option(help="Run two real steps of the recipe here and show predicted versus "
                                               "measured.")] = False,
    gpus: Annotated[int, typer.Option(min=1, help="Predict one GPU's memory when the recipe trains on this many "
                                                  "(`memft train --nproc N`: FSDP shards, `distributed:`).")] = 1,
) -> None:
    """Predict a recipe's peak memory from its model's config: no weights, no GPU, a few seconds.

    Weights, gradients and optimizer state are exact (the model is built on the meta device with the
    recipe's strategies); activations are fitted from real steps of small twins of the model.

    Examples:

      memft profile recipes/lora.yaml model.name=meta-llama/Meta-Llama-3-8B data.max_length=2048 --gpu-memory 24GiB

      memft profile recipes/bench_moe.yaml --measure --json profile.json

      memft profile recipes/lora.yaml model.name=Qwen/Qwen3-30B-A3B 'strategies=[{name: full}]' --device cuda --gpus 8
    """
    from memft import recipe as recipe_mod
    from memft.outputs import check_writable_file
    from memft.profile import advice, predict

    r = recipe_mod.load(recipe, overrides or [])
    budget = advice.parse_bytes(gpu_memory) if gpu_memory else None
    if measure and gpus > 1:
        raise UserError(f"`--measure` runs two steps in this one process, not in {gpus}; leave out `--measure`, or "
                        f"train with `memft train RECIPE --nproc {gpus}` and read each rank's peak in its summary.json")
    if json_out:
        check_writable_file(json_out, "`--json`")  # before the prediction, which takes seconds to minutes
    with console.status("fitting activations on small twins of the model ..."):
        p = predict.profile(r, device, gpus=gpus)
    console.print(_profile_table(p))
    if json_out:
        predict.write_json(p, json_out)
    if measure:
        with console.status("running two real steps ..."):
            measured = predict.measure(r)
        console.print(_measure_table(p, measured))
    if budget is None:
        return
    if p.peak <= budget:
        console.print(f"[green]fits[/green]: predicted peak {_fmt_bytes(p.peak)}{_per_gpu(p)} of {_fmt_bytes(budget)} "
                      f"({budget - p.peak:,} bytes to spare)", highlight=False)
        if json_out:
            predict.write_json(p, json_out, {"budget": budget, "fits": True, "advice": []})
        return
    console.print(f"[red]does not fit[/red]: predicted peak {_fmt_bytes(p.peak)}{_per_gpu(p)} > {_fmt_bytes(budget)}; "
                  "trying changes ...", highlight=False)
    load = lambda extra: recipe_mod.load(recipe, extra)  # noqa: E731
    forecast = lambda extra: predict.profile(load(extra), device, gpus=gpus)  # noqa: E731
    with console.status("profiling the alternatives ..."):
        ranked = advice.rank(r, overrides or [], budget, forecast, moe=p.moe, base=p)
    if ranked and not any(q.peak <= budget for _, q in ranked):
        with console.status("no single change fits; combining changes ..."):
            ranked = advice.combinations(load, overrides or [], budget, forecast, ranked, moe=p.moe, base=p) + ranked
    table = Table(title=f"Changes, ranked (budget {_fmt_bytes(budget)})", title_justify="left")
    for col in ("change", "predicted peak", "fits", "cost"):
        table.add_column(col, justify="right" if col == "predicted peak" else "left")
    table.add_column("overrides", overflow="fold")  # to paste as is: never cut short
    for change, q in ranked:
        cost = f"[yellow]{change.note}[/yellow]; {change.cost}" if change.note else change.cost
        table.add_row(change.label, _fmt_bytes(q.peak), "yes" if q.peak <= budget else "no", cost,
                      " ".join(change.overrides))
    console.print(table)
    if json_out:
        predict.write_json(p, json_out, {"budget": budget, "fits": False, "advice": advice.to_json(ranked, budget)})


def _per_gpu(p) -> str:
    """`' per GPU of 4 (fsdp)'` for a profile of several GPUs, else ''."""
    if p.gpus == 1:
        return ""
    unit = "GPU" if p.device.startswith("cuda") else "process"
    return f" per {unit} of {p.gpus} ({p.distributed}{', CPU offload' if p.cpu_offload else ''})"


def _profile_table(p) -> Table:
    from memft.profile.predict import RELIABLE_FIT

    sharded = p.gpus > 1
    table = Table(title=f"memft profile: {p.model} ({p.device}, {p.dtype}, micro-batch {p.batch_size} x "
                        f"{p.seq_len} tokens, {' + '.join(p.strategies)}"
                        f"{', checkpointing' if p.gradient_checkpointing else ''})"
                        + (f"\n{_per_gpu(p).strip()}" if sharded else ""), title_justify="left")
    table.add_column("what")
    table.add_column("bytes", justify="right")
    table.add_column("detail")
    share = ""
    if sharded:
        share = ("in host memory (CPU offload)" if p.cpu_offload else f"a 1/{p.gpus} shard of each (dim 0, padded)"
                 if p.distributed == "fsdp" else "whole on every GPU (ddp)")
    for i, (kind, n) in enumerate(p.weights.items()):
        counted = (sharded and i == 0) or (not sharded and (kind == "nf4" or len(p.weights) == 1))
        detail = [f"{p.params:,} parameters"] if counted else []
        if sharded and i == 0:
            detail.append(share if not p.cpu_offload else "their shards in host memory (CPU offload); here the buffers")
        table.add_row(f"weights ({kind})", _fmt_bytes(n), "; ".join(detail))
    table.add_row("gradients", _fmt_bytes(p.gradients), "; ".join(
        [f"{p.trainable_params:,} trainable parameters"]
        + (["one layer's at a time (optimizer step in backward)"] if p.optimizer_in_backward else [])
        + ([share] if sharded else [])))
    table.add_row(f"optimizer state ({p.optimizer})", _fmt_bytes(p.optimizer_state),
                  "" if not sharded or p.distributed == "ddp" else share if p.cpu_offload else "this GPU's rows")
    if sharded:
        table.add_row("gathered: root unit", _fmt_bytes(p.gathered_root),
                      "embeddings, final norm, head: whole through forward and backward")
        table.add_row("gathered: decoder layers", _fmt_bytes(p.gathered_layers),
                      "all of them (reshard_after_forward: false)" if not p.reshard_after_forward
                      else "the layer computed and the next, prefetched" if p.distributed == "fsdp"
                      else "the layer computed (copied from its whole shard)")
    table.add_row("activations", _fmt_bytes(p.activations),
                  f"{_fmt_bytes(p.per_layer)} per layer x {p.layers}, {_fmt_bytes(p.logits)} logits and loss"
                  + (f"; this GPU's micro-batch of {p.batch_size}" if sharded else ""))
    table.add_row("backward transient", _fmt_bytes(p.backward_transient + p.head_gradient + p.per_layer),
                  "the loss's gradient buffers, the head's gradient, one layer's backward")
    if sharded:
        table.add_row("unsharded gradients", _fmt_bytes(max(p.layer_gradients, p.root_gradients)),
                      f"before their reduce-scatter: a layer's {_fmt_bytes(p.layer_gradients)}, the root's "
                      f"{_fmt_bytes(p.root_gradients)} (reduced last)")
    for name, n in p.strategy_device.items():
        table.add_row(name, _fmt_bytes(n), "")
    table.add_row("[bold]predicted peak[/bold]", f"[bold]{_fmt_bytes(p.peak)}[/bold]",
                  f"on each GPU (one process: {_fmt_bytes(p.model_weight_bytes)} of weights)" if sharded
                  else "on the device")
    for name, n in p.host.items():
        table.add_row(f"host: {name}", _fmt_bytes(n), "CPU memory, not on the device"
                      + (", per process" if sharded else ""))
    shaky = ("\n[yellow]the fit does not explain every saved tensor: treat the activations as approximate[/yellow]"
             if p.fit_residual > RELIABLE_FIT else "")
    table.caption = (f"activations fitted on {p.twins} twins (largest fit error {p.fit_residual:.1%}); "
                     f"source: {p.source}" + "".join(f"\n{n}" for n in p.notes) + shaky)
    return table


def _measure_table(p, measured: dict) -> Table:
    table = Table(title="Predicted versus measured (two real steps here)", title_justify="left")
    for col in ("what", "predicted", "measured", "ratio"):
        table.add_column(col, justify="left" if col == "what" else "right")
    pairs = [("activations (saved tensors)", p.activations, measured["activation_bytes"]),
             ("weights", p.weight_bytes, measured["weight_bytes"]),
             ("gradients", p.gradients, measured["gradient_bytes"]),
             ("optimizer state", p.optimizer_state, measured["optimizer_bytes"])]
    if measured.get("cuda_peak_bytes"):
        pairs.append(("peak (torch.cuda.max_memory_allocated)", p.peak, measured["cuda_peak_bytes"]))
    for name, a, b in pairs:
        table.add_row(name, _fmt_bytes(a), _fmt_bytes(b), f"{a / b:.3f}" if b else "-")
    return table


@app.command()
@handle_errors
def export(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `memft train`.")],
    out_dir: Annotated[Path, typer.Argument(help="Where to write the standalone Hugging Face model.")],
) -> None:
    """Write a standalone Hugging Face model directory from a run (LoRA adapters merged).

    Example: memft export runs/quickstart exported/ && python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('exported')"
    """
    from memft.export import export_run

    path = export_run(run_dir, out_dir)
    console.print(f"exported to {path}")


DtypeOpt = Annotated[Optional[Dtype], typer.Option(help="Weights dtype (default: the run's, or float32).")]
DeviceOpt = Annotated[Device, typer.Option(help="Where to run the model.")]


eval_app = typer.Typer(help="Score a model as lm-evaluation-harness does: MMLU few-shot, GLUE.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")


@eval_app.command("mmlu")
@handle_errors
def eval_mmlu(
    model: Annotated[str, typer.Option(help="A run directory (its newest checkpoint, adapters included), a local "
                                            "Hugging Face model directory, a built-in or a hub id.")],
    data: Annotated[str, typer.Option(help="A folder with the original per-subject CSVs (<dir>/<split>/"
                                           "<subject>_<split>.csv), or `hub` for cais/mmlu.")] = "hub",
    split: Annotated[str, typer.Option(help="The split scored: `test`, or `val` (the few-shot examples come "
                                            "from `dev`).")] = "test",
    shots: Annotated[int, typer.Option(min=0, max=5, help="Few-shot examples before each question (the harness "
                                                          "defaults to 0; 5 is the usual MMLU number).")] = 5,
    subjects: Annotated[Optional[str], typer.Option(help="Comma-separated subjects (default: all 57).")] = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Only the first N questions of each subject.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Sequences per forward pass.")] = 16,
    dtype: DtypeOpt = None,
    device: DeviceOpt = "auto",
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write every question's scores and the "
                                                                    "accuracies here.")] = None,
) -> None:
    """MMLU accuracy per category and overall (size-weighted), scored as lm-evaluation-harness's `mmlu` task.

    Examples:

      memft eval mmlu --model runs/lora --data ../shared/data/mmlu --split val --limit 20

      memft eval mmlu --model Qwen/Qwen2.5-0.5B --shots 5 --json mmlu.json
    """
    from memft.eval import models as eval_models
    from memft.eval.run import run_mmlu
    from memft.outputs import check_writable_file, write_text

    if json_out:
        check_writable_file(json_out, "`--json`")  # before loading and scoring, not after
    with console.status(f"loading {model} ..."):
        loaded = eval_models.load(model, dtype=dtype, device=device)
    wanted = [s.strip() for s in subjects.split(",")] if subjects else None
    with _progress() as advance:
        report = run_mmlu(loaded, data=data, split=split, shots=shots, subjects=wanted, limit=limit,
                          batch_size=batch_size, progress=advance)
    console.print(_mmlu_table(report))
    if json_out:
        write_text(json_out, json.dumps(report, indent=2), "`--json`")


@eval_app.command("glue")
@handle_errors
def eval_glue(
    task: Annotated[str, typer.Option(help="sst2, cola, mrpc, rte, qnli, qqp, mnli, wnli or stsb.")],
    model: Annotated[str, typer.Option(help="A run directory, a local Hugging Face model directory, a built-in or a "
                                            "hub id: a sequence classifier, or a causal LM (prompted form).")],
    data: Annotated[str, typer.Option(help="A folder in the original GLUE layout (<dir>/SST-2/dev.tsv, ...), or "
                                           "`hub` for nyu-mll/glue.")] = "hub",
    limit: Annotated[Optional[int], typer.Option(min=1, help="Only the first N validation examples.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Examples per forward pass.")] = 32,
    dtype: DtypeOpt = None,
    device: DeviceOpt = "auto",
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the metrics and every prediction here.")]
    = None,
) -> None:
    """A GLUE task's validation metric: a classifier's arg-max class, or for a causal LM lm-evaluation-harness's
    prompted multiple choice (0-shot, its prompts and choice order).

    Examples:

      memft eval glue --task sst2 --model runs/classify_sst2 --data ../shared/data/glue

      memft eval glue --task cola --model stories260K --data ../shared/data/glue --limit 200
    """
    from memft.eval import models as eval_models
    from memft.eval.run import run_glue
    from memft.outputs import check_writable_file, write_text

    if json_out:
        check_writable_file(json_out, "`--json`")  # before loading and scoring, not after
    with console.status(f"loading {model} ..."):
        loaded = eval_models.load(model, dtype=dtype, device=device)
    with _progress() as advance:
        report = run_glue(loaded, task=task, data=data, limit=limit, batch_size=batch_size, progress=advance)
    table = Table(title=f"GLUE {task} (validation, {report['examples']:,} examples, {report['form']}): "
                        f"{report['model']}", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in report["results"].items():
        table.add_row(name, f"{value:.4f}")
    console.print(table)
    if json_out:
        write_text(json_out, json.dumps(report, indent=2), "`--json`")


ModelRef = Annotated[str, typer.Argument(help="A run directory (its newest checkpoint, adapters included), a local "
                                              "Hugging Face model directory (e.g. a `memft export`), a built-in or a "
                                              "hub id.")]
TemplateOpt = Annotated[Optional[str], typer.Option(
    help="Chat template: `chatml` (built-in) or a Jinja string (default: the run's, else the tokenizer's).")]
SystemOpt = Annotated[Optional[str], typer.Option(help="System prompt (default: the run's `data.system`).")]
TemperatureOpt = Annotated[float, typer.Option(min=0.0, help="Sampling temperature; 0 is greedy.")]
TopPOpt = Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling: the smallest set of tokens "
                                                                 "whose probability reaches this.")]
MaxNewOpt = Annotated[int, typer.Option(min=1, help="At most this many new tokens per reply.")]
SeedOpt = Annotated[Optional[int], typer.Option(help="Seed the sampling, for a reproducible reply.")]


def _sampling(max_new_tokens: int, temperature: float, top_p: float, seed: int | None):
    from memft.generate import Sampling

    return Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)


def _load_generator(model: str, template, dtype, device):
    from memft.generate import Generator

    with err_console.status(f"loading {model} ..."):
        return Generator.load(model, template=template, dtype=dtype, device=device)


@app.command()
@handle_errors
def generate(
    model: ModelRef,
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="A prompt (repeat for several).")],
    template: TemplateOpt = None,
    system: SystemOpt = None,
    max_new_tokens: MaxNewOpt = 256,
    temperature: TemperatureOpt = 0.7,
    top_p: TopPOpt = 0.9,
    seed: SeedOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per prompt on stdout (prompt, reply, "
                                                          "new_tokens, stopped), nothing streamed.")] = False,
) -> None:
    """Reply to each prompt, rendered as the run's training examples were; streamed.

    A chat run's prompt goes through its chat template, an instruction run's through its `data.template`, a text
    run's is continued.

    Examples:

      memft generate runs/chat --prompt "What is a haiku?"

      memft generate runs/quickstart -p "Tom has 3 apples and buys 2 more. How many?" --temperature 0 --json
    """
    gen = _load_generator(model, template, dtype, device)
    sampling = _sampling(max_new_tokens, temperature, top_p, seed)
    for text in prompt:
        if json_out:
            reply = gen.complete(text, sampling, system)
            print(json.dumps({"prompt": text, "reply": reply.text, "new_tokens": reply.new_tokens,
                              "stopped": reply.stopped}), flush=True)
            continue
        if len(prompt) > 1:
            console.print(f"[bold]> {text}[/bold]", highlight=False)
        gen.complete(text, sampling, system, on_text=lambda piece: console.out(piece, end="", highlight=False))
        console.out("")


@app.command()
@handle_errors
def chat(
    model: ModelRef,
    template: TemplateOpt = None,
    system: SystemOpt = None,
    max_new_tokens: MaxNewOpt = 256,
    temperature: TemperatureOpt = 0.7,
    top_p: TopPOpt = 0.9,
    seed: SeedOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="For scripts: read one user message per line of stdin, "
                                                          "write one JSON object per reply.")] = False,
) -> None:
    """Talk to a model: replies stream as they are generated, the conversation is kept.

    `/reset` starts over, `/exit` or Ctrl-D ends.

    Examples:

      memft chat runs/chat

      printf 'Hi!\\nAnd then?\\n' | memft chat runs/chat --json --temperature 0
    """
    import sys

    gen = _load_generator(model, template, dtype, device)
    if gen.prompter.template is None:
        gen.prompter.chat_ids([])  # raises the sentence: no chat template
    sampling = _sampling(max_new_tokens, temperature, top_p, seed)
    if json_out:
        for line in sys.stdin:
            text = line.rstrip("\n")
            if not text.strip():
                continue
            reply = gen.say(text, sampling, system)
            print(json.dumps({"user": text, "reply": reply.text, "new_tokens": reply.new_tokens,
                              "stopped": reply.stopped, "turn": len(gen.history) // 2}), flush=True)
        return
    console.print(f"chatting with {model} ([bold]/reset[/bold] starts over, [bold]/exit[/bold] or Ctrl-D ends)")
    while True:
        try:
            text = console.input("[bold green]you>[/bold green] ")
        except (EOFError, KeyboardInterrupt):
            console.out("")
            return
        if text.strip() in ("/exit", "/quit"):
            return
        if text.strip() == "/reset":
            gen.history.clear()
            console.print("(conversation cleared)")
            continue
        if not text.strip():
            continue
        console.print("[bold blue]model>[/bold blue] ", end="")
        gen.say(text, sampling, system, on_text=lambda piece: console.out(piece, end="", highlight=False))
        console.out("")


@contextlib.contextmanager
def _progress():
    """A progress bar on stderr; yields `advance(done, total)`."""
    from rich.progress import Progress

    with Progress(console=err_console, transient=True) as bar:
        job = bar.add_task("scoring", total=None)
        yield lambda done, total: bar.update(job, completed=done, total=total)


def _mmlu_table(report: dict) -> Table:
    res = report["results"]
    table = Table(title=f"MMLU ({report['split']}, {report['shots']}-shot): {report['model']}", title_justify="left")
    for col in ("group", "questions", "accuracy"):
        table.add_column(col, justify="left" if col == "group" else "right")
    for name, r in res["categories"].items():
        table.add_row(name.replace("_", " "), f"{r['questions']:,}", f"{r['acc']:.4f}")
    table.add_row("[bold]mmlu[/bold] (size-weighted)", f"{res['questions']:,}", f"[bold]{res['mmlu']:.4f}[/bold]")
    return table


# ---------------------------------------------------------------------- output


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _print_plan(trainer) -> None:
    p = trainer.params
    share = p["trainable_params"] / max(p["total_params"], 1)
    table = Table(title="Plan", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    r = trainer.recipe
    table.add_row("model", f"{trainer.model_source}{' (MoE)' if trainer.is_moe else ''}, {r.model.dtype}, "
                           f"on {trainer.device}")
    table.add_row("parameters", f"{p['total_params']:,} total, {p['trainable_params']:,} trainable ({share:.2%})"
                  + (f", {p['expert_params']:,} in routed experts" if p.get("expert_params") else ""))
    table.add_row("strategies", " -> ".join(s.name for s in trainer.strategies)
                  + (" + gradient checkpointing" if r.train.gradient_checkpointing else ""))
    for note in trainer.notes:
        table.add_row("", note)
    d = trainer.data
    table.add_row("data", f"{d.source}"
                  + (f" ({d.dropped} dropped: nothing left to learn after truncation)" if d.dropped else ""))
    per_rank = f" per rank x {trainer.ranks} ranks ({r.distributed.mode})" if trainer.ranks > 1 else ""
    table.add_row("steps", f"{trainer.total_steps} x {r.train.grad_accum} micro-batches of {r.train.batch_size}"
                           f"{per_rank}, up to {r.data.max_length} tokens each")
    table.add_row("output", str(trainer.run_dir))
    console.print(table)


def _resume_command(recipe: str, overrides: list[str], output_dir: str | None, resume: str) -> str:
    """The `memft train` command line that continues an interrupted run, in backticks."""
    import shlex

    kept = [o for o in overrides if not o.startswith("output.resume=")]  # `never` would refuse the run
    again = ["memft", "train", recipe, *kept, *(["output.resume=auto"] if resume != "auto" else []),
             *(["-o", output_dir] if output_dir else [])]
    return f"`{shlex.join(again)}`"


def _print_summary(summary: dict, run_dir: Path) -> None:
    table = Table(title=f"Done: {run_dir}", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("steps", f"{summary['steps']}"),
        ("final train loss", f"{summary['final_loss']:.4f}" if summary["final_loss"] is not None else "-"),
        ("eval loss", f"{summary['eval_loss']:.4f}" if summary["eval_loss"] is not None else "-"),
        ("tokens/s", f"{summary['tokens_per_s']:,.0f}" if summary["tokens_per_s"] else "-"),
        ("peak memory", _fmt_bytes(summary.get("peak_mem_bytes"))),
        ("activation memory", _fmt_bytes(summary.get("activation_bytes"))),
        ("trainable / total", f"{summary['trainable_params']:,} / {summary['total_params']:,}"),
        ("wall time", f"{summary['wall_time_s']:.1f} s"),
        ("files", ", ".join(name for name in ("metrics.jsonl", "summary.json", "loss_memory.png", "checkpoints/")
                            if (run_dir / name).exists())),
    ]
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)


class _Progress:
    """A rich progress bar on a terminal; a plain line every ~10% of the run otherwise."""

    def __init__(self, enabled: bool):
        self.live = enabled and err_console.is_terminal
        self.bar = None
        self.task = None

    def __enter__(self):
        if self.live:
            from rich.progress import (
                BarColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                                TimeRemainingColumn(), TextColumn("loss {task.fields[loss]}"),
                                TextColumn("mem {task.fields[mem]}"), console=err_console)
            self.bar.__enter__()
        return self

    def update(self, step: int, total: int, loss: float, mem: int) -> None:
        if self.bar is not None:
            if self.task is None:
                self.task = self.bar.add_task("train", total=total, completed=step, loss="-", mem="-")
            self.bar.update(self.task, completed=step, loss=f"{loss:.4f}", mem=_fmt_bytes(mem))
        elif step == total or step % max(1, total // 10) == 0:
            err_console.print(f"step {step}/{total}  loss {loss:.4f}  peak mem {_fmt_bytes(mem)}", highlight=False)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False


def _quiet_libraries() -> None:
    """memft prints its own plan and summary; the libraries' load reports and deprecation chatter are noise.

    transformers and huggingface_hub read these settings from the environment when they are imported, so the
    commands that never load a model (`validate`, `recipes`, `--help`) do not import them just to quiet them."""
    import logging
    import sys
    import warnings

    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if {"transformers", "huggingface_hub"} & sys.modules.keys():  # imported already (by a caller such as the tests)
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\b")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(peft|bitsandbytes)\b")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "Failed to load CPU gemm_4bit_forward ..." on CPUs


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_libraries()
    console.quiet = _other_rank()  # in a torchrun job rank 0 speaks for the job (see `handle_errors`)
    app()


if __name__ == "__main__":
    main()
