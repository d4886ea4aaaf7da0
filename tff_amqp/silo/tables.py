"""One client's data file read into typed columns: the formats a silo reads
and the strict typing of their cells.

Each format is read by a library made for it: CSV/TSV and Parquet by pyarrow,
Excel and OpenDocument workbooks by python-calamine, TFRecord files of
``tf.train.Example`` by TensorFlow. A reader yields the requested columns as
Arrow arrays: text (CSV, TSV, workbook cells) or typed (Parquet, TFRecord).
`Converter` then casts each column to the dtype the computation asks for,
strictly: a cell that is not exactly a value of that dtype is an error naming
the file, row and column, never a silently wrong aggregate. Text cells take a
vectorized path (Arrow compute) for what is certainly valid; any other cell
goes through the per-cell parser, whose verdict (value or error) is final.

Nothing here imports TensorFlow except the TFRecord reader, which runs only
at a silo that has already loaded it.
"""

from __future__ import annotations

import csv
import datetime
import math
import pathlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

FORMATS = ("csv", "tsv", "xlsx", "xls", "ods", "parquet", "tfrecord")
EXTENSIONS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".xlsx": "xlsx",
    ".xlsm": "xlsx",
    ".xls": "xls",
    ".ods": "ods",
    ".parquet": "parquet",
    ".tfrecord": "tfrecord",
    ".tfrecords": "tfrecord",
}
_WORKBOOKS = ("xlsx", "xls", "ods")
_INTEGER = re.compile(r"^[+-]?[0-9]+$")
# What Python's float() accepts, less '_' separators (more likely a typo in a
# cell); cells matching it take the vectorized path, the rest the parser.
_FLOAT = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"
_TRUE = frozenset({"true", "1"})
_FALSE = frozenset({"false", "0"})
SUPPORTED = (
    "bool, int8, int16, int32, int64, uint8, uint16, uint32, uint64, "
    "float16, float32, float64, str (tf.string)"
)


def format_of(path: pathlib.Path) -> str | None:
    """The format a file's extension names, or None."""
    return EXTENSIONS.get(path.suffix.lower())


class TableError(ValueError):
    """A client's file cannot be read as asked; the message names the file."""


# ------------------------------------------------------------------ missing


@dataclass(frozen=True)
class MissingPolicy:
    """What a blank cell means under one data key.

    A cell is missing when it is empty (blank after trimming spaces) in a
    number or bool column, an empty workbook cell there, a null in Parquet, or
    an absent feature in a TFRecord Example. In a ``str`` column an empty CSV or
    workbook cell is the empty string, as before; only nulls and absent
    features are missing there.

    ``error`` (the default): a missing cell is an error naming it.
    ``drop-row``: a row with a missing cell in any requested column is left out.
    ``fill:VALUE``: the cell becomes VALUE, parsed as the column's dtype.
    """

    mode: str = "error"
    fill: str | None = None

    @classmethod
    def parse(cls, text: str) -> MissingPolicy:
        if text in ("error", "drop-row"):
            return cls(text)
        if text.startswith("fill:"):
            return cls("fill", text[len("fill:") :])
        raise ValueError(
            f"missing={text!r}: use missing=error, missing=drop-row or missing=fill:VALUE"
        )

    def __str__(self) -> str:
        return f"fill:{self.fill}" if self.mode == "fill" else self.mode


@dataclass
class MissingCounts:
    """How many cells a policy dropped or filled (logged at the silo only)."""

    dropped_rows: int = 0
    dropped_cells: int = 0
    filled_cells: int = 0

    def add(self, other: MissingCounts) -> None:
        self.dropped_rows += other.dropped_rows
        self.dropped_cells += other.dropped_cells
        self.filled_cells += other.filled_cells


# ------------------------------------------------------------------ readers


@dataclass
class RawTable:
    """The requested columns of one client, as read, before typing."""

    label: str
    header: list[str]
    columns: list[pa.Array]
    # "row 2 (line 3)": where the row at a 0-based index is, for errors.
    locate: Callable[[int], str]
    # The header name of each column (for a plain scalar: the file's one column).
    names: list[str] = field(default_factory=list)

    @property
    def num_rows(self) -> int:
        return len(self.columns[0]) if self.columns else 0


