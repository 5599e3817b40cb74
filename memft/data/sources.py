"""Where training rows come from: a local file (.jsonl/.json/.csv/.tsv/.parquet/.txt) or a hub dataset.

Every reader returns `list[dict]`, one dict per row, so the formats never care about the source.
Parquet goes through `datasets.load_dataset`. Text files are decoded by `memft.textio` (the encoding a
byte-order mark announces, else UTF-8; anything else is one sentence with the byte offset) and parsed
here: JSON / JSON Lines with `json`, so a malformed line is named by its line number; CSV and TSV with
Python's `csv` module because we need two things `datasets` does not give: TSVs with quoting disabled
(GLUE files hold stray `"` that a quoting reader would swallow across lines) and a header guess for
files without one (CoLA, MMLU). A .txt file is plain text for `format: text`: one row `{"text": ...}` per
paragraph (lines between blank lines) or per line (`data.txt_split`).
"""

from __future__ import annotations

import csv
import difflib
import json
import re
from pathlib import Path

from memft.errors import UserError
from memft.recipe import DataConfig
from memft.textio import open_text, read_text

# How each local extension is read: a `datasets` builder name, or our own readers.
DATASETS_BUILDERS = {".parquet": "parquet"}
JSON_SUFFIXES = {".jsonl", ".json"}
DELIMITERS = {".csv": ",", ".tsv": "\t"}
TEXT_SUFFIX = ".txt"
LOCAL_SUFFIXES = set(DATASETS_BUILDERS) | JSON_SUFFIXES | set(DELIMITERS) | {TEXT_SUFFIX}
TEXT_COLUMN = "text"
"""The one column of a .txt file's rows (`data.text_field`'s default)."""

_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?")
_INT = re.compile(r"[-+]?\d+")


def is_local(source: str) -> bool:
    """A local file (anything that exists, starts like a path, or has a data-file extension), else a hub name."""
    return (source.startswith((".", "/", "~")) or Path(source).suffix.lower() in LOCAL_SUFFIXES
            or Path(source).expanduser().exists())


def read_rows(cfg: DataConfig, split: str | None = None) -> list[dict]:
    """The rows of `cfg.source` (for a hub dataset: of `split`, default `cfg.split`), first `max_samples` only.

    Raises:
        UserError: missing file, unknown extension, unreadable file, or a hub dataset that cannot be loaded.
    """
    if is_local(cfg.source):
        if Path(cfg.source).suffix.lower() == TEXT_SUFFIX and cfg.format != "text":
            raise UserError(f"{cfg.source} is a plain-text file, which memft reads with `data.format: text` only "
                            f"(got `format: {cfg.format}`); set `data.format: text`, or convert the file to "
                            ".jsonl with the columns the format needs")
        rows = read_file(cfg.source, header=cfg.header, limit=cfg.max_samples, txt_split=cfg.txt_split)
    else:
        rows = read_hub(cfg.source, cfg.config_name, split or cfg.split, limit=cfg.max_samples)
    return rows[: cfg.max_samples] if cfg.max_samples else rows


def read_file(path: str | Path, header: str = "auto", limit: int | None = None,
              txt_split: str = "paragraph") -> list[dict]:
    """Rows of one local file, chosen by extension. `header` (auto|yes|no) applies to CSV/TSV only,
    `txt_split` (paragraph|line) to .txt only."""
    file = Path(path).expanduser()
    suffix = file.suffix.lower()
    if not file.exists():
        raise UserError(f"data file not found: {path}")
    if file.is_dir():
        raise UserError(f"data source {path} is a directory; give one file (.jsonl, .json, .csv, .tsv, .parquet "
                        "or .txt)")
    if suffix not in LOCAL_SUFFIXES:
        raise UserError(f"cannot read {path}: unknown extension {suffix or '(none)'!r}; "
                        f"use one of {', '.join(sorted(LOCAL_SUFFIXES))}")
    if suffix in DELIMITERS:
        return read_delimited(file, DELIMITERS[suffix], header)
    if suffix == TEXT_SUFFIX:
        return read_plain_text(read_text(file, "data file"), txt_split, limit)
    if suffix == ".jsonl":
        return same_columns(read_json_lines(file, read_text(file, "data file"), limit))
    if suffix == ".json":
        return same_columns(read_json(file, limit))
    import datasets

    try:
        ds = datasets.load_dataset(DATASETS_BUILDERS[suffix], data_files=str(file), split="train")
    except Exception as exc:  # pyarrow/json errors have many types; all mean "this file is malformed"
        raise UserError(f"could not read {path}: {exc}") from None
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return ds.to_list()


