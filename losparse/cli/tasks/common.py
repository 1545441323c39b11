"""What every task module needs (tasks never import each other; they share this).

Local data files are read here, by plain Python readers rather than `datasets.load_dataset`, so that
a bad file ends in one `LoSparseUsageError` naming the file and the line (or record) at fault, before
any model is loaded. `datasets` would raise Arrow/pandas tracebacks instead, some only mid-training.
Every row remembers where it came from (`Table.where`), so later checks can name it too.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from losparse.core.errors import LoSparseUsageError

_INTEGER = re.compile(r"^[+-]?\d+$")
_FLOAT = re.compile(r"^[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?$")


def file_extension(path: str) -> str:
    """Lower-case extension without the dot ('' if none)."""
    name = os.path.basename(path)
    return name.rsplit(".", 1)[-1].lower() if "." in name else ""


def file_format(path: str) -> str:
    """'csv' or 'json' (.json and .jsonl are both read as JSON)."""
    return "csv" if file_extension(path) == "csv" else "json"


def check_local_files(args: Any, extensions: Sequence[str], flags: Sequence[str] = ("train_file", "validation_file")) -> None:
    """Every given data file exists and has an allowed extension, else a one-line usage error."""
    for flag in flags:
        path = getattr(args, flag, None)
        if path is None:
            continue
        if not os.path.isfile(path):
            raise LoSparseUsageError(f"--{flag} {path!r} does not exist")
        if file_extension(path) not in extensions:
            raise LoSparseUsageError(f"--{flag} {path!r} must end in one of: .{', .'.join(extensions)}")


def check_positive(args: Any, flags: Sequence[str]) -> None:
    """Each flag that is set must be >= 1 (0 examples or tokens would fail much later, or silently)."""
    for flag in flags:
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise LoSparseUsageError(f"--{flag} {value} must be >= 1")


def is_blank(value: Any) -> bool:
    """None, or a string holding only whitespace."""
    return value is None or (isinstance(value, str) and not value.strip())


def number_kind(value: Any, from_csv: bool) -> str:
    """'int', 'float' or 'text' — what a cell holds, the way pandas/Arrow would type it.

    A CSV cell is text on disk, so it is a number when it reads as one; a JSON value has its own type.
    """
    if isinstance(value, bool):
        return "text"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if from_csv and isinstance(value, str):
        text = value.strip()
        if _INTEGER.match(text):
            return "int"
        if _FLOAT.match(text):
            return "float"
    return "text"


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages."""
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return names.get(type(value), "null" if value is None else type(value).__name__)


def describe(value: Any, width: int = 40) -> str:
    """A short repr of a cell for messages."""
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

