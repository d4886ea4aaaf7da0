"""A silo's CSV files become exactly the CLIENTS-placed value a computation expects.

No broker here: these check the file-to-dataset mapping (clients, columns,
dtypes, order) and that every data mistake is an error saying which silo,
key, file, row and column, so a federation never aggregates silently wrong
data.
"""

from __future__ import annotations

import collections
import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff
from tensorflow_federated.python.core.impl.executors import value_serialization
from tensorflow_federated.python.core.impl.types import (
    computation_types,
    placements,
    type_serialization,
)

from tff_amqp.silo.data import DataError, DataSource, SiloDataStore

SILO = "clinic-north"


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def at_clients(element: object) -> computation_types.FederatedType:
    return computation_types.FederatedType(
        computation_types.SequenceType(element), placements.CLIENTS
    )


def over_the_wire(type_spec: computation_types.Type) -> computation_types.Type:
    """The type as a silo sees it: serialized by the coordinator, Python containers lost."""
    return type_serialization.deserialize_type(type_serialization.serialize_type(type_spec))


def rows_of(dataset: tf.data.Dataset) -> list[tuple[object, ...]]:
    return [tuple(v.numpy() for v in element.values()) for element in dataset]


def store_of(path: Path, key: str = "readings") -> SiloDataStore:
    return SiloDataStore(SILO, [DataSource(key, path)])


ROW = collections.OrderedDict(age=np.int32, glucose=np.float32)


@pytest.fixture
def ward_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "wards"
    # Written out of order, plus a file that is not a client.
    write_csv(folder / "ward_b.csv", ["age", "glucose"], [[40, 5.5]])
    write_csv(folder / "ward_c.csv", ["age", "glucose"], [[50, 6.5], [51, 6.75]])
    write_csv(folder / "ward_a.csv", ["age", "glucose"], [[30, 4.5], [31, 4.25], [32, 4.0]])
    (folder / "README.txt").write_text("not a client")
    return folder


def test_folder_gives_one_client_per_csv_file_in_name_order(ward_folder: Path) -> None:
    store = store_of(ward_folder)
    assert store.keys == ["readings"]
    assert store.num_clients("readings") == 3
    assert store.default_num_clients() == 3
    assert [p.name for p in DataSource("readings", ward_folder).client_files()] == [
        "ward_a.csv",
        "ward_b.csv",
        "ward_c.csv",
    ]

    type_spec = at_clients(ROW)
    value = store.federated_value("readings", type_spec)
    datasets, value_type = value_serialization.deserialize_value(value, type_spec)
    assert value_type.is_equivalent_to(type_spec)
    assert [rows_of(ds) for ds in datasets] == [
        [(30, np.float32(4.5)), (31, np.float32(4.25)), (32, np.float32(4.0))],
        [(40, np.float32(5.5))],
        [(50, np.float32(6.5)), (51, np.float32(6.75))],
    ]


def test_single_file_is_one_client_and_a_silo_without_data_has_none(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "only.csv", ["age", "glucose"], [[1, 2.0]])
    assert store_of(path).num_clients("readings") == 1
    assert SiloDataStore(SILO, []).default_num_clients() == 0
    assert SiloDataStore(SILO, []).keys == []


def test_columns_by_name_cast_in_type_order_extras_ignored(tmp_path: Path) -> None:
    # Field order is not alphabetical and differs from the file's column order;
    # only a type that crossed the wire (no OrderedDict container) reaches a silo.
    element = collections.OrderedDict(
        zeta=np.int64, alpha=np.float64, flag=np.bool_, name=np.str_, small=np.uint8
    )
    type_spec = over_the_wire(at_clients(element))
    assert type(type_spec.member.element) is computation_types.StructType
    path = write_csv(
        tmp_path / "c.csv",
        ["notes", "flag", "small", "alpha", "name", "zeta"],
        [
            ["secret", "true", "255", "1e-3", "Zoë", "-9000000000"],
            ["x", " FALSE ", "0", "-2.5", " padded ", "+7"],
            ["y", "1", "7", "inf", "", "0"],
        ],
    )
    value = store_of(path).federated_value("readings", type_spec)
    [dataset], _ = value_serialization.deserialize_value(value, type_spec)

    assert list(dataset.element_spec) == ["zeta", "alpha", "flag", "name", "small"]
    assert [s.dtype for s in dataset.element_spec.values()] == [
        tf.int64,
        tf.float64,
        tf.bool,
        tf.string,
        tf.uint8,
    ]
    assert rows_of(dataset) == [
        (-9_000_000_000, 1e-3, True, "Zoë".encode(), 255),
        (7, -2.5, False, b" padded ", 0),
        (0, np.inf, True, b"", 7),
    ]