class ClientFile:
    """A reader of one client's file (and sheet)."""

    def __init__(self, path: pathlib.Path, label: str) -> None:
        self.path = path
        self.label = label

    def sheet_names(self) -> list[str]:
        return []

    def header(self) -> list[str]:
        """The column names (reads the least it can; checks readability)."""
        raise NotImplementedError

    def read(self, names: Sequence[str] | None) -> RawTable:
        """The named columns (None: the file's only column)."""
        raise NotImplementedError

    def schema(self) -> tuple[list[tuple[str, str]], int]:
        """Each column's name and kind (`column_kind`), read from the data,
        and the number of rows."""
        header = self.header()
        unique = [name for name in dict.fromkeys(header) if name and header.count(name) == 1]
        table = self.read(unique)
        kinds = [(name, column_kind(array)) for name, array in zip(unique, table.columns)]
        return kinds, table.num_rows

    def _pick(self, header: list[str], names: Sequence[str] | None) -> list[int]:
        """Indices of `names` in `header`, or of the one column for None."""
        if names is None:
            if len(header) != 1:
                raise _WrongWidth(header)
            return [0]
        indices = []
        for name in names:
            found = [i for i, h in enumerate(header) if h == name]
            if not found:
                raise TableError(
                    f"{self.label} has no column {name!r} (its header row has: "
                    f"{', '.join(header)}); the computation expects columns "
                    f"{', '.join(names)}, named in the header"
                )
            if len(found) > 1:
                raise TableError(
                    f"{self.label} has {len(found)} columns named {name!r}; rename one"
                )
            indices.append(found[0])
        return indices

    def _empty(self) -> TableError:
        return TableError(
            f"{self.label} is empty; its first row must be a header naming the columns"
        )


class _WrongWidth(TableError):
    """A plain scalar element type over a file with other than one column."""

    def __init__(self, header: list[str]) -> None:
        super().__init__(f"{len(header)} columns")
        self.header = header


class DelimitedFile(ClientFile):
    """CSV or TSV, UTF-8 (a byte-order mark is skipped), first row the header."""

    def __init__(self, path: pathlib.Path, label: str, delimiter: str) -> None:
        super().__init__(path, label)
        self.delimiter = delimiter

    def _raw_header(self) -> list[str]:
        try:
            with self.path.open(newline="", encoding="utf-8-sig") as f:
                row = next(csv.reader(f, delimiter=self.delimiter), [])
        except UnicodeDecodeError as e:
            raise TableError(f"{self.label}: not UTF-8 text ({e.reason} at byte {e.start})") from e
        except csv.Error as e:
            raise TableError(f"{self.label}: malformed CSV: {e}") from e
        except OSError as e:
            raise TableError(f"{self.label}: cannot read: {e.strerror or e}") from e
        if not any(name.strip() for name in row):
            raise self._empty()
        return row

    def header(self) -> list[str]:
        return [name.strip() for name in self._raw_header()]

    def read(self, names: Sequence[str] | None) -> RawTable:
        import pyarrow.csv as pacsv

        raw = self._raw_header()
        header = [name.strip() for name in raw]
        indices = self._pick(header, names)
        wanted = [raw[i] for i in indices]
        try:
            table = pacsv.read_csv(
                self.path,
                parse_options=pacsv.ParseOptions(delimiter=self.delimiter, newlines_in_values=True),
                convert_options=pacsv.ConvertOptions(
                    column_types={name: pa.string() for name in raw},
                    include_columns=wanted,
                    strings_can_be_null=False,
                    quoted_strings_can_be_null=False,
                ),
            )
        except pa.ArrowInvalid as e:
            raise self._explain(len(header), e) from None
        except OSError as e:
            raise TableError(f"{self.label}: cannot read: {e.strerror or e}") from e
        return RawTable(
            self.label,
            header,
            [table.column(i).combine_chunks() for i in range(len(wanted))],
            self._locate,
            [header[i] for i in indices],
        )

    def _rows(self):
        with self.path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=self.delimiter)
            next(reader, None)
            for row in reader:
                if row:  # A blank line, not a row.
                    yield row, reader.line_num

    def _locate(self, index: int) -> str:
        # Only on the error path: count rows as the reader did (blank lines skipped).
        for number, (_, line) in enumerate(self._rows(), start=1):
            if number == index + 1:
                return f"row {number} (line {line})"
        return f"row {index + 1}"

    def _explain(self, width: int, error: Exception) -> TableError:
        """A clear error for what pyarrow refused: a ragged row, or bad bytes."""
        try:
            for number, (row, line) in enumerate(self._rows(), start=1):
                if len(row) != width:
                    return TableError(
                        f"{self.label}, row {number} (line {line}) has {len(row)} fields but "
                        f"the header has {width}"
                    )
        except UnicodeDecodeError as e:
            return TableError(f"{self.label}: not UTF-8 text ({e.reason} at byte {e.start})")
        except csv.Error as e:
            return TableError(f"{self.label}: malformed CSV: {e}")
        return TableError(f"{self.label}: malformed CSV: {error}")


