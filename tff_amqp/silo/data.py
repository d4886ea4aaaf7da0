"""A silo's local data, resolved into CLIENTS-placed TFF values.

A silo is started with ``--data KEY=PATH[#options]`` (`tff_amqp.silo.sources`):
one data file per client, or one sheet per client. When a computation's
argument is ``silo_data(KEY)``, the silo reads its files here
(`tff_amqp.silo.tables`) and hands its worker one ``tf.data.Dataset`` per
client; the rows never leave the silo.

The element type the computation expects decides what is read: a named struct
of scalars selects columns by name (other columns are ignored, their order in
the file does not matter) and casts each to its dtype; a plain scalar element
type needs a one-column file. Cells are parsed strictly, so a typo in the data
is an error naming the file, row and column instead of a silently wrong
aggregate. Blank cells follow the key's missing-value policy; how many were
dropped or filled is logged here, at the silo, and sent nowhere.

Everything here blocks (file reads, TensorFlow graph serialization); callers on
an event loop run it in a thread.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterable

import numpy as np
import tensorflow as tf
from tensorflow_federated.proto.v0 import executor_pb2
from tensorflow_federated.python.common_libs import structure
from tensorflow_federated.python.core.impl.executors import value_serialization
from tensorflow_federated.python.core.impl.types import computation_types, placements

from tff_amqp.protocol import DataSchema
from tff_amqp.silo.sources import ClientPart, DataError, DataSource
from tff_amqp.silo.tables import (
    SUPPORTED,
    Column,
    Converter,
    MissingCounts,
    TableError,
    _WrongWidth,
    dtype_name,
    is_supported,
    merge_kinds,
    numpy_spelling,
    open_client,
)

log = logging.getLogger(__name__)

__all__ = ["DataError", "DataSource", "SiloDataStore"]


class SiloDataStore:
    """The data one silo serves, by key."""

    def __init__(self, silo: str, sources: Iterable[DataSource]) -> None:
        self.silo = silo
        self._sources: dict[str, DataSource] = {}
        for source in sources:
            if source.key in self._sources:
                raise DataError(
                    f"--data {source.key}=... given twice "
                    f"({self._sources[source.key].where} and {source.where}); use one path "
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
        """How many clients this silo holds under `key` (files are listed, not
        read; a URL's cached copy is used as it is)."""
        return len(self._client_parts(key, fresh=False))

    def default_num_clients(self) -> int:
        """Clients under the first data key, else 0 (what `status` shows)."""
        if not self._sources:
            return 0
        return self.num_clients(next(iter(self._sources)))

    def schemas(self, *, counts: bool = False) -> tuple[DataSchema, ...]:
        """Per data key, the columns every client has and their kinds, for the
        silo's hello: names and kinds only, the row count only with `counts`.
        A key without clients, or whose files cannot be read now, is left out
        (the coordinator then checks nothing for it; reading reports why)."""
        schemas = []
        for key, source in self._sources.items():
            try:
                # A URL's cached copy as it is: advertising never fetches.
                parts = source.client_parts(fresh=False)
                columns: dict[str, str] | None = None
                rows = 0
                for part in parts:
                    kinds, part_rows = open_client(part).schema()
                    found = dict(kinds)
                    rows += part_rows
                    if columns is None:
                        columns = found
                    else:
                        columns = {
                            name: merge_kinds(kind, found[name])
                            for name, kind in columns.items()
                            if name in found
                        }
            except (DataError, TableError) as e:
                log.warning("data schema unavailable", extra={"key": key, "error": str(e)})
                continue
            if columns is None:
                continue
            schemas.append(DataSchema(key, tuple(columns.items()), rows if counts else None))
        return tuple(schemas)

    def client_datasets(
        self, key: str, element_type: computation_types.Type
    ) -> list[tf.data.Dataset]:
        """One dataset per client, its elements typed as `element_type` asks."""
        columns = self._columns_for(key, element_type)
        source = self._source(key)
        converter = Converter(columns, source.missing)
        counts = MissingCounts()
        datasets = []
        for part in self._client_parts(key):
            arrays, part_counts = self._read(key, part, columns, converter)
            counts.add(part_counts)
            if columns[0].name is None:
                datasets.append(tf.data.Dataset.from_tensor_slices(arrays[0]))
            else:
                # An OrderedDict in the element type's field order: TFF checks that
                # the dataset's element structure matches the type, order included.
                fields = collections.OrderedDict(
                    (c.name, a) for c, a in zip(columns, arrays, strict=True)
                )
                datasets.append(tf.data.Dataset.from_tensor_slices(fields))
        if counts.dropped_rows or counts.filled_cells:
            # Logged here only: how much data was missing stays at the silo.
            log.info(
                "missing values handled",
                extra={
                    "silo": self.silo,
                    "key": key,
                    "policy": str(source.missing),
                    "dropped_rows": counts.dropped_rows,
                    "dropped_cells": counts.dropped_cells,
                    "filled_cells": counts.filled_cells,
                },
            )
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

    def _client_parts(self, key: str, *, fresh: bool = True) -> list[ClientPart]:
        try:
            return self._source(key).client_parts(fresh=fresh)
        except DataError as e:
            if e.silo is None:
                raise e.at_silo(self.silo) from None
            raise

    def _columns_for(self, key: str, element_type: computation_types.Type) -> list[Column]:
        """The CSV columns and dtypes `element_type` asks for, in its order."""
        if isinstance(element_type, computation_types.TensorType):
            return [Column(None, self._scalar_dtype(key, "element", element_type))]
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
                columns.append(Column(name, self._scalar_dtype(key, f"field {name!r}", field_type)))
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
        if not is_supported(dtype):
            raise self._error(
                key,
                f"{what} has dtype {dtype.name}, which CSV data does not support ({SUPPORTED})",
            )
        return dtype

    def _read(
        self, key: str, part: ClientPart, columns: list[Column], converter: Converter
    ) -> tuple[list[np.ndarray], MissingCounts]:
        """Reads `columns` of one client, strictly parsed and cast."""
        names = None if columns[0].name is None else [str(c.name) for c in columns]
        try:
            table = open_client(part).read(names)
            arrays, counts = converter.convert(table)
        except _WrongWidth as e:
            header = e.header
            raise self._error(
                key,
                f"{part.label} has {len(header)} columns ({', '.join(header)}) but the element "
                f"type is a plain {dtype_name(columns[0].dtype)} scalar, which needs a "
                "one-column file; declare a named element type to pick columns, e.g. "
                f"OrderedDict({header[0] or 'x'}={numpy_spelling(columns[0].dtype)})",
            ) from None
        except TableError as e:
            raise self._error(key, str(e)) from None
        log.debug(
            "read client file", extra={"key": key, "file": part.label, "rows": len(arrays[0])}
        )
        return arrays, counts
