"""Every data format a silo reads gives the same client datasets, sheets and
formats are chosen as documented, blank cells follow the key's missing-value
policy, and the typing stays strict. No broker here: see
tests/test_data_formats_federation.py for the same numbers over real silos.
"""

from __future__ import annotations

import collections
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tensorflow_federated.python.core.impl.types import computation_types

from tests.support.data import (
    FORMAT_EXTENSIONS,
    silo_rows,
    write_silo_files,
    write_table,
    write_workbook,
)
from tff_amqp.silo.data import SiloDataStore
from tff_amqp.silo.sources import DataError, DataSource, check_flags
from tff_amqp.silo.tables import Column, Converter, MissingPolicy, RawTable, parser_for

SILO = "clinic-north"
ROW = computation_types.to_type(collections.OrderedDict(age=np.int32, glucose=np.float32))
FORMATS = list(FORMAT_EXTENSIONS)


def rows_of(store: SiloDataStore, key: str = "k", element=ROW) -> list[list[tuple]]:
    return [
        [tuple(v.numpy() for v in element.values()) for element in dataset]
        for dataset in store.client_datasets(key, element)
    ]


def store(flag: str) -> SiloDataStore:
    return SiloDataStore(SILO, [DataSource.parse(flag)])


def expected_rows(silo_index: int, clients: int) -> list[list[tuple]]:
    out = []
    for c in range(clients):
        header, rows = silo_rows(silo_index, c)
        age, glucose = header.index("age"), header.index("glucose")
        out.append([(np.int32(r[age]), np.float32(r[glucose])) for r in rows])
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_gives_the_csv_numbers(tmp_path: Path, fmt: str) -> None:
    folder = write_silo_files(tmp_path, 1, 3, fmt)
    assert rows_of(store(f"k={folder}")) == expected_rows(1, 3)
    # One file, and an explicit format= for a file whose name says nothing.
    one = sorted(folder.iterdir())[0]
    renamed = one.rename(tmp_path / "client.data")
    assert rows_of(store(f"k={renamed}#format={fmt}")) == expected_rows(1, 1)