class Workbook(ClientFile):
    """One sheet of an Excel (.xlsx, .xlsm, .xls) or OpenDocument (.ods)
    workbook, read by python-calamine. The first non-blank row is the header;
    blank rows are skipped."""

    def __init__(self, path: pathlib.Path, label: str, sheet: str | None) -> None:
        super().__init__(path, label)
        self.sheet = sheet

    def _book(self):
        from python_calamine import CalamineWorkbook

        if not self.path.is_file():
            raise TableError(f"{self.label}: no such file")
        try:
            return CalamineWorkbook.from_path(str(self.path))
        except Exception as e:  # calamine raises its own error types per format.
            raise TableError(f"{self.label}: not a readable workbook: {e}") from e

    def sheet_names(self) -> list[str]:
        return list(self._book().sheet_names)

    def _cells(self) -> tuple[list[list[object]], int]:
        """The sheet's rows from its header on, and the header's sheet row (1-based)."""
        book = self._book()
        names = list(book.sheet_names)
        name = self._sheet_name(names)
        try:
            rows = book.get_sheet_by_name(name).to_python(skip_empty_area=False)
        except Exception as e:
            raise TableError(f"{self.label}: cannot read sheet {name!r}: {e}") from e
        for i, row in enumerate(rows):
            if any(_cell_text(c).strip() for c in row):
                return rows[i:], i + 1
        raise self._empty()

    def _sheet_name(self, names: list[str]) -> str:
        if not names:
            raise TableError(f"{self.label} has no sheets")
        if self.sheet is None:
            return names[0]
        if self.sheet in names:
            return self.sheet
        if self.sheet.isdigit() and int(self.sheet) < len(names):
            return names[int(self.sheet)]
        raise TableError(
            f"{self.path} has no sheet {self.sheet!r} (its sheets: {', '.join(names)}); "
            "choose one with #sheet=NAME or #sheet=INDEX (from 0), or #sheet=* for one "
            "client per sheet"
        )

    def header(self) -> list[str]:
        rows, _ = self._cells()
        return [_cell_text(c).strip() for c in rows[0]]

    def read(self, names: Sequence[str] | None) -> RawTable:
        rows, first = self._cells()
        header = [_cell_text(c).strip() for c in rows[0]]
        indices = self._pick(header, names)
        body = [
            (number, row)
            for number, row in enumerate(rows[1:], start=first + 1)
            if any(_cell_text(c).strip() for c in row)
        ]
        sheet_rows = [number for number, _ in body]
        columns = [pa.array([_cell_text(row[i]) for _, row in body], pa.string()) for i in indices]

        def locate(index: int) -> str:
            return f"row {index + 1} (sheet row {sheet_rows[index]})"

        return RawTable(self.label, header, columns, locate, [header[i] for i in indices])


def _cell_text(cell: object) -> str:
    """A workbook cell as the text a CSV export would hold: numbers in their
    shortest exact form (whole floats without '.0'), bools as true/false."""
    if isinstance(cell, str):
        return cell
    if isinstance(cell, bool):
        return "true" if cell else "false"
    if isinstance(cell, int):
        return str(cell)
    if isinstance(cell, float):
        if cell.is_integer() and abs(cell) < 2**53:
            return str(int(cell))
        return repr(cell)
    if isinstance(cell, datetime.date | datetime.time | datetime.timedelta):
        return cell.isoformat() if hasattr(cell, "isoformat") else str(cell)
    return "" if cell is None else str(cell)


