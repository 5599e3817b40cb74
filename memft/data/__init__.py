"""Training data: read rows (`sources`), tokenise them (`formats`), batch them (`batching`).

`build(cfg, tokenizer, seed=...)` is the one entry point the trainer needs: it reads the recipe's
`data` block and returns tokenised train and eval examples; `batching.Batcher` turns those into batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from memft.data.formats import IGNORE_INDEX, check_columns, encode, label_set, pad_token_id
from memft.data.sources import is_local, read_file, read_hub, read_rows, require_columns
from memft.errors import UserError
from memft.recipe import DataConfig

__all__ = ["IGNORE_INDEX", "TokenizedData", "build", "hold_out", "pad_token_id", "read_rows"]


@dataclass
class TokenizedData:
    """Tokenised examples, ready for `Batcher` (see `memft.data.formats` for the example dicts); with
    `data.pack: true`, packed rows of several examples each."""

    train: list[dict]
    eval: list[dict] | None
    """None when `eval_split` is null, or when no eval example survived truncation."""
    num_labels: int | None
    """Classes (classification only): max int label + 1, or the number of distinct string labels."""
    label_names: list[str] | None
    """String labels in id order (classification with string labels only)."""
    dropped: int
    """Instruction and chat examples (train and eval) dropped because truncation left no response (no trained
    assistant token)."""
    source: str
    """A short description for logs, e.g. `data/x.jsonl: 570 train, 30 eval (5% held out)`, then any notes on
    cells converted (`; numbers in column 'answer' are read as text`)."""


def build(cfg: DataConfig, tokenizer, *, seed: int) -> TokenizedData:
    """Read, split and tokenise the data a recipe's `data` block describes.

    Args:
        cfg: the recipe's `data` block.
        tokenizer: a Hugging Face tokenizer; `format: chat` sets the chat template it renders with on it
            (`tokenizer.chat_template`), nothing else changes.
        seed: seeds the random hold-out when `eval_split` is a fraction (use `train.seed`).

    Raises:
        UserError: unreadable source, missing column, a cell that is not text (or not a label), bad
            `eval_split`, or no training examples left.
    """
    rows = read_rows(cfg)
    notes = check_columns(rows, cfg, cfg.source)  # before the hold-out, so row numbers are the file's
    eval_rows, how = None, ""
    if isinstance(cfg.eval_split, (int, float)) and not isinstance(cfg.eval_split, bool):
        rows, eval_rows = hold_out(rows, cfg.eval_split, seed)
        how = f" ({cfg.eval_split:.0%} held out)"
    elif isinstance(cfg.eval_split, str):
        eval_rows, eval_name = read_eval(cfg)
        notes += [n for n in check_columns(eval_rows, cfg, eval_name) if n not in notes]
        how = f" (from {eval_name})"

    labels = None
    if cfg.format == "classification" and rows:
        # One label set for train and eval, so a string label gets the same id in both.
        require_columns(rows, {"label_field": cfg.label_field}, cfg.source)
        if eval_rows:
            require_columns(eval_rows, {"label_field": cfg.label_field}, f"the eval data{how}")
        labels = label_set([r[cfg.label_field] for r in rows + (eval_rows or [])])

    train, dropped = encode(rows, cfg, tokenizer, source=cfg.source, labels=labels)
    evals = None
    if eval_rows is not None:
        evals, eval_dropped = encode(eval_rows, cfg, tokenizer, source=f"the eval data{how}", labels=labels)
        dropped += eval_dropped
    if not train:
        why = (f"packing leaves no full block of {cfg.max_length} tokens" if cfg.pack == "stream" and rows
               else f"all {dropped} examples were dropped: their prompts fill `data.max_length` ({cfg.max_length})"
               if dropped else "the source has no rows")
        raise UserError(f"no training examples from {cfg.source}: {why}")
    return TokenizedData(
        train=train,
        eval=evals or None,
        num_labels=labels.num_labels if labels else None,
        label_names=labels.names if labels else None,
        dropped=dropped,
        source=(f"{cfg.source}: {_count(train)} train, {_count(evals or [])} eval{how}"
                + "".join(f"; {n}" for n in notes)),
    )


def _count(examples: list[dict]) -> str:
    """`570` examples, or for packed rows `570 (in 204 packed rows)`."""
    if examples and "position_ids" in examples[0]:
        return f"{sum(row['position_ids'].count(0) for row in examples)} (in {len(examples)} packed rows)"
    return str(len(examples))


def hold_out(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Split off a seeded random `fraction` of `rows` (at least 1, at most all but one); both keep file order."""
    if not 0 < fraction < 1:
        raise UserError(f"`data.eval_split`: a fraction must be between 0 and 1 (got {fraction}); "
                        "use null for no eval data")
    if len(rows) < 2:
        raise UserError(f"`data.eval_split`: cannot hold out eval rows from {len(rows)} row(s); "
                        "set `data.eval_split: null` or use more data")
    import torch

    n_eval = min(max(round(fraction * len(rows)), 1), len(rows) - 1)
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
    is_eval = torch.zeros(len(rows), dtype=torch.bool)
    is_eval[perm[:n_eval]] = True
    flags = is_eval.tolist()
    return [r for r, e in zip(rows, flags) if not e], [r for r, e in zip(rows, flags) if e]


def read_eval(cfg: DataConfig) -> tuple[list[dict], str]:
    """Rows of a named eval split: a local file, a file beside a local source (`dev` -> `dev.tsv`), or a hub split."""
    name = cfg.eval_split
    assert isinstance(name, str)
    if not is_local(cfg.source) and not is_local(name):
        return read_hub(cfg.source, cfg.config_name, name), f"split {name!r}"
    candidates = [Path(name).expanduser()]
    if is_local(cfg.source):
        here = Path(cfg.source).expanduser().parent
        candidates += [here / name, here / f"{name}{Path(cfg.source).suffix}"]
    for path in candidates:
        if path.is_file():
            return read_file(path, header=cfg.header, txt_split=cfg.txt_split), str(path)
    raise UserError(f"`data.eval_split`: {name!r} is neither a file nor a split; tried "
                    f"{', '.join(str(p) for p in dict.fromkeys(candidates))}")
