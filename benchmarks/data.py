"""Reading silo data: rows/s from a file into a client's typed columns.

    .venv/bin/python benchmarks/data.py [--rows 1000000] [--xlsx-rows N] [--repeats 3] [--quick]

One client file of `--rows` rows (columns patient, age, glucose, notes; the
element type reads age as int32 and glucose as float32), written as CSV and
as XLSX (`--xlsx-rows`, default the same). Measured in the same run:

- `csv (pyarrow)`: what a silo does now (`tff_amqp.silo.tables`: pyarrow's CSV
  reader, vectorized strict typing);
- `csv (python)`: the previous path, Python's `csv` reader with the same
  strict per-cell parsers (`tables.parser_for`), for the ratio;
- `xlsx (calamine)`: a workbook sheet read by python-calamine, then typed.

The time is file to typed NumPy columns (what becomes the client's
`tf.data.Dataset`), not the dataset construction itself, which is the same
for every path. Prints a table and writes benchmarks/results/data.json.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from benchmarks._common import machine, print_table, summary, timed, write_result
from tff_amqp.silo.sources import ClientPart
from tff_amqp.silo.tables import Column, Converter, MissingPolicy, open_client, parser_for

COLUMNS = [Column("age", np.dtype(np.int32)), Column("glucose", np.dtype(np.float32))]


def _rows(n: int) -> list[list[object]]:
    rng = np.random.default_rng(0)
    ages = rng.integers(18, 95, n)
    glucose = np.round(rng.normal(5.5, 1.2, n), 3)
    return [[f"p{i}", int(a), float(g), "private"] for i, (a, g) in enumerate(zip(ages, glucose))]


def write_csv(path: Path, rows: list[list[object]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["patient", "age", "glucose", "notes"])
        writer.writerows(rows)


def write_xlsx(path: Path, rows: list[list[object]]) -> None:
    import openpyxl

    book = openpyxl.Workbook(write_only=True)
    sheet = book.create_sheet("wards")
    sheet.append(["patient", "age", "glucose", "notes"])
    for row in rows:
        sheet.append(row)
    book.save(path)


def read_now(path: Path, fmt: str) -> list[np.ndarray]:
    table = open_client(ClientPart(path, fmt)).read([c.name for c in COLUMNS])
    arrays, _ = Converter(COLUMNS, MissingPolicy()).convert(table)
    return arrays


def read_python_csv(path: Path) -> list[np.ndarray]:
    """The previous path: csv.reader, a strict parser per cell."""
    parsers = [parser_for(c.dtype) for c in COLUMNS]
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader)]
        indices = [header.index(c.name) for c in COLUMNS]
        values: list[list[object]] = [[] for _ in COLUMNS]
        for row in reader:
            if not row:
                continue
            for index, parse, out in zip(indices, parsers, values):
                out.append(parse(row[index]))
    return [np.array(v, dtype=c.dtype) for v, c in zip(values, COLUMNS)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--xlsx-rows", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="100,000 rows, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.repeats = 100_000, 1
    xlsx_rows = args.xlsx_rows or args.rows

    with tempfile.TemporaryDirectory(prefix="tff-amqp-bench-data-") as tmp:
        root = Path(tmp)
        rows = _rows(max(args.rows, xlsx_rows))
        write_csv(root / "c.csv", rows[: args.rows])
        started = time.monotonic()
        write_xlsx(root / "c.xlsx", rows[:xlsx_rows])
        print(f"wrote {xlsx_rows} XLSX rows in {time.monotonic() - started:.1f} s", flush=True)

        now = read_now(root / "c.csv", "csv")
        before = read_python_csv(root / "c.csv")
        book = read_now(root / "c.xlsx", "xlsx")
        for a, b, c in zip(now, before, book):  # every path reads the same numbers
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(a[: len(c)], c)

        cases = {
            "csv (pyarrow)": (args.rows, lambda: read_now(root / "c.csv", "csv")),
            "csv (python)": (args.rows, lambda: read_python_csv(root / "c.csv")),
            "xlsx (calamine)": (xlsx_rows, lambda: read_now(root / "c.xlsx", "xlsx")),
        }
        results = {}
        for name, (n, fn) in cases.items():
            stats = summary(timed(fn, args.repeats, warmup=0))
            results[name] = {"rows": n, **stats, "rows_per_s": n / stats["median_s"]}
            print(f"{name}: {results[name]['rows_per_s']:,.0f} rows/s", flush=True)

    speedup = results["csv (pyarrow)"]["rows_per_s"] / results["csv (python)"]["rows_per_s"]
    print_table(
        ["path", "rows", "median s", "rows/s"],
        [[k, v["rows"], v["median_s"], f"{v['rows_per_s']:,.0f}"] for k, v in results.items()],
    )
    print(f"CSV: pyarrow path is {speedup:.1f}x the previous Python csv path (aim: >= 5x)")
    write_result(
        "data",
        {
            "machine": machine(),
            "quick": args.quick,
            "results": results,
            "csv_speedup_vs_python": speedup,
        },
    )


if __name__ == "__main__":
    main()