def read_hub(name: str, config_name: str | None, split: str, limit: int | None = None,
             local_hint: str = "point `data.source` at a local file") -> list[dict]:
    """Rows of one split of a Hugging Face hub dataset (needs the network or the local `datasets` cache)."""
    import datasets

    try:
        ds = datasets.load_dataset(name, config_name, split=split)
    except ConnectionError as exc:
        raise UserError(f"could not load dataset {name!r} from the hub (offline?): {exc}; download it once "
                        f"with network access, or {local_hint}") from None
    except (OSError, ValueError) as exc:  # unknown dataset/config/split; DatasetNotFoundError is an OSError
        hint = " (if you meant a local file: it does not exist)" if Path(name).suffix else ""
        raise UserError(f"could not load dataset {name!r} from the hub{hint}: {exc}") from None
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return ds.to_list()


def read_plain_text(text: str, split: str = "paragraph", limit: int | None = None) -> list[dict]:
    """`{"text": ...}` rows of a plain text: one per paragraph (a run of non-blank lines, joined by newlines) or,
    with `split="line"`, one per non-blank line. A blank line holds only spaces and tabs; "\r\n" counts as "\n"."""
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if split == "line":
        chunks = [line for line in lines if line.strip()]
    else:
        chunks, current = [], []
        for line in lines + [""]:  # the sentinel closes the last paragraph
            if line.strip():
                current.append(line)
            elif current:
                chunks.append("\n".join(current))
                current = []
    return [{TEXT_COLUMN: chunk} for chunk in chunks[:limit]]


def read_json_lines(file: Path, text: str, limit: int | None = None) -> list[dict]:
    """Rows of a JSON Lines text, one object per line (blank lines skipped); stops after `limit` rows."""
    rows = []
    # split on "\n" only: str.splitlines would also split inside strings holding U+2028 and friends
    for number, line in enumerate(text.split("\n"), start=1):
        if limit is not None and len(rows) >= limit:
            break
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{file}, line {number}: not valid JSON ({exc.msg} at column {exc.colno}); a JSON Lines "
                            "file holds one JSON object per line") from None
        rows.append(_row(value, file, f"line {number}"))
    return rows