class ParquetFile(ClientFile):
    """A Parquet file, read by pyarrow; columns keep their Parquet types."""

    def header(self) -> list[str]:
        import pyarrow.parquet as pq

        try:
            return list(pq.read_schema(self.path).names)
        except (OSError, pa.ArrowException) as e:
            raise TableError(f"{self.label}: not a readable Parquet file: {e}") from e

    def read(self, names: Sequence[str] | None) -> RawTable:
        import pyarrow.parquet as pq

        header = self.header()
        indices = self._pick(header, names)
        try:
            table = pq.read_table(self.path, columns=[header[i] for i in indices])
        except (OSError, pa.ArrowException) as e:
            raise TableError(f"{self.label}: not a readable Parquet file: {e}") from e
        columns = [table.column(i).combine_chunks() for i in range(len(indices))]
        return RawTable(
            self.label, header, columns, lambda i: f"row {i + 1}", [header[i] for i in indices]
        )


def column_kind(array: pa.Array) -> str:
    """What a column holds, as a silo advertises it (no values): int, float,
    bool, str, or empty (no value at all)."""
    kind = array.type
    if pa.types.is_integer(kind):
        return "int"
    if pa.types.is_floating(kind):
        return "float"
    if pa.types.is_boolean(kind):
        return "bool"
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        return "str" if pa.types.is_binary(kind) else "mixed"
    cells = pc.utf8_trim_whitespace(array.drop_null())
    cells = cells.filter(pc.not_equal(cells, ""))
    if len(cells) == 0:
        return "empty"
    if pc.all(pc.match_substring_regex(cells, r"^[+-]?[0-9]+$")).as_py():
        return "int"
    number = pc.match_substring_regex(cells, _FLOAT)
    special = pc.match_substring_regex(cells, r"^[+-]?(inf|infinity|nan)$", ignore_case=True)
    if pc.all(pc.or_(number, special)).as_py():
        return "float"
    if pc.all(pc.is_in(pc.utf8_lower(cells), pa.array(["true", "false"]))).as_py():
        return "bool"
    return "str"


def merge_kinds(a: str, b: str) -> str:
    """The kind of a column whose clients hold kinds `a` and `b`."""
    if a == b or b == "empty":
        return a
    if a == "empty":
        return b
    if {a, b} == {"int", "float"}:
        return "float"
    return "mixed"


class TFRecordFile(ClientFile):
    """A TFRecord file of ``tf.train.Example``: each record a row, each
    feature (a one-value list) a column; an absent feature is a missing cell.
    The header is the union of the first record's feature names."""

    def _check_readable(self) -> None:
        try:
            with self.path.open("rb") as f:
                f.read(12)
        except OSError as e:
            raise TableError(f"{self.label}: cannot read: {e.strerror or e}") from e

    def header(self) -> list[str]:
        # Before TensorFlow loads only readability is checked; names come with a read.
        self._check_readable()
        return []

    def _examples(self) -> list[dict[str, object]]:
        import tensorflow as tf

        self._check_readable()
        rows = []
        try:
            for record in tf.data.TFRecordDataset(str(self.path)).as_numpy_iterator():
                example = tf.train.Example.FromString(record)
                rows.append(dict(example.features.feature))
        except (tf.errors.OpError, ValueError) as e:
            raise TableError(f"{self.label}: not a TFRecord file of tf.train.Example: {e}") from e
        return rows

    def schema(self) -> tuple[list[tuple[str, str]], int]:
        table = self.read([])
        kinds = [(name, column_kind(array)) for name, array in zip(table.names, table.columns)]
        return kinds, table.num_rows

    def read(self, names: Sequence[str] | None) -> RawTable:
        rows = self._examples()
        if names is not None and not names:
            names = sorted({name for row in rows for name in row})
        header = sorted({name for row in rows for name in row})
        if names is None:
            indices = self._pick(header, None)
            names = [header[indices[0]]]
        else:
            missing = [n for n in names if n not in header]
            if rows and missing:
                raise TableError(
                    f"{self.label} has no feature {missing[0]!r} in any record (its features: "
                    f"{', '.join(header)}); the computation expects {', '.join(names)}"
                )
        columns = []
        for name in names:
            values: list[object] = []
            kinds = set()
            for number, row in enumerate(rows, start=1):
                feature = row.get(name)
                kind = feature.WhichOneof("kind") if feature is not None else None
                items = list(getattr(feature, kind).value) if kind else []
                if len(items) > 1:
                    raise TableError(
                        f"{self.label}, record {number}, feature {name!r} has {len(items)} "
                        "values; columns are scalars, one value per record"
                    )
                if not items:
                    values.append(None)
                    continue
                kinds.add(kind)
                item = items[0]
                values.append(item.decode("utf-8", "replace") if kind == "bytes_list" else item)
            if len(kinds) > 1:
                raise TableError(
                    f"{self.label}, feature {name!r} mixes {' and '.join(sorted(kinds))} "
                    "across records"
                )
            arrow_type = {
                "int64_list": pa.int64(),
                "float_list": pa.float32(),
                "bytes_list": pa.string(),
            }.get(next(iter(kinds), "bytes_list"))
            columns.append(pa.array(values, arrow_type))
        return RawTable(self.label, header, columns, lambda i: f"record {i + 1}", list(names))