def test_plain_scalar_element_reads_a_one_column_file(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "one.csv", ["glucose"], [[1.5], [2.5]])
    [dataset] = store_of(path).client_datasets("readings", computation_types.TensorType(np.float16))
    assert dataset.element_spec == tf.TensorSpec([], tf.float16)
    assert [x.numpy() for x in dataset] == [np.float16(1.5), np.float16(2.5)]


def test_header_only_file_is_an_empty_client(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "empty.csv", ["age", "glucose", "name"], [])
    element = collections.OrderedDict(age=np.int32, name=np.str_)
    [dataset] = store_of(path).client_datasets("readings", computation_types.to_type(element))
    assert list(dataset) == []
    assert dataset.element_spec["name"].dtype == tf.string


def test_a_tff_computation_consumes_the_value(ward_folder: Path) -> None:
    type_spec = at_clients(ROW)
    value = store_of(ward_folder).federated_value("readings", type_spec)
    datasets, _ = value_serialization.deserialize_value(value, type_spec)

    @tff.tensorflow.computation(tff.SequenceType(ROW))
    def glucose_sum(rows: tf.data.Dataset) -> tf.Tensor:
        return rows.reduce(np.float32(0.0), lambda total, row: total + row["glucose"])

    assert [float(glucose_sum(ds)) for ds in datasets] == [12.75, 5.5, 13.25]


# ------------------------------------------------------------------ errors


def assert_data_error(error: pytest.ExceptionInfo[DataError], *parts: str) -> None:
    message = str(error.value)
    for part in (SILO, *parts):
        assert part in message, f"{part!r} not in {message!r}"


def test_missing_key_names_silo_key_and_known_keys(ward_folder: Path) -> None:
    with pytest.raises(DataError) as error:
        store_of(ward_folder).num_clients("nope")
    assert_data_error(error, "'nope'", "no such data key", "'readings'", "--data nope=PATH")
    assert error.value.silo == SILO and error.value.key == "nope"


def test_missing_column_lists_the_header(ward_folder: Path) -> None:
    element = collections.OrderedDict(age=np.int32, insulin=np.float32)
    with pytest.raises(DataError) as error:
        store_of(ward_folder).federated_value("readings", at_clients(element))
    assert_data_error(error, "'readings'", "ward_a.csv", "no column 'insulin'", "age, glucose")


@pytest.mark.parametrize(
    ("dtype", "cell", "problem"),
    [
        (np.int32, "4.5", "expected a whole number"),
        (np.int32, "", "expected a whole number"),
        (np.uint8, "-1", "out of range"),
        (np.int8, "128", "out of range"),
        (np.float32, "abc", "expected a number"),
        (np.float32, "1_000", "expected a number"),
        (np.float16, "70000", "out of range"),
        (np.bool_, "yes", "expected true, false, 1 or 0"),
    ],
)
def test_bad_cell_names_file_row_and_column(
    tmp_path: Path, dtype: type[np.generic], cell: str, problem: str
) -> None:
    path = write_csv(tmp_path / "c.csv", ["id", "value"], [["a", "1"], ["b", cell]])
    element = collections.OrderedDict(value=dtype)
    with pytest.raises(DataError) as error:
        store_of(path).federated_value("readings", at_clients(element))
    assert_data_error(
        error, "'readings'", "c.csv", "row 2 (line 3)", "column 'value'", repr(cell), problem
    )