def read_json(file: Path, limit: int | None = None) -> list[dict]:
    """Rows of a .json file: a list of objects, an object of equal-length column lists, or JSON Lines."""
    text = read_text(file, "data file")
    try:
        tree = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # more than one JSON value: JSON Lines saved as .json, which datasets reads too
            return read_json_lines(file, text, limit)
        raise UserError(f"{file}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    if isinstance(tree, dict) and tree and all(isinstance(v, list) for v in tree.values()):
        lengths = {len(v) for v in tree.values()}
        if len(lengths) != 1:
            raise UserError(f"{file}: its columns have different lengths ({', '.join(map(str, sorted(lengths)))}); "
                            "a JSON object of columns needs one value per row in every column")
        tree = [dict(zip(tree, values)) for values in zip(*tree.values())]
    if not isinstance(tree, list):
        raise UserError(f"{file}: expected a JSON list of rows (`[{{\"text\": ...}}, ...]`) or an object of columns "
                        f"(`{{\"text\": [...]}}`), found a JSON {_json_kind(tree)}")
    return [_row(value, file, f"item {i + 1}") for i, value in enumerate(tree[:limit])]


def _row(value, file: Path, where: str) -> dict:
    if not isinstance(value, dict):
        raise UserError(f"{file}, {where}: a JSON {_json_kind(value)} where a row was expected; each row is a JSON "
                        "object such as {\"text\": \"...\"}")
    return value


def _json_kind(value) -> str:
    kinds = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return kinds.get(type(value), "number")


def same_columns(rows: list[dict]) -> list[dict]:
    """Every row with every column (in first-seen order), None where a row lacks one, as `datasets` reads JSON."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return [row if len(row) == len(columns) else {c: row.get(c) for c in columns} for row in rows]


def read_delimited(file: Path, delimiter: str, header: str = "auto") -> list[dict]:
    """Rows of a CSV (standard quoting) or TSV (no quoting: split on tabs) file.

    Header-less files get the column numbers as keys ("0", "1", ...). Columns whose every cell is
    an integer become ints, so label columns read the same as from JSON.
    """
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    # csv's default cap of 128 KiB per cell refuses long documents; a cell may be as long as the file
    csv.field_size_limit(max(csv.field_size_limit(), min(file.stat().st_size + 1, 2**31 - 1)))
    with open_text(file, "data file") as f:  # a BOM is dropped, so the first column is not `\ufeffsentence`
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        try:
            table = [row for row in reader if row]
        except csv.Error as exc:
            raise UserError(f"{file}, line {reader.line_num}: not a valid {file.suffix[1:].upper()} row ({exc})") from None
    if not table:
        return []
    has_header = header == "yes" or (header == "auto" and not looks_like_data(table[0]))
    names = [c.strip() for c in table[0]] if has_header else [str(i) for i in range(len(table[0]))]
    body = table[1:] if has_header else table
    if not body:
        return []
    kind = "tab" if delimiter == "\t" else "comma"
    for number, row in enumerate(body, start=2 if has_header else 1):
        if len(row) != len(names):
            raise UserError(f"{file}: row {number} has {len(row)} cells but the file has {len(names)} "
                            f"{kind}-separated columns")
    columns = list(zip(*body))
    typed = [[int(c) for c in col] if all(_INT.fullmatch(c.strip()) for c in col) else list(col) for col in columns]
    return [dict(zip(names, values)) for values in zip(*typed)]


def looks_like_data(row: list[str]) -> bool:
    """The `header: auto` rule: the first row is data, not a header, if any of its cells is a number,
    reads like text (more than 3 words or over 40 characters), or repeats another cell.

    Column names are short, distinct and not numbers; CoLA's first row holds the label `1`, MMLU's a
    question. A header-less file whose first row is short distinct words is misread: set `header: no`.
    """
    cells = [c.strip() for c in row]
    textual = any(_NUMBER.fullmatch(c) or len(c) > 40 or len(c.split()) > 3 for c in cells)
    return textual or len(set(cells)) < len(cells)


def require_columns(rows: list[dict], fields: dict[str, str], source: str) -> None:
    """Check that every column in `fields` ({recipe key: column}) exists; else a UserError with suggestions."""
    if not rows:
        return
    columns = list(rows[0])
    for key, column in fields.items():
        if column in rows[0]:
            continue
        guess = difflib.get_close_matches(column, columns, n=1)
        hint = f"; did you mean {guess[0]!r}?" if guess else ""
        if all(c.isdigit() for c in columns) and not column.isdigit():
            hint += " (the file was read without a header: set `data.header: yes` if its first row names the columns)"
        elif column.isdigit() and not any(c.isdigit() for c in columns):
            hint += " (the file was read with a header row: set `data.header: no` to use column numbers)"
        raise UserError(f"`data.{key}`: column {column!r} is not in {source}; its columns are "
                        f"{', '.join(map(repr, columns))}{hint}")
