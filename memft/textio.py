"""Read the text files users give memft (recipes, data files, benchmark files) in one way.

A byte-order mark decides the encoding (UTF-8, UTF-16 or UTF-32, little or big endian) and is dropped, so
a header read from a file saved by Excel or Notepad is `sentence`, not `\\ufeffsentence`; without one the
file must be UTF-8. A file that does not decode, or holds NUL characters (a binary file, or UTF-16 saved
without a BOM), is a `UserError` naming the file, the byte offset at fault and how to convert it.
"""

from __future__ import annotations

import codecs
import io
from pathlib import Path

from memft.errors import UserError

# UTF-32 first: its little-endian BOM starts with UTF-16's.
BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)


def sniff_encoding(data: bytes) -> tuple[str, int]:
    """(encoding, length of its BOM): the encoding a byte-order mark announces, else UTF-8 with none."""
    for bom, encoding in BOMS:
        if data.startswith(bom):
            return encoding, len(bom)
    return "utf-8", 0


def decode(data: bytes, path: str | Path, what: str = "file") -> str:
    """The text of `data`, read from `path` (named in errors as `what path`).

    Raises:
        UserError: the bytes do not decode in the announced encoding, or hold a NUL character.
    """
    encoding, start = sniff_encoding(data)
    try:
        text = data[start:].decode(encoding)
    except UnicodeDecodeError as exc:
        offset = start + exc.start
        raise UserError(
            f"{what} {path} is not {encoding.upper()} text: the byte {data[offset:offset + 1]!r} at byte offset "
            f"{offset} does not decode; save it as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path} > "
            f"{_converted_name(path)}` if it is Latin-1"
        ) from None
    nul = text.find("\0")
    if nul >= 0:
        offset = start + len(text[:nul].encode(encoding))
        raise UserError(
            f"{what} {path} is not text: it holds a NUL byte at byte offset {offset} (a binary file, or UTF-16 "
            f"saved without a byte-order mark); give a UTF-8 text file, e.g. `iconv -f utf-16le -t utf-8 {path} > "
            f"{_converted_name(path)}` if it is UTF-16"
        )
    return text


def read_text(path: str | Path, what: str = "file") -> str:
    """The whole text of the file at `path` (see `decode`); newlines are left as they are."""
    return decode(Path(path).expanduser().read_bytes(), path, what)


def open_text(path: str | Path, what: str = "file") -> io.StringIO:
    """The decoded file as a text stream that keeps its newlines, as `open(path, newline="")` does (what the
    `csv` module needs for line breaks inside quoted cells)."""
    return io.StringIO(read_text(path, what), newline="")


def _converted_name(path: str | Path) -> str:
    p = Path(path)
    return str(p.with_name(f"{p.stem}.utf8{p.suffix}"))
