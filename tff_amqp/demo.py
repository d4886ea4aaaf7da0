"""`tff-amqp demo`: a small federation on the local broker, end to end.

Three clinics keep patient spreadsheets (CSV files, one per ward = one TFF
client; or with ``--format xlsx`` one Excel workbook per clinic, one sheet
per ward = one client). The coordinator computes the federated mean of a column (the
scenario this project started from) and trains a logistic regression with
FedAvg, all without a single row leaving a clinic.
"""

from __future__ import annotations

import argparse
import collections
import csv
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

CLINICS = {"clinic_north": 3, "clinic_south": 2, "clinic_east": 3}
COLUMNS = ["patient_id", "age", "systolic_bp", "glucose", "diabetic", "notes"]


def write_sample_data(root: Path, seed: int = 7, fmt: str = "csv") -> dict[str, Path]:
    """Each clinic's data, deterministic: with `fmt` "csv" a folder of one CSV
    per ward, with "xlsx" one Excel workbook with one sheet per ward (read
    with ``#sheet=*``: one client per sheet)."""
    rng = np.random.default_rng(seed)
    written = {}
    for c, (clinic, wards) in enumerate(CLINICS.items()):
        folder = root / clinic
        folder.mkdir(parents=True, exist_ok=True)
        sheets: dict[str, list[list[Any]]] = {}
        for w in range(wards):
            n = int(rng.integers(25, 60))
            diabetic = rng.random(n) < 0.3 + 0.1 * c
            age = rng.normal(52 + 6 * c, 12, n).clip(18, 95)
            bp = rng.normal(125 + 10 * diabetic + 0.3 * (age - 50), 12)
            glucose = rng.normal(5.3 + 2.2 * diabetic, 0.8)
            sheets[f"ward_{w + 1}"] = [
                [
                    f"{clinic[7]}{w}{i:03d}",
                    round(float(age[i])),
                    round(float(bp[i]), 1),
                    round(float(glucose[i]), 2),
                    int(diabetic[i]),
                    "private",
                ]
                for i in range(n)
            ]
        if fmt == "xlsx":
            written[clinic] = _write_workbook(folder / "wards.xlsx", sheets)
            continue
        for ward, rows in sheets.items():
            with open(folder / f"{ward}.csv", "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(COLUMNS)
                writer.writerows(rows)
        written[clinic] = folder
    return written


def _write_workbook(path: Path, sheets: dict[str, list[list[Any]]]) -> Path:
    import openpyxl

    book = openpyxl.Workbook()
    book.remove(book.active)
    for name, rows in sheets.items():
        sheet = book.create_sheet(name)
        sheet.append(COLUMNS)
        for row in rows:
            sheet.append(row)
    book.save(path)
    return path


def data_spec(path: Path) -> str:
    """The --data PATH of a clinic's data as `write_sample_data` wrote it."""
    return f"{path}#sheet=*" if path.suffix == ".xlsx" else str(path)


def _direct_mean(written: dict[str, Path], column: str) -> tuple[float, int]:
    """The column's mean read straight from the files (openpyxl for workbooks,
    a separate reader from the silos' own), as a check of the federated one."""
    values: list[float] = []
    for path in written.values():
        if path.suffix == ".xlsx":
            import openpyxl

            book = openpyxl.load_workbook(path, read_only=True)
            for sheet in book.worksheets:
                rows = list(sheet.iter_rows(values_only=True))
                index = list(rows[0]).index(column)
                values.extend(float(row[index]) for row in rows[1:])
            continue
        for csv_path in sorted(path.glob("*.csv")):
            with open(csv_path, newline="") as f:
                values.extend(float(row[column]) for row in csv.DictReader(f))
    return float(np.mean(np.asarray(values, np.float32).astype(np.float64))), len(values)


def _computations() -> dict[str, Any]:
    """Build the demo's TFF computations (imports TFF: takes seconds)."""
    import tensorflow as tf
    import tensorflow_federated as tff

    row = collections.OrderedDict(
        age=np.float32, systolic_bp=np.float32, glucose=np.float32, diabetic=np.int32
    )
    rows_at_clients = tff.FederatedType(tff.SequenceType(row), tff.CLIENTS)

    @tff.tensorflow.computation(tff.SequenceType(row))
    def sum_and_count(rows):
        return rows.reduce(
            (np.float64(0), np.float64(0)),
            lambda acc, r: (acc[0] + tf.cast(r["glucose"], tf.float64), acc[1] + 1.0),
        )

    @tff.tensorflow.computation(np.float64, np.float64)
    def divide(total, count):
        return total / count

    @tff.federated_computation(rows_at_clients)
    def mean_glucose(rows):
        return tff.federated_map(divide, tff.federated_sum(tff.federated_map(sum_and_count, rows)))

    @tff.tensorflow.computation(tff.SequenceType(row))
    def to_batches(rows):
        def features(r):
            x = tf.stack([r["age"] / 100.0, r["systolic_bp"] / 200.0, r["glucose"] / 10.0])
            return collections.OrderedDict(x=x, y=r["diabetic"])

        return rows.map(features).batch(16)

    input_spec = collections.OrderedDict(
        x=tf.TensorSpec([None, 3], tf.float32), y=tf.TensorSpec([None], tf.int32)
    )

    def model_fn():
        keras_model = tf.keras.Sequential(
            [
                tf.keras.layers.InputLayer(input_shape=(3,)),
                tf.keras.layers.Dense(
                    2, kernel_initializer=tf.keras.initializers.GlorotUniform(seed=1)
                ),
            ]
        )
        return tff.learning.models.from_keras_model(
            keras_model,
            input_spec=input_spec,
            loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=[tf.keras.metrics.SparseCategoricalAccuracy()],
        )

    process = tff.learning.algorithms.build_weighted_fed_avg(
        model_fn,
        client_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=0.5),
        server_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=1.0),
    )

    @tff.federated_computation(process.next.type_signature.parameter[0], rows_at_clients)
    def train_round(state, rows):
        # Batching happens at each silo, on its own rows.
        return process.next(state, tff.federated_map(to_batches, rows))

    return {"mean_glucose": mean_glucose, "process": process, "train_round": train_round}


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo (`tff-amqp demo`); returns a process exit code. Every
    process it starts is stopped, however it ends (Ctrl-C included)."""
    if args.write_data is not None:
        folders = write_sample_data(args.write_data, fmt=args.format)
        for clinic, folder in folders.items():
            print(f"{clinic}: {folder}")
        return 0
    from tff_amqp.transport.connection import redact_url

    say = _Printer()
    external = [s.strip() for s in (args.silos or "").split(",") if s.strip()]
    where = "running silos" if external else "a local federation"
    say(f"tff-amqp demo: {where} on {redact_url(args.broker)}")
    if not _broker_answers(args.broker, args.connect_timeout):
        return 1
    progress = {"auto": None, "on": True, "off": False}[args.progress]
    options = {"metrics_port": args.metrics_port, "progress": progress}
    try:
        with _INTERRUPTS:
            if external:
                return _run_with_running_silos(args, external, options, say)
            return _run_with_local_silos(args, options, say)
    except KeyboardInterrupt:
        say("Interrupted; every process the demo started has been stopped.")
        return 130


class _Interrupts:
    """Ctrl-C (SIGINT) raises KeyboardInterrupt as usual, and is also
    remembered: Python drops an exception raised inside a finalizer or
    weakref callback (which TensorFlow's long import runs many of), so the
    demo checks again between phases and never carries on after a Ctrl-C."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> _Interrupts:
        self.requested = False
        self._previous = signal.signal(signal.SIGINT, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._previous)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.requested = True
        raise KeyboardInterrupt

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt


_INTERRUPTS = _Interrupts()


def _run_with_local_silos(args: argparse.Namespace, options: dict[str, Any], say: _Printer) -> int:
    from tff_amqp.local import LocalFederation

    keep_data: Path | None = args.keep_data
    root = keep_data or Path(tempfile.mkdtemp(prefix="tff-amqp-demo-"))
    federation = args.federation or f"demo-{uuid.uuid4().hex[:6]}"
    say(f"  federation {federation!r} (its queues and exchanges are named tff.{federation}.*)")
    try:
        folders = write_sample_data(root, fmt=args.format)
        say(f"  sample spreadsheets ({args.format}) written under {root}")
        started = time.monotonic()
        with LocalFederation(args.broker, federation, log_dir=root / "logs") as local:
            for clinic, folder in folders.items():
                spec = data_spec(folder)
                local.start_silo(clinic, data={"patients": spec})
                say(f"  started silo {clinic} ({CLINICS[clinic]} wards: --data patients={spec})")
            say("  loading TensorFlow Federated and building computations (each silo loads it too)")
            with _SiloWatcher(local, say, started):
                comps = _computations()
                _INTERRUPTS.check()
                say(f"  computations built ({time.monotonic() - started:.0f} s)")
                local.wait_ready(timeout=180)
            _INTERRUPTS.check()
            say(
                f"  {len(folders)} silos connected within {time.monotonic() - started:.0f} s of "
                "starting (each opened one outbound AMQP connection)"
            )
            _run_jobs(
                args.broker, federation, len(folders), comps, folders, args.rounds, say, options
            )
        kept = f"; data and logs kept in {root}" if keep_data is not None else ""
        say(f"Done. Stopped {len(folders)} silos{kept}.")
        return 0
    finally:
        if keep_data is None:
            shutil.rmtree(root, ignore_errors=True)
        _remove_federation(args, federation, list(CLINICS), say)


def _remove_federation(
    args: argparse.Namespace, federation: str, silos: list[str], say: _Printer
) -> None:
    """Remove the demo's queues and exchanges (its silos are stopped by now)
    unless --keep; say what happened either way."""
    if args.keep:
        say(
            f"Kept federation {federation!r} on the broker; remove it with "
            f"`tff-amqp federation remove {federation}`."
        )
        return
    from tff_amqp.errors import TffAmqpError
    from tff_amqp.federation_cli import remove_after_demo

    try:
        removed = remove_after_demo(args.broker, federation, silos)
    except (TffAmqpError, OSError) as e:
        print(
            f"warning: could not remove federation {federation!r} ({e}); remove it with "
            f"`tff-amqp federation remove {federation}`",
            file=sys.stderr,
        )
        return
    say(f"Removed federation {federation!r} from the broker ({len(removed)} queues and exchanges).")


class _SiloWatcher:
    """While the demo loads TensorFlow, a thread says when each silo is up."""

    def __init__(self, local: Any, say: _Printer, started: float) -> None:
        self._local = local
        self._say = say
        self._started = started
        self._stop = threading.Event()
        self._pending = dict(local.silos)
        self._thread = threading.Thread(target=self._watch, name="silo-watcher", daemon=True)

    def __enter__(self) -> _SiloWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        if not self._thread.is_alive():
            # A silo that came up after the thread's last look is reported too.
            self._sweep()

    def _watch(self) -> None:
        while self._pending and not self._stop.wait(0.25):
            self._sweep()

    def _sweep(self) -> None:
        for name, silo in list(self._pending.items()):
            if silo.is_ready():
                del self._pending[name]
                self._say(
                    f"  silo {name} is up ({time.monotonic() - self._started:.0f} s; "
                    f"{len(self._local.silos) - len(self._pending)}/{len(self._local.silos)})"
                )
            elif not silo.running:
                del self._pending[name]  # wait_ready reports it, with its log


def _run_with_running_silos(
    args: argparse.Namespace, silos: list[str], options: dict[str, Any], say: _Printer
) -> int:
    federation = args.federation or "demo"
    say(f"  federation {federation!r}: waiting for silos {', '.join(silos)} (at most 180 s)")
    say("  loading TensorFlow Federated and building computations ...")
    comps = _computations()
    _INTERRUPTS.check()
    _run_jobs(args.broker, federation, len(silos), comps, None, args.rounds, say, options)
    say("Done.")
    return 0


def _run_jobs(
    broker_url: str,
    federation: str,
    n_silos: int,
    comps: dict[str, Any],
    folders: dict[str, Path] | None,
    rounds: int,
    say: _Printer,
    options: dict[str, Any],
) -> None:
    import tff_amqp

    with tff_amqp.create_sync_amqp_execution_context(
        broker_url, federation=federation, min_silos=n_silos, cohort_timeout=180.0, **options
    ) as context:
        context.start()
        telemetry = context.runtime.telemetry
        port = context.runtime.telemetry.metrics_port if context.runtime.telemetry else None
        if port is not None:
            say(f"  coordinator metrics: http://127.0.0.1:{port}/metrics")
        import tensorflow_federated as tff

        with tff.framework.get_context_stack().install(context):
            say("")
            say("1) Federated analytics: mean glucose across all clinics")
            t0 = time.monotonic()
            mean = float(comps["mean_glucose"](tff_amqp.silo_data("patients")))
            elapsed = time.monotonic() - t0
            say(
                f"   federated result   {mean:8.4f} mmol/L  ({elapsed:.2f} s; only per-ward sums "
                "and counts left the silos)"
            )
            if folders is not None:
                direct, n = _direct_mean(folders, "glucose")
                say(f"   direct from files  {direct:8.4f} mmol/L  ({n} patients; demo check only)")

            say("")
            plural = "round" if rounds == 1 else "rounds"
            say(f"2) Federated training: FedAvg, logistic regression, {rounds} {plural}")
            # With progress on, the table comes after the rounds: progress
            # lines and bars (stderr) never land between its rows.
            live_table = telemetry is None or telemetry.progress is None
            table = ["   round    loss  accuracy   time"]
            if live_table:
                say(table[0])
            else:
                say(f"   training ({rounds} {plural}; progress on stderr) ...")
            process = comps["process"]
            state = process.initialize()
            for r in range(1, rounds + 1):
                _INTERRUPTS.check()
                t0 = time.monotonic()
                output = comps["train_round"](state, tff_amqp.silo_data("patients"))
                state = output.state
                train = output.metrics["client_work"]["train"]
                loss, accuracy = float(train["loss"]), float(train["sparse_categorical_accuracy"])
                row = f"   {r:5d}  {loss:6.3f}  {accuracy:8.3f}  {time.monotonic() - t0:5.2f} s"
                table.append(row)
                if live_table:
                    say(row)
            if not live_table:
                for line in table:
                    say(line)
        stats = context.runtime.link.stats
        say("")
        say(
            f"   broker traffic: {stats['published']} request messages "
            f"({stats['published_bytes'] / 1e6:.2f} MB) out, "
            f"{stats['received_bytes'] / 1e6:.2f} MB in (aggregates and heartbeats)"
        )


def _broker_answers(broker_url: str, timeout: float = 5.0) -> bool:
    """Probe the broker (`timeout` s); if it does not answer, say on stderr
    exactly how to get one. Refused credentials or a malformed URL are
    raised (the command line turns them into one line)."""
    import asyncio

    from tff_amqp.errors import BrokerAuthError, BrokerUnreachableError
    from tff_amqp.retry import connect_within
    from tff_amqp.transport.connection import connect

    async def probe() -> None:
        connection = await connect(
            broker_url, name="tff-amqp demo probe", policy=connect_within(timeout)
        )
        await connection.close()

    try:
        asyncio.run(probe())
        return True
    except BrokerAuthError:
        raise
    except BrokerUnreachableError as e:
        # The error's own advice is one line; the demo gives the full list.
        reason = str(e).split(" Start one with", 1)[0]
        # stderr: the failure, in one line; stdout: the guide to fixing it.
        print(f"\n{NO_BROKER_HELP}", flush=True)
        print(f"tff-amqp demo: {reason}", file=sys.stderr, flush=True)
        return False


NO_BROKER_HELP = """\
How to get a RabbitMQ broker for the demo:
  RabbitMQ installed here:   rabbitmq-server -detached
                             (ready when `rabbitmq-diagnostics -q ping` succeeds)
  not installed (Debian):    sudo apt-get install rabbitmq-server
  with Docker:               docker compose up -d rabbitmq   (in the tff-amqp repository)
  a broker elsewhere:        tff-amqp demo --broker amqp://USER:PASSWORD@HOST:5672/
                             (or export TFF_AMQP_BROKER=amqp://...)
Then run the demo again: bash scripts/demo.sh"""


class _Printer:
    def __call__(self, line: str) -> None:
        print(line, flush=True)