def read_text(path: str, flag: str) -> str:
    """The file's UTF-8 text (a BOM is dropped); unreadable or empty files are usage errors."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise LoSparseUsageError(f"--{flag} {path!r} cannot be read: it is not UTF-8 text (byte {exc.start} is "
                                 f"{exc.object[exc.start:exc.start + 1]!r})") from None
    except OSError as exc:
        raise LoSparseUsageError(f"--{flag} {path!r} cannot be read: {exc.strerror or exc}") from None
    if not text.strip():
        raise LoSparseUsageError(f"--{flag} {path!r} is empty")
    return text


def _json_lines(text: str, path: str, flag: str) -> tuple[list[Any], list[str]]:
    records, locations = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise LoSparseUsageError(f"--{flag} {path!r} line {number} is not JSON: {exc.msg} (column {exc.colno})"
                                     ) from None
        locations.append(f"line {number}")
    return records, locations


def load_json(path: str, flag: str) -> tuple[Any, Optional[list[str]]]:
    """(document, None) for a file holding one JSON value, or (records, locations) for JSON lines.

    A .jsonl file is always JSON lines. A .json file is one document if it parses as one, else JSON
    lines; when neither works the error gives the line (and column) where parsing stopped.
    """
    text = read_text(path, flag)
    if file_extension(path) != "jsonl":
        try:
            return json.loads(text), None
        except json.JSONDecodeError as exc:
            first_line = next(line for line in text.splitlines() if line.strip())
            try:
                json.loads(first_line)
            except json.JSONDecodeError:  # not JSON lines either: report the document's own error
                raise LoSparseUsageError(f"--{flag} {path!r} is not valid JSON: {exc.msg} at line {exc.lineno} "
                                         f"column {exc.colno}") from None
    return _json_lines(text, path, flag)


def _json_table_records(path: str, flag: str) -> tuple[list[Any], list[str]]:
    document, locations = load_json(path, flag)
    if locations is not None:
        return document, locations
    if isinstance(document, dict) and isinstance(document.get("data"), list):
        return document["data"], [f"record data[{i}]" for i in range(len(document["data"]))]
    if isinstance(document, list):
        return document, [f"record {i + 1}" for i in range(len(document))]
    raise LoSparseUsageError(f"--{flag} {path!r} holds one JSON {json_type(document)}; expected JSON lines "
                             "(one object per line), a JSON list of objects or {\"data\": [objects]}")


@dataclass
class Table:
    """The rows of one local CSV/JSON file, each with the place it came from."""

    path: str
    flag: str
    format: str  # "csv" or "json"
    columns: list[str]
    rows: list[dict[str, Any]]
    locations: list[str] = field(repr=False)

    @property
    def name(self) -> str:
        """How messages name the file: `--train_file 'data/train.csv'`."""
        return f"--{self.flag} {self.path!r}"

    def where(self, index: int) -> str:
        """`--train_file 'data/train.csv' line 7`: the file and the row `index` came from."""
        return f"{self.name} {self.locations[index]}"

    def column_list(self) -> str:
        return ", ".join(self.columns)

    def require_column(self, column: str, what: str) -> None:
        if column not in self.columns:
            raise LoSparseUsageError(f"{self.name} has no {what} column {column!r} (columns: {self.column_list()})")

    def kind(self, value: Any) -> str:
        return number_kind(value, from_csv=self.format == "csv")

    def texts(self, column: str, what: str = "text") -> list[str]:
        """The column as strings; an empty or non-string cell is a usage error naming its row."""
        values = []
        for index, row in enumerate(self.rows):
            value = row.get(column)
            if is_blank(value):
                raise LoSparseUsageError(f"{self.where(index)}: the {what} column {column!r} is empty")
            if not isinstance(value, str):
                raise LoSparseUsageError(f"{self.where(index)}: the {what} column {column!r} holds "
                                         f"{describe(value)}, not text")
            values.append(value)
        return values


def _read_csv(path: str, flag: str) -> Table:
    text = read_text(path, flag)
    csv.field_size_limit(2**31 - 1)  # the default, 128 KiB a cell, is less than some news articles
    reader = csv.reader(io.StringIO(text, newline=""))
    header: Optional[list[str]] = None
    rows, locations = [], []
    try:
        for fields in reader:
            if not fields or all(not f.strip() for f in fields):
                continue
            if header is None:
                header = [f.strip() for f in fields]
                _check_header(header, path, flag)
                continue
            if len(fields) != len(header):
                raise LoSparseUsageError(f"--{flag} {path!r} line {reader.line_num} has {len(fields)} fields but "
                                         f"the header has {len(header)} ({', '.join(header)})")
            rows.append(dict(zip(header, fields)))
            locations.append(f"line {reader.line_num}")
    except csv.Error as exc:
        raise LoSparseUsageError(f"--{flag} {path!r} line {reader.line_num} is not valid CSV: {exc}") from None
    if not rows:
        raise LoSparseUsageError(f"--{flag} {path!r} has a header line ({', '.join(header or [])}) but no rows")
    return Table(path, flag, "csv", list(header or []), rows, locations)


def _check_header(header: list[str], path: str, flag: str) -> None:
    for position, name in enumerate(header, start=1):
        if not name:
            raise LoSparseUsageError(f"--{flag} {path!r} line 1: header field {position} is empty; name every column")
        if header.count(name) > 1:
            raise LoSparseUsageError(f"--{flag} {path!r} line 1: the header names the column {name!r} twice")


def _read_json_table(path: str, flag: str) -> Table:
    records, locations = _json_table_records(path, flag)
    if not records:
        raise LoSparseUsageError(f"--{flag} {path!r} holds no records")
    columns: dict[str, None] = {}
    for record, location in zip(records, locations):
        if not isinstance(record, dict):
            raise LoSparseUsageError(f"--{flag} {path!r} {location} is a JSON {json_type(record)}, not an "
                                     "object with one value per column")
        columns.update(dict.fromkeys(record))
    return Table(path, flag, "json", list(columns), records, locations)


def read_table(path: str, flag: str) -> Table:
    """Rows of a local .csv (header line, comma-separated) or .json/.jsonl file of objects."""
    return _read_csv(path, flag) if file_format(path) == "csv" else _read_json_table(path, flag)
