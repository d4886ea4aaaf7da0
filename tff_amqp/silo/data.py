"""A silo's local CSV data, resolved into CLIENTS-placed TFF values.

A silo is started with ``--data KEY=PATH``. PATH is one CSV file (one client)
or a folder of CSV files (one client per ``*.csv``, in file-name order). When a
computation's argument is ``silo_data(KEY)``, the silo reads its files here and
hands its worker one ``tf.data.Dataset`` per client; the rows never leave the
silo.

The element type the computation expects decides what is read: a named struct
of scalars selects CSV columns by name (other columns are ignored, their order
in the file does not matter) and casts each to its dtype; a plain scalar
element type needs a one-column file. Cells are parsed strictly, so a typo in
the data is an error naming the file, row and column instead of a silently
wrong aggregate.

Everything here blocks (file reads, TensorFlow graph serialization); callers on
an event loop run it in a thread.
"""

from __future__ import annotations

import collections
import csv
import logging
import math
import pathlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
from tensorflow_federated.proto.v0 import executor_pb2
from tensorflow_federated.python.common_libs import structure
from tensorflow_federated.python.core.impl.executors import value_serialization
from tensorflow_federated.python.core.impl.types import computation_types, placements

log = logging.getLogger(__name__)

# Same rule as `tff_amqp.silo_data(KEY)`, so every valid flag can be referenced.
_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_INTEGER = re.compile(r"^[+-]?[0-9]+$")
_TRUE = frozenset({"true", "1"})
_FALSE = frozenset({"false", "0"})
_SUPPORTED = (
    "bool, int8, int16, int32, int64, uint8, uint16, uint32, uint64, "
    "float16, float32, float64, str (tf.string)"
)


class DataError(ValueError):
    """Silo data could not be resolved; the message says where and what to do.

    Raised from a silo it names the silo and the data key. `DataSource.parse`
    runs before a silo exists, so its errors name the offending flag instead.
    """

    def __init__(self, problem: str, *, silo: str | None = None, key: str | None = None) -> None:
        self.problem = problem
        self.silo = silo
        self.key = key
        where = []
        if silo is not None:
            where.append(f"silo {silo!r}")
        if key is not None:
            where.append(f"data {key!r}")
        super().__init__(f"{', '.join(where)}: {problem}" if where else problem)

    def at_silo(self, silo: str) -> DataError:
        """The same error, attributed to `silo` (sources do not know their silo)."""
        return DataError(self.problem, silo=silo, key=self.key)


@dataclass(frozen=True)
class DataSource:
    """One ``--data KEY=PATH`` flag: a key and a CSV file or folder of CSV files."""

    key: str
    path: pathlib.Path

    def __post_init__(self) -> None:
        if not _KEY.match(self.key):
            raise DataError(
                f"invalid data key {self.key!r}: use 1-128 letters, digits, '_', '.' or '-' "
                "(the same KEY the coordinator passes to tff_amqp.silo_data(KEY))"
            )

    @classmethod
    def parse(cls, flag: str) -> DataSource:
        """Parses ``KEY=PATH`` and checks PATH now, so a typo fails at startup."""
        key, sep, raw_path = flag.partition("=")
        if not sep:
            raise DataError(
                f"--data {flag!r}: expected KEY=PATH, e.g. --data patients=/srv/patients/ "
                "(a CSV file, or a folder with one CSV file per client)"
            )
        if not raw_path.strip():
            raise DataError(f"--data {flag!r}: PATH is empty; give a CSV file or a folder")
        try:
            source = cls(key, pathlib.Path(raw_path).expanduser())
        except DataError as e:
            raise DataError(f"--data {flag!r}: {e.problem}") from None
        try:
            source.client_files()
        except DataError as e:
            raise DataError(f"--data {flag!r}: {e.problem}") from None
        return source

    def client_files(self) -> list[pathlib.Path]:
        """The CSV file of each client, in the order clients are numbered. A
        folder without CSV files is a silo with no clients under this key (a
        ward with no patients yet): it takes part in invocations with 0
        clients, and its aggregates are the zero."""
        if self.path.is_dir():
            return sorted(
                (p for p in self.path.iterdir() if _is_csv(p) and p.is_file()),
                key=lambda p: p.name,
            )
        if self.path.is_file():
            if not _is_csv(self.path):
                raise DataError(
                    f"{str(self.path)!r} is not a .csv file; give a CSV file (one client) "
                    "or a folder of CSV files (one client each)",
                    key=self.key,
                )
            return [self.path]
        if self.path.exists():
            raise DataError(
                f"{str(self.path)!r} is neither a file nor a folder; give a CSV file or a "
                "folder of CSV files",
                key=self.key,
            )
        raise DataError(
            f"{str(self.path)!r} does not exist; give a CSV file or a folder of CSV files",
            key=self.key,
        )