def open_client(part: object) -> ClientFile:
    """The reader of a `ClientPart` (path, format, sheet)."""
    path: pathlib.Path = part.path  # type: ignore[attr-defined]
    fmt: str = part.format  # type: ignore[attr-defined]
    label: str = part.label  # type: ignore[attr-defined]
    if fmt == "csv":
        return DelimitedFile(path, label, ",")
    if fmt == "tsv":
        return DelimitedFile(path, label, "\t")
    if fmt in _WORKBOOKS:
        return Workbook(path, label, part.sheet)  # type: ignore[attr-defined]
    if fmt == "parquet":
        return ParquetFile(path, label)
    if fmt == "tfrecord":
        return TFRecordFile(path, label)
    raise TableError(f"{label}: unknown format {fmt!r}; use one of {', '.join(FORMATS)}")


# --------------------------------------------------------------- conversion


@dataclass(frozen=True)
class Column:
    """A column the element type asks for; `name` is None for a plain scalar."""

    name: str | None
    dtype: np.dtype


def dtype_name(dtype: np.dtype) -> str:
    return "str (tf.string)" if dtype.kind == "U" else dtype.name


def numpy_spelling(dtype: np.dtype) -> str:
    return "np.str_" if dtype.kind == "U" else f"np.{dtype.name}"


def is_supported(dtype: np.dtype) -> bool:
    # Kind alone would admit bfloat16 ('V') or complex ('c'); itemsize rules out float128.
    return dtype.kind == "U" or (dtype.kind in "biuf" and dtype.itemsize <= 8)


