"""Finding the line of a CSV or TSV file that polars could not parse.

polars refuses a malformed text file (a row with more fields than the header, a stray or unclosed
quote, bytes that are not UTF-8) without saying where the fault is. Reading a good file costs
nothing here: only after a read has failed, :func:`find_bad_line` walks the file once more, line by
line with plain string operations (a quote-aware parse only for the records that hold a quote), and
describes the first line polars would refuse.

Lines are the file's lines, 1-based, the header being line 1; data rows are counted 1-based after
the header, as every other message of ``recsys.data`` counts rows (a blank line is a row, as polars
reads it; a quoted field may span lines, so a row can start on a later line than its number says).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["find_bad_line"]

QUOTE = '"'
#: a record still open after this many characters is taken to hold a quote that is never closed
MAX_RECORD_CHARS = 1 << 20
QUOTED_FIELD = re.compile(r'"(?:[^"]|"")*"')


@dataclass
class _Record:
    """The lines of one record, which span several lines while a quoted field is open."""

    line: int  # 1-based line where the record starts
    row: int  # 1-based data row (0: the header)
    parts: list[str] = field(default_factory=list)
    quotes: int = 0
    chars: int = 0

    def add(self, text: str) -> None:
        self.parts.append(text)
        self.quotes += text.count(QUOTE)
        self.chars += len(text)

    @property
    def where(self) -> str:
        return self.at(self.line)

    def at(self, line: int) -> str:
        """A line of this record, with the record's data row."""
        return f"line {line} (the header line)" if self.row == 0 else f"line {line} (data row {self.row})"


def find_bad_line(path: str | Path, separator: str, quoting: bool) -> str | None:
    """What is wrong, and on which line, in the first line of ``path`` that polars refuses; None if
    no such line is found (or the file cannot be opened)."""
    try:
        with open(path, "rb") as lines:
            return _first_fault(lines, separator, quoting)
    except OSError:
        return None


def _first_fault(lines, separator: str, quoting: bool) -> str | None:
    well_formed = _well_formed_record(separator)
    header_fields = None
    record = None
    rows = -1  # the header is row 0
    for number, raw in enumerate(lines, start=1):
        if record is None:
            rows += 1
            record = _Record(line=number, row=rows)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return f"invalid utf-8 sequence at {record.at(number)}, byte {exc.start + 1} of the line"
        record.add(text)
        if quoting and record.quotes % 2:
            if record.chars > MAX_RECORD_CHARS:
                return f"a quote character at {record.where} opens a field that is not closed within {MAX_RECORD_CHARS} characters"
            continue  # a quoted field goes on on the next line
        fields = _count_fields("".join(record.parts), separator, quoting, well_formed)
        if fields is None:
            return f"a quote character out of place at {record.where} (quotes must enclose a whole field)"
        if header_fields is None:
            header_fields = fields
        elif fields > header_fields:
            return f"{fields} fields where the header has {header_fields}, at {record.where}"
        record = None
    if record is not None:
        return f"a quote character at {record.where} opens a field that is never closed"
    return None


def _count_fields(text: str, separator: str, quoting: bool, well_formed: re.Pattern) -> int | None:
    """The number of fields of one whole record; None when a quote in it is out of place."""
    if not quoting or QUOTE not in text:
        return text.count(separator) + 1
    if well_formed.fullmatch(text) is None:
        return None
    return QUOTED_FIELD.sub("", text).count(separator) + 1


def _well_formed_record(separator: str) -> re.Pattern:
    """Fields that are either unquoted without any quote, or quoted whole (``""`` inside), then the line end."""
    sep = re.escape(separator)
    one = f'(?:{QUOTED_FIELD.pattern}|[^"{sep}\\n]*)'
    return re.compile(f"{one}(?:{sep}{one})*(?:\\r?\\n)?")
