"""Client data for tests: CSV folders a silo or pool worker reads with
`--data KEY=FOLDER` (one file per client), and readers for the expected values."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np


# Distinctive values: if any of these ever reached the coordinator as raw
# bytes, the data-locality test would see them.
def _silo_rows(silo_index: int, client_index: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(1000 * silo_index + client_index)
    rows = []
    for r in range(4 + client_index + silo_index):
        rows.append(
            {
                "patient": f"p{silo_index}-{client_index}-{r}",
                "age": int(rng.integers(20, 90)),
                "glucose": round(float(rng.normal(5.5, 1.2)) + 1000.0 * (silo_index + 1), 3),
                "notes": "confidential",
            }
        )
    return rows


def write_silo_csvs(root: Path, silo_index: int, clients: int) -> Path:
    """A folder `silo<i>` of `clients` CSV files with columns patient, age,
    glucose, notes (the element type `ROW` of tests/support/computations.py reads
    age and glucose)."""
    folder = root / f"silo{silo_index}"
    folder.mkdir(parents=True, exist_ok=True)
    for c in range(clients):
        rows = _silo_rows(silo_index, c)
        with open(folder / f"client_{c:02d}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["patient", "age", "glucose", "notes"])
            writer.writeheader()
            writer.writerows(rows)
    return folder


def write_xy_clients(root: Path, silo_index: int, clients: int, rows: int = 6) -> Path:
    """A folder of `clients` CSV files with columns x, y (y ~ 3x + 1 + noise)."""
    folder = root / f"xy{silo_index}"
    folder.mkdir(parents=True, exist_ok=True)
    for c in range(clients):
        rng = np.random.default_rng(100 * silo_index + c)
        with open(folder / f"client_{c:02d}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["x", "y"])
            writer.writeheader()
            for _ in range(rows + c % 3):
                x = float(rng.uniform(-1, 1))
                writer.writerow({"x": round(x, 4), "y": round(3 * x + 1 + rng.normal(0, 0.1), 4)})
    return folder


def read_column_of_file(path: Path, column: str) -> list[float]:
    with open(path, newline="") as f:
        return [float(row[column]) for row in csv.DictReader(f)]


def read_column(folder: Path, column: str) -> list[float]:
    """A column of every CSV file of `folder`, files in name order."""
    return [v for path in sorted(folder.glob("*.csv")) for v in read_column_of_file(path, column)]


# ------------------------------------------------------------------ formats

# Every format a silo reads, by the file extension that selects it.
FORMAT_EXTENSIONS = {
    "csv": ".csv",
    "tsv": ".tsv",
    "xlsx": ".xlsx",
    "ods": ".ods",
    "parquet": ".parquet",
    "tfrecord": ".tfrecord",
}


def write_table(
    path: Path, fmt: str, header: list[str], rows: list[list[Any]], *, sheet: str = "Sheet1"
) -> Path:
    """One client's file in `fmt`; a None cell is left blank (null, absent)."""
    return write_workbook(path, fmt, {sheet: (header, rows)})


def write_workbook(
    path: Path, fmt: str, sheets: dict[str, tuple[list[str], list[list[Any]]]]
) -> Path:
    """A file in `fmt`; workbooks get every sheet, other formats the first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header, rows = next(iter(sheets.values()))
    if fmt in ("csv", "tsv"):
        with open(path, "w", newline="") as f:
            writer = csv.writer(f, delimiter="," if fmt == "csv" else "\t")
            writer.writerow(header)
            writer.writerows([["" if v is None else v for v in row] for row in rows])
    elif fmt == "xlsx":
        import openpyxl

        book = openpyxl.Workbook()
        book.remove(book.active)
        for name, (sheet_header, sheet_rows) in sheets.items():
            sheet = book.create_sheet(name)
            sheet.append(sheet_header)
            for row in sheet_rows:
                sheet.append(row)
        book.save(path)
    elif fmt == "ods":
        _write_ods(path, sheets)
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = {name: [row[i] for row in rows] for i, name in enumerate(header)}
        pq.write_table(pa.table(columns), path)
    elif fmt == "tfrecord":
        _write_tfrecord(path, header, rows)
    else:
        raise ValueError(f"no writer for {fmt}")
    return path


def _write_ods(path: Path, sheets: dict[str, tuple[list[str], list[list[Any]]]]) -> None:
    from odf.opendocument import OpenDocumentSpreadsheet
    from odf.table import Table, TableCell, TableRow
    from odf.text import P

    doc = OpenDocumentSpreadsheet()
    for name, (header, rows) in sheets.items():
        table = Table(name=name)
        for row in [header, *rows]:
            table_row = TableRow()
            for value in row:
                if value is None:
                    cell = TableCell()
                elif isinstance(value, int | float) and not isinstance(value, bool):
                    cell = TableCell(valuetype="float", value=repr(value))
                    cell.addElement(P(text=repr(value)))
                else:
                    cell = TableCell(valuetype="string")
                    cell.addElement(P(text=str(value)))
                table_row.addElement(cell)
            table.addElement(table_row)
        doc.spreadsheet.addElement(table)
    doc.save(str(path))


def _write_tfrecord(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    import tensorflow as tf

    with tf.io.TFRecordWriter(str(path)) as writer:
        for row in rows:
            features = {}
            for name, value in zip(header, row, strict=True):
                if value is None:
                    continue  # An absent feature: a missing cell.
                if isinstance(value, int):
                    feature = tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
                elif isinstance(value, float):
                    feature = tf.train.Feature(float_list=tf.train.FloatList(value=[value]))
                else:
                    feature = tf.train.Feature(
                        bytes_list=tf.train.BytesList(value=[str(value).encode()])
                    )
                features[name] = feature
            example = tf.train.Example(features=tf.train.Features(feature=features))
            writer.write(example.SerializeToString())


def silo_rows(silo_index: int, client_index: int) -> tuple[list[str], list[list[Any]]]:
    """The header and rows `write_silo_csvs` writes for one client."""
    rows = _silo_rows(silo_index, client_index)
    header = ["patient", "age", "glucose", "notes"]
    return header, [[row[name] for name in header] for row in rows]


def write_silo_files(root: Path, silo_index: int, clients: int, fmt: str) -> Path:
    """`write_silo_csvs`'s numbers, written as `fmt` (one file per client)."""
    folder = root / f"silo{silo_index}-{fmt}"
    for c in range(clients):
        header, rows = silo_rows(silo_index, c)
        write_table(folder / f"client_{c:02d}{FORMAT_EXTENSIONS[fmt]}", fmt, header, rows)
    return folder
