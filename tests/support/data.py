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