class Converter:
    """Casts a `RawTable`'s columns to the requested dtypes under a missing
    policy; errors are `TableError`s naming file, row and column."""

    def __init__(self, columns: Sequence[Column], missing: MissingPolicy) -> None:
        self.columns = list(columns)
        self.missing = missing

    def convert(self, table: RawTable) -> tuple[list[np.ndarray], MissingCounts]:
        counts = MissingCounts()
        n = table.num_rows
        arrays: list[np.ndarray] = []
        masks: list[np.ndarray] = []
        for column, array, name in zip(self.columns, table.columns, table.names, strict=True):
            values, missing = self._column(table, column, name, array)
            arrays.append(values)
            masks.append(missing)
        any_missing = np.zeros(n, dtype=bool)
        for mask in masks:
            any_missing |= mask
        if self.missing.mode == "drop-row" and any_missing.any():
            keep = ~any_missing
            counts.dropped_rows = int(any_missing.sum())
            counts.dropped_cells = int(sum(int(m.sum()) for m in masks))
            arrays = [a[keep] for a in arrays]
        elif self.missing.mode == "fill":
            counts.filled_cells = int(sum(int(m.sum()) for m in masks))
        return arrays, counts

    def _column(
        self, table: RawTable, column: Column, name: str, array: pa.Array
    ) -> tuple[np.ndarray, np.ndarray]:
        """The column's values, and a mask of its missing cells (already
        filled under fill:, placeholders under drop-row)."""
        dtype = column.dtype
        text = pa.types.is_string(array.type) or pa.types.is_large_string(array.type)
        nulls = array.is_null().to_numpy(zero_copy_only=False)
        if text:
            trimmed = pc.utf8_trim_whitespace(array.fill_null(""))
            blank = nulls if dtype.kind == "U" else (nulls | _np(pc.equal(trimmed, "")))
        else:
            trimmed = None
            blank = nulls
        cell_error = self._cell_error(table, name, dtype)
        if blank.any():
            if self.missing.mode == "error":
                first = int(np.argmax(blank))
                shown = "" if text and not nulls[first] else None
                raise cell_error(first, shown, _blank_reason(dtype))
        if text:
            values = _from_text(trimmed, array, dtype, blank, cell_error)
        else:
            values = _from_typed(array, dtype, blank, cell_error)
        if blank.any() and self.missing.mode == "fill":
            values = values.copy()
            fill = self._fill_value(name, dtype)
            values[blank] = fill
        return values, blank

    def _fill_value(self, name: str, dtype: np.dtype) -> object:
        try:
            return parser_for(dtype)(self.missing.fill or "")
        except ValueError as e:
            raise TableError(
                f"missing=fill:{self.missing.fill} cannot fill column {name!r} "
                f"({dtype_name(dtype)}): {e}"
            ) from None

    @staticmethod
    def _cell_error(
        table: RawTable, name: str, dtype: np.dtype
    ) -> Callable[[int, object, str], TableError]:
        def error(index: int, cell: object, reason: str) -> TableError:
            shown = "a blank cell" if cell is None else repr(cell)
            return TableError(
                f"{table.label}, {table.locate(index)}, column {name!r}: cannot parse "
                f"{shown} as {dtype_name(dtype)}: {reason}"
            )

        return error


def _blank_reason(dtype: np.dtype) -> str:
    first = (
        "expected a whole number"
        if dtype.kind in "iu"
        else ("expected true, false, 1 or 0" if dtype.kind == "b" else "expected a number")
    )
    return (
        f"{first} (a blank cell: to drop its row or fill it, add #missing=drop-row or "
        "#missing=fill:VALUE to the --data flag)"
    )


def _np(array: pa.Array) -> np.ndarray:
    # A writable copy: zero-copy views of Arrow buffers are read-only.
    return np.array(array.to_numpy(zero_copy_only=False))


def _cast(text: pa.Array, to: pa.DataType, ok: np.ndarray) -> np.ndarray:
    """`text` cast to `to`; if Arrow refuses any cell (e.g. '1e400'), every
    cell is left to the per-cell parser (`ok` cleared)."""
    try:
        return _np(pc.cast(text, to))
    except pa.ArrowInvalid:
        ok[:] = False
        return np.zeros(len(text), to.to_pandas_dtype())


def _from_text(
    trimmed: pa.Array,
    raw: pa.Array,
    dtype: np.dtype,
    blank: np.ndarray,
    error: Callable[[int, object, str], TableError],
) -> np.ndarray:
    """Text cells as `dtype`: the vectorized path where it is certain, the
    strict per-cell parser for every other cell (its error is the answer)."""
    n = len(raw)
    if dtype.kind == "U":
        # tf.string tensors come from object arrays of bytes (also when empty).
        return _np(raw.fill_null("").cast(pa.binary())).astype(object)
    if dtype.kind == "b":
        lowered = pc.utf8_lower(trimmed)
        truth = _np(pc.is_in(lowered, pa.array(sorted(_TRUE))))
        falsity = _np(pc.is_in(lowered, pa.array(sorted(_FALSE))))
        values = truth.copy()
        bad = ~(truth | falsity) & ~blank
    elif dtype.kind in "iu":
        ok = _np(pc.match_substring_regex(trimmed, r"^[+-]?[0-9]{1,18}$"))
        unsigned = pc.replace_substring_regex(trimmed, r"^\+", "")
        as_int = _cast(pc.if_else(pa.array(ok), unsigned, "0"), pa.int64(), ok)
        info = np.iinfo(dtype)
        ok &= (as_int >= max(info.min, np.iinfo(np.int64).min)) & (
            as_int <= min(info.max, np.iinfo(np.int64).max)
        )
        values = np.where(ok, as_int, 0).astype(dtype)
        bad = ~ok & ~blank
    else:
        ok = _np(pc.match_substring_regex(trimmed, _FLOAT))
        as_float = _cast(pc.if_else(pa.array(ok), trimmed, "0"), pa.float64(), ok)
        largest = float(np.finfo(dtype).max)
        ok &= np.abs(as_float) <= largest
        values = np.where(ok, as_float, 0.0).astype(dtype)
        bad = ~ok & ~blank
    if bad.any():
        parse = parser_for(dtype)
        cells = raw.to_pylist()
        for index in np.flatnonzero(bad):
            cell = cells[index]
            try:
                values[index] = parse(cell)
            except ValueError as e:
                raise error(int(index), cell, str(e)) from None
    return values if n else np.zeros(0, dtype)