def test_a_folder_may_mix_formats_one_client_per_file_in_name_order(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    for c, fmt in enumerate(FORMATS):
        header, rows = silo_rows(2, c)
        write_table(folder / f"c{c}{FORMAT_EXTENSIONS[fmt]}", fmt, header, rows)
    (folder / "README.txt").write_text("not a client")
    (folder / "~$c2.xlsx").write_bytes(b"an Excel lock file")
    source = DataSource.parse(f"k={folder}")
    assert [p.path.name for p in source.client_parts()] == [
        f"c{c}{FORMAT_EXTENSIONS[fmt]}" for c, fmt in enumerate(FORMATS)
    ]
    assert rows_of(store(f"k={folder}")) == expected_rows(2, len(FORMATS))


@pytest.mark.parametrize("fmt", ["xlsx", "ods"])
def test_sheets_by_name_index_or_each_its_own_client(tmp_path: Path, fmt: str) -> None:
    header = ["age", "glucose"]
    book = write_workbook(
        tmp_path / f"wards.{fmt}",
        fmt,
        {
            "January": (header, [[1, 1.5]]),
            "March": (header, [[3, 3.5], [4, 4.5]]),
            "2": (header, [[22, 22.5]]),
        },
    )
    assert rows_of(store(f"k={book}")) == [[(1, 1.5)]]  # the first sheet
    assert rows_of(store(f"k={book}#sheet=March")) == [[(3, 3.5), (4, 4.5)]]
    assert rows_of(store(f"k={book}#sheet=1")) == [[(3, 3.5), (4, 4.5)]]  # an index
    assert rows_of(store(f"k={book}#sheet=2")) == [[(22, 22.5)]]  # a name wins
    every = store(f"k={book}#sheet=*")
    assert every.num_clients("k") == 3
    assert rows_of(every) == [[(1, 1.5)], [(3, 3.5), (4, 4.5)], [(22, 22.5)]]

    with pytest.raises(DataError) as error:
        DataSource.parse(f"k={book}#sheet=April")
    message = str(error.value)
    assert "no sheet 'April'" in message and "January, March, 2" in message


def test_workbook_header_may_start_below_blank_rows_and_blank_rows_are_skipped(
    tmp_path: Path,
) -> None:
    book = write_workbook(
        tmp_path / "w.xlsx",
        "xlsx",
        {"S": (["age", "glucose"], [[1, 2.0], [None, None], [3, "x"]])},
    )
    with pytest.raises(DataError) as error:
        rows_of(store(f"k={book}"))
    # Row numbers count data rows; the sheet row is where to look in Excel.
    assert "row 2 (sheet row 4), column 'glucose': cannot parse 'x' as float32" in str(error.value)


# ---------------------------------------------------------------- missing


def blank_client(tmp_path: Path, fmt: str) -> Path:
    header = ["age", "glucose", "name"]
    rows = [[30, 4.5, "a"], [31, None, "b"], [None, None, "c"], [33, 6.5, "d"]]
    return write_table(tmp_path / f"blank{FORMAT_EXTENSIONS[fmt]}", fmt, header, rows)


@pytest.mark.parametrize("fmt", FORMATS)
def test_blank_cells_are_an_error_by_default(tmp_path: Path, fmt: str) -> None:
    path = blank_client(tmp_path, fmt)
    with pytest.raises(DataError) as error:
        rows_of(store(f"k={path}"))
    message = str(error.value)
    assert "column 'age'" in message or "column 'glucose'" in message
    assert "#missing=drop-row" in message and "#missing=fill:VALUE" in message


@pytest.mark.parametrize("fmt", FORMATS)
def test_drop_row_and_fill_with_counts_logged_at_the_silo(
    tmp_path: Path, fmt: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = blank_client(tmp_path, fmt)
    caplog.set_level(logging.INFO, logger="tff_amqp.silo.data")
    assert rows_of(store(f"k={path}#missing=drop-row")) == [[(30, 4.5), (33, 6.5)]]
    [record] = [r for r in caplog.records if r.getMessage() == "missing values handled"]
    assert (record.dropped_rows, record.dropped_cells, record.filled_cells) == (2, 3, 0)

    caplog.clear()
    assert rows_of(store(f"k={path}#missing=fill:-1")) == [
        [(30, 4.5), (31, -1.0), (-1, -1.0), (33, 6.5)]
    ]
    [record] = [r for r in caplog.records if r.getMessage() == "missing values handled"]
    assert (record.dropped_rows, record.filled_cells) == (0, 3)


def test_fill_value_must_fit_the_column_and_str_blanks_are_empty_strings(tmp_path: Path) -> None:
    path = blank_client(tmp_path, "csv")
    with pytest.raises(DataError) as error:
        rows_of(store(f"k={path}#missing=fill:n/a"))
    assert "missing=fill:n/a cannot fill column 'age' (int32): expected a whole number" in str(
        error.value
    )
    # An empty cell in a str column is the empty string, as it always was.
    named = computation_types.to_type(collections.OrderedDict(name=np.str_))
    empty = write_table(tmp_path / "e.csv", "csv", ["name", "n"], [["", 1], ["x", 2]])
    assert rows_of(store(f"k={empty}"), element=named) == [[(b"",), (b"x",)]]


# ---------------------------------------------------------- strict typing


@pytest.mark.parametrize("fmt", ["parquet", "tfrecord"])
def test_typed_formats_refuse_lossy_casts(tmp_path: Path, fmt: str) -> None:
    path = write_table(tmp_path / f"t{FORMAT_EXTENSIONS[fmt]}", fmt, ["age"], [[1.0], [2.5]])
    element = computation_types.to_type(collections.OrderedDict(age=np.int32))
    with pytest.raises(DataError) as error:
        rows_of(store(f"k={path}"), element=element)
    assert "column 'age': cannot parse 2.5 as int32: expected a whole number" in str(error.value)
    big = write_table(tmp_path / f"b{FORMAT_EXTENSIONS[fmt]}", fmt, ["age"], [[1], [300]])
    element = computation_types.to_type(collections.OrderedDict(age=np.uint8))
    with pytest.raises(DataError) as error:
        rows_of(store(f"k={big}"), element=element)
    assert "cannot parse 300 as uint8" in str(error.value)


TRICKY = [
    "7", "+7", " -7 ", "007", "1.5", "-2.5e3", ".5", "5.", "1e400", "-1e400", "inf", "-Infinity",
    "nan", "NaN", "1_000", "0x10", "1e", "abc", "true", "FALSE", " 1 ", "0", "2", "", "70000",
    "255", "256", "-1", "9223372036854775807", "9223372036854775808", "18446744073709551615",
    "-9223372036854775809", "3.4e38", "3.5e38", "65504", "65520",
]  # fmt: skip
DTYPES = [np.bool_, np.int8, np.uint8, np.int32, np.int64, np.uint64, np.float16, np.float32]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_vectorized_typing_agrees_with_the_strict_cell_parser(dtype: type) -> None:
    import pyarrow as pa

    parse = parser_for(np.dtype(dtype))
    for cell in TRICKY:
        table = RawTable("f.csv", ["v"], [pa.array([cell])], lambda i: f"row {i + 1}", ["v"])
        converter = Converter([Column("v", np.dtype(dtype))], MissingPolicy())
        try:
            expected = parse(cell)
        except ValueError:
            with pytest.raises(ValueError):
                converter.convert(table)
            continue
        [values], _ = converter.convert(table)
        np.testing.assert_array_equal(values, np.array([expected], dtype=dtype), err_msg=cell)


# ------------------------------------------------------------- fail fast


def test_check_flags_says_every_problem_in_one_line_each(tmp_path: Path) -> None:
    good = write_table(tmp_path / "good.csv", "csv", ["age"], [[1]])
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    book = write_workbook(tmp_path / "b.xlsx", "xlsx", {"S": (["age"], [[1]])})
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet")
    problems = check_flags(
        [
            f"a={good}",
            f"b={tmp_path}/missing.csv",
            f"c={empty}",
            f"d={book}#sheet=Nope",
            f"e={broken}",
            f"f={good}#colour=red",
            f"a={good}",
            "g",
        ]
    )
    assert len(problems) == 7, problems
    for problem, words in zip(
        problems,
        [
            "does not exist",
            "is empty; its first row must be a header",
            "no sheet 'Nope'",
            "not a readable Parquet file",
            "unknown option 'colour=red'",
            "key 'a' already given",
            "expected KEY=PATH",
        ],
        strict=True,
    ):
        assert words in problem and "\n" not in problem


def test_silo_refuses_bad_data_within_two_seconds_before_tensorflow(tmp_path: Path) -> None:
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tff_amqp",
            "silo",
            "--name",
            "a",
            "--broker",
            "amqp://guest:guest@127.0.0.1:1/",  # never reached: data is checked first
            "--data",
            f"k={tmp_path}/nope.csv",
            "--data",
            f"j={tmp_path}#missing=maybe",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2, lines
    assert "nope.csv' does not exist" in lines[0] and "missing='maybe'" in lines[1]
    assert elapsed < 2.0, elapsed


def test_checking_sources_imports_no_tensorflow(tmp_path: Path) -> None:
    book = write_workbook(tmp_path / "b.xlsx", "xlsx", {"S": (["age"], [[1]])})
    code = (
        "import sys; from tff_amqp.silo.sources import check_flags; "
        f"assert check_flags(['k={book}#sheet=S', 'j={book}']) == []; "
        "assert 'tensorflow' not in sys.modules, 'tensorflow imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_demo_xlsx_workbooks_one_client_per_ward_sheet_same_numbers_as_csv(
    tmp_path: Path,
) -> None:
    from tff_amqp.demo import CLINICS, _direct_mean, data_spec, write_sample_data

    csv_data = write_sample_data(tmp_path / "csv", fmt="csv")
    xlsx_data = write_sample_data(tmp_path / "xlsx", fmt="xlsx")
    element = computation_types.to_type(
        collections.OrderedDict(age=np.int32, systolic_bp=np.float32, glucose=np.float32)
    )
    for clinic, wards in CLINICS.items():
        book = store(f"k={data_spec(xlsx_data[clinic])}")
        assert book.num_clients("k") == wards
        assert rows_of(book, element=element) == rows_of(
            store(f"k={data_spec(csv_data[clinic])}"), element=element
        )
    assert _direct_mean(xlsx_data, "glucose") == _direct_mean(csv_data, "glucose")


async def test_advertised_columns_are_re_read_in_the_background(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from tff_amqp.silo import serve

    path = write_table(tmp_path / "w.csv", "csv", ["age"], [[1]])
    server = serve.SiloServer.__new__(serve.SiloServer)
    server.data = SiloDataStore(SILO, [DataSource.parse(f"k={path}")])
    server._advertise_counts = False
    server._schemas = server.data.schemas()
    server._schemas_read_at = time.monotonic()
    server._schemas_reading = None
    assert [s.names() for s in server._current_schemas()] == [["age"]]

    write_table(path, "csv", ["age", "glucose"], [[1, 2.0]])
    monkeypatch.setattr(serve, "SCHEMA_REFRESH", 0.0)
    assert [s.names() for s in server._current_schemas()] == [["age"]]  # never waits
    await asyncio.wait_for(asyncio.shield(server._schemas_reading), 30)
    assert [s.names() for s in server._current_schemas()] == [["age", "glucose"]]