def test_ragged_row_and_empty_file(tmp_path: Path) -> None:
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("age,glucose\n1,2.0\n3\n")
    with pytest.raises(DataError) as error:
        store_of(ragged).federated_value("readings", at_clients(ROW))
    assert_data_error(error, "row 2 (line 3) has 1 fields but the header has 2")

    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError) as error:
        store_of(empty).federated_value("readings", at_clients(ROW))
    assert_data_error(error, "empty.csv is empty", "header")


def test_empty_folder_is_a_silo_without_clients_and_non_csv_path_an_error(
    tmp_path: Path,
) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a client\n")
    store = store_of(tmp_path / "empty")
    assert store.num_clients("readings") == 0
    assert store.client_datasets("readings", computation_types.to_type(ROW)) == []
    assert store.federated_value("readings", at_clients(ROW)) is not None

    text = tmp_path / "data.txt"
    text.write_text("age\n1\n")
    with pytest.raises(DataError) as error:
        store_of(text).federated_value("readings", at_clients(ROW))
    assert_data_error(error, "'readings'", "is not a data file this silo reads")


def test_plain_scalar_element_over_a_wide_file_asks_for_a_named_struct(ward_folder: Path) -> None:
    with pytest.raises(DataError) as error:
        store_of(ward_folder).federated_value("readings", at_clients(np.float32))
    assert_data_error(error, "has 2 columns", "one-column", "OrderedDict(age=np.float32)")


@pytest.mark.parametrize(
    ("type_spec", "problem"),
    [
        (at_clients(collections.OrderedDict(age=np.complex64)), "dtype complex64"),
        (at_clients(computation_types.TensorType(np.float32, [2])), "shape"),
        (at_clients(computation_types.StructType([np.int32, np.float32])), "unnamed"),
        (at_clients(collections.OrderedDict(age=collections.OrderedDict(x=np.int32))), "scalar"),
        (computation_types.FederatedType(np.int32, placements.CLIENTS), "per-client sequences"),
        (
            computation_types.FederatedType(computation_types.SequenceType(ROW), placements.SERVER),
            "per-client sequences",
        ),
        (
            computation_types.FederatedType(
                computation_types.SequenceType(ROW), placements.CLIENTS, all_equal=True
            ),
            "per-client sequences",
        ),
    ],
)
def test_unsupported_types_are_clear_errors(
    ward_folder: Path, type_spec: computation_types.FederatedType, problem: str
) -> None:
    with pytest.raises(DataError) as error:
        store_of(ward_folder).federated_value("readings", type_spec)
    assert_data_error(error, "'readings'", problem)


def test_duplicate_keys_are_refused(ward_folder: Path) -> None:
    with pytest.raises(DataError) as error:
        SiloDataStore(SILO, [DataSource("r", ward_folder), DataSource("r", ward_folder)])
    assert_data_error(error, "'r'", "given twice")


# ------------------------------------------------------------------- flags


def test_parse_accepts_a_file_or_a_folder(ward_folder: Path) -> None:
    assert DataSource.parse(f"readings={ward_folder}") == DataSource("readings", ward_folder)
    one = ward_folder / "ward_a.csv"
    assert DataSource.parse(f"v1.raw-data_x={one}") == DataSource("v1.raw-data_x", one)


@pytest.mark.parametrize(
    ("flag", "problem"),
    [
        ("readings", "expected KEY=PATH"),
        ("=/tmp", "invalid data key ''"),
        ("bad key={folder}", "invalid data key 'bad key'"),
        ("readings=", "PATH is empty"),
        ("readings={folder}/missing", "does not exist"),
        ("readings={folder}/README.txt", "is not a data file this silo reads"),
    ],
)
def test_parse_rejects_bad_flags(
    ward_folder: Path, tmp_path: Path, flag: str, problem: str
) -> None:
    flag = flag.format(folder=ward_folder)
    with pytest.raises(DataError) as error:
        DataSource.parse(flag)
    assert problem in str(error.value)
    assert f"--data {flag!r}" in str(error.value)