def _from_typed(
    array: pa.Array,
    dtype: np.dtype,
    blank: np.ndarray,
    error: Callable[[int, object, str], TableError],
) -> np.ndarray:
    """Typed cells (Parquet, TFRecord) as `dtype`: lossless or an error."""
    kind = array.type
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        if dtype.kind == "U":
            return _np(array.fill_null(b"")).astype(object)
        raise error(0, None, f"the column holds bytes ({kind}), not numbers")
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)):
        raise error(0, None, f"the column has type {kind}, which cannot be read as this dtype")
    source = _np(array.fill_null(False if pa.types.is_boolean(kind) else 0))
    valid = ~blank
    if dtype.kind == "U":
        raise error(0, None, f"the column holds {kind} values, not text; declare it as a number")
    if dtype.kind == "b":
        bad = valid & ~np.isin(source.astype(np.float64), (0.0, 1.0))
        reason = "expected true, false, 1 or 0"
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        as_float = source.astype(np.float64)
        whole = np.isfinite(as_float) & (np.floor(as_float) == as_float)
        if pa.types.is_integer(kind):
            # Exact comparison for 64-bit integers (a float64 view would round).
            in_range = (source >= info.min) & (source <= info.max)
        else:
            in_range = (as_float >= info.min) & (as_float <= info.max)
        bad = valid & ~(whole & in_range)
        reason = f"expected a whole number in [{info.min}, {info.max}]"
    else:
        as_float = source.astype(np.float64)
        bad = valid & np.isfinite(as_float) & (np.abs(as_float) > float(np.finfo(dtype).max))
        reason = f"out of range for {dtype.name}"
    if bad.any():
        index = int(np.argmax(bad))
        raise error(index, source[index].item(), reason)
    return np.where(valid, source, 0).astype(dtype)


def parser_for(dtype: np.dtype) -> Callable[[str], object]:
    """A strict cell parser: it raises ValueError instead of guessing."""
    if dtype.kind == "U":
        return lambda cell: cell.encode("utf-8")
    if dtype.kind == "b":
        return _parse_bool
    if dtype.kind in "iu":
        info = np.iinfo(dtype)

        def parse_int(cell: str) -> int:
            text = cell.strip()
            if not _INTEGER.match(text):
                raise ValueError("expected a whole number")
            number = int(text)
            if not info.min <= number <= info.max:
                raise ValueError(f"out of range [{info.min}, {info.max}]")
            return number

        return parse_int
    largest = float(np.finfo(dtype).max)

    def parse_float(cell: str) -> float:
        text = cell.strip()
        # float() also accepts '1_000'; a cell like that is more likely a mistake.
        if not text or "_" in text:
            raise ValueError("expected a number")
        try:
            number = float(text)
        except ValueError:
            raise ValueError("expected a number") from None
        if math.isfinite(number) and abs(number) > largest:
            raise ValueError(f"out of range for {dtype.name} (largest {largest:g})")
        return number

    return parse_float


def _parse_bool(cell: str) -> bool:
    text = cell.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError("expected true, false, 1 or 0")
