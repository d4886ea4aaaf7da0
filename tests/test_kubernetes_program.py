"""The coordinator Job's example program (deploy/kubernetes/base/hub/program.py)
run as the Job runs it (`python program.py`, settings from the environment)
against two real silos, one serving the silo-site overlay's ConfigMap data:
it prints the mean computed directly from the same CSV files. No cluster."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

from tff_amqp.demo import write_sample_data

ROOT = Path(__file__).resolve().parent.parent
PROGRAM = ROOT / "deploy" / "kubernetes" / "base" / "hub" / "program.py"
CONFIGMAP_DATA = ROOT / "deploy" / "kubernetes" / "overlays" / "silo-site" / "clinic-south" / "data"


def glucose(folder: Path) -> list[float]:
    values = []
    for path in sorted(folder.glob("*.csv")):
        with open(path, newline="") as f:
            values += [float(row["glucose"]) for row in csv.DictReader(f)]
    return values


def test_the_example_coordinator_program_computes_the_federated_mean(
    local, amqp_url, federation, tmp_path
):
    north = write_sample_data(tmp_path)["clinic_north"]
    local.start_silo("clinic_north", data={"patients": north})
    local.start_silo("clinic_south", data={"patients": CONFIGMAP_DATA})
    local.wait_ready(timeout=120)
    env = dict(os.environ, TFF_AMQP_BROKER=amqp_url, FEDERATION=federation, MIN_SILOS="2")
    result = subprocess.run(
        [sys.executable, str(PROGRAM)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    match = re.search(r"mean glucose over the federation: (\S+)", result.stdout)
    assert match, result.stdout
    values = glucose(north) + glucose(CONFIGMAP_DATA)
    assert abs(float(match.group(1)) - sum(values) / len(values)) < 1e-4