def _is_csv(path: pathlib.Path) -> bool:
    return path.suffix.lower() == ".csv"


@dataclass(frozen=True)
class _Column:
    """A column the element type asks for; `name` is None for a plain scalar."""

    name: str | None
    dtype: np.dtype


class SiloDataStore:
    """The data one silo serves, by key."""

    def __init__(self, silo: str, sources: Iterable[DataSource]) -> None:
        self.silo = silo
        self._sources: dict[str, DataSource] = {}
        for source in sources:
            if source.key in self._sources:
                raise DataError(
                    f"--data {source.key}=... given twice "
                    f"({self._sources[source.key].path} and {source.path}); use one path "
                    "per key",
                    silo=silo,
                    key=source.key,
                )
            self._sources[source.key] = source

    @property
    def keys(self) -> list[str]:
        """Data keys in the order the flags were given."""
        return list(self._sources)

    def num_clients(self, key: str) -> int:
        """How many clients this silo holds under `key` (files are listed, not read)."""
        return len(self._client_files(key))

    def default_num_clients(self) -> int:
        """Clients under the first data key, else 0 (what `status` shows)."""
        if not self._sources:
            return 0
        return self.num_clients(next(iter(self._sources)))

    def client_datasets(
        self, key: str, element_type: computation_types.Type
    ) -> list[tf.data.Dataset]:
        """One dataset per client, its elements typed as `element_type` asks."""
        columns = self._columns_for(key, element_type)
        datasets = []
        for path in self._client_files(key):
            arrays = self._read(key, path, columns)
            if columns[0].name is None:
                datasets.append(tf.data.Dataset.from_tensor_slices(arrays[0]))
            else:
                # An OrderedDict in the element type's field order: TFF checks that
                # the dataset's element structure matches the type, order included.
                fields = collections.OrderedDict(
                    (c.name, a) for c, a in zip(columns, arrays, strict=True)
                )
                datasets.append(tf.data.Dataset.from_tensor_slices(fields))
        return datasets

    def federated_value(
        self, key: str, type_spec: computation_types.FederatedType
    ) -> executor_pb2.Value:
        """This silo's clients' data under `key`, serialized as a value of `type_spec`."""
        if not (
            isinstance(type_spec, computation_types.FederatedType)
            and type_spec.placement is placements.CLIENTS
            and not type_spec.all_equal
            and isinstance(type_spec.member, computation_types.SequenceType)
        ):
            raise DataError(
                f"the computation expects {type_spec} here, but silo data is per-client "
                "sequences: pass silo_data(KEY) where the type is {T*}@CLIENTS",
                silo=self.silo,
                key=key,
            )
        datasets = self.client_datasets(key, type_spec.member.element)
        try:
            value, _ = value_serialization.serialize_value(datasets, type_spec)
        except (TypeError, ValueError) as e:
            raise DataError(
                f"cannot serialize the data as {type_spec}: {e}", silo=self.silo, key=key
            ) from e
        log.info(
            "silo data resolved",
            extra={"silo": self.silo, "key": key, "clients": len(datasets)},
        )
        return value

    # ---------------------------------------------------------------- helpers

    def _error(self, key: str, problem: str) -> DataError:
        return DataError(problem, silo=self.silo, key=key)

    def _source(self, key: str) -> DataSource:
        try:
            return self._sources[key]
        except KeyError:
            known = ", ".join(repr(k) for k in self._sources) or "none"
            raise self._error(
                key,
                f"no such data key on this silo (it has: {known}); start the silo with "
                f"--data {key}=PATH",
            ) from None

    def _client_files(self, key: str) -> list[pathlib.Path]:
        try:
            return self._source(key).client_files()
        except DataError as e:
            if e.silo is None:
                raise e.at_silo(self.silo) from None
            raise

    def _columns_for(self, key: str, element_type: computation_types.Type) -> list[_Column]:
        """The CSV columns and dtypes `element_type` asks for, in its order."""
        if isinstance(element_type, computation_types.TensorType):
            return [_Column(None, self._scalar_dtype(key, "element", element_type))]
        if isinstance(element_type, computation_types.StructType):
            columns = []
            for name, field_type in structure.iter_elements(element_type):
                if not name:
                    raise self._error(
                        key,
                        f"element type {element_type} has unnamed fields; name every field "
                        "after its CSV column, e.g. OrderedDict(age=np.int32, glucose=np.float32)",
                    )
                if not isinstance(field_type, computation_types.TensorType):
                    raise self._error(
                        key,
                        f"field {name!r} of element type {element_type} is {field_type}; "
                        "CSV data supports only scalar fields, one per column",
                    )
                columns.append(
                    _Column(name, self._scalar_dtype(key, f"field {name!r}", field_type))
                )
            if not columns:
                raise self._error(key, "element type is an empty struct; name at least one column")
            return columns
        raise self._error(
            key,
            f"element type {element_type} is not supported for CSV data; use a named struct "
            "of scalars, e.g. tff.SequenceType(OrderedDict(age=np.int32, glucose=np.float32))",
        )

    def _scalar_dtype(
        self, key: str, what: str, tensor_type: computation_types.TensorType
    ) -> np.dtype:
        if tensor_type.shape != ():
            raise self._error(
                key,
                f"{what} has shape {tensor_type.shape}; CSV cells are scalars, so declare "
                "shape () and one field per column",
            )
        dtype = np.dtype(tensor_type.dtype)
        if not _is_supported(dtype):
            raise self._error(
                key,
                f"{what} has dtype {dtype.name}, which CSV data does not support ({_SUPPORTED})",
            )
        return dtype

    def _read(self, key: str, path: pathlib.Path, columns: list[_Column]) -> list[np.ndarray]:
        """Reads `columns` of one client's file, strictly parsed and cast."""
        try:
            with path.open(newline="", encoding="utf-8-sig") as f:
                return self._parse(key, path, f, columns)
        except UnicodeDecodeError as e:
            raise self._error(key, f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
        except csv.Error as e:
            raise self._error(key, f"{path}: malformed CSV: {e}") from e
        except OSError as e:
            raise self._error(key, f"{path}: cannot read: {e.strerror or e}") from e

    def _parse(
        self,
        key: str,
        path: pathlib.Path,
        lines: Iterable[str],
        columns: list[_Column],
    ) -> list[np.ndarray]:
        reader = csv.reader(lines)
        header = [name.strip() for name in next(reader, [])]
        if not any(header):
            raise self._error(
                key, f"{path} is empty; its first row must be a header naming the columns"
            )
        if columns[0].name is None:
            if len(header) != 1:
                raise self._error(
                    key,
                    f"{path} has {len(header)} columns ({', '.join(header)}) but the element "
                    f"type is a plain {_name(columns[0].dtype)} scalar, which needs a one-column "
                    "file; declare a named element type to pick columns, e.g. "
                    f"OrderedDict({header[0] or 'x'}={_numpy_spelling(columns[0].dtype)})",
                )
            indices = [0]
        else:
            indices = []
            for column in columns:
                found = [i for i, name in enumerate(header) if name == column.name]
                if not found:
                    raise self._error(
                        key,
                        f"{path} has no column {column.name!r} (its header row has: "
                        f"{', '.join(header)}); the computation expects columns "
                        f"{', '.join(str(c.name) for c in columns)}, named in the CSV header",
                    )
                if len(found) > 1:
                    raise self._error(
                        key, f"{path} has {len(found)} columns named {column.name!r}; rename one"
                    )
                indices.append(found[0])

        parsers = [_parser_for(c.dtype) for c in columns]
        values: list[list[object]] = [[] for _ in columns]
        row_number = 0
        for row in reader:
            if not row:  # A blank line, not a row.
                continue
            row_number += 1
            line = reader.line_num  # Differs from row_number + 1 with blank or multi-line rows.
            if len(row) != len(header):
                raise self._error(
                    key,
                    f"{path}, row {row_number} (line {line}) has {len(row)} fields but the "
                    f"header has {len(header)}",
                )
            for column, index, parse, out in zip(columns, indices, parsers, values, strict=True):
                cell = row[index]
                try:
                    out.append(parse(cell))
                except ValueError as e:
                    column_name = column.name if column.name is not None else header[0]
                    raise self._error(
                        key,
                        f"{path}, row {row_number} (line {line}), column {column_name!r}: "
                        f"cannot parse {cell!r} as {_name(column.dtype)}: {e}",
                    ) from None
        log.debug("read client file", extra={"key": key, "file": str(path), "rows": row_number})
        return [_to_array(v, c.dtype) for v, c in zip(values, columns, strict=True)]


def _name(dtype: np.dtype) -> str:
    return "str (tf.string)" if dtype.kind == "U" else dtype.name


def _numpy_spelling(dtype: np.dtype) -> str:
    return "np.str_" if dtype.kind == "U" else f"np.{dtype.name}"


def _is_supported(dtype: np.dtype) -> bool:
    # Kind alone would admit bfloat16 ('V') or complex ('c'); itemsize rules out float128.
    return dtype.kind == "U" or (dtype.kind in "biuf" and dtype.itemsize <= 8)


def _parser_for(dtype: np.dtype) -> Callable[[str], object]:
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
        # float() also accepts '1_000'; a CSV cell like that is more likely a mistake.
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


def _to_array(values: list[object], dtype: np.dtype) -> np.ndarray:
    if dtype.kind == "U":
        # tf.string tensors come from object arrays of bytes (also when empty).
        return np.array(values, dtype=object)
    return np.array(values, dtype=dtype)
