"""Silo data stays at the silo; only aggregates leave it.

Over the real broker with real silo processes: a federated mean of a CSV
column equals the mean computed from the files, no row reaches the
coordinator, raw client values are refused by default and served only with
the explicit opt-in flag, and a refusing silo keeps serving.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
import tensorflow_federated as tff

import tff_amqp
from tests.support.computations import ROW, ROWS_AT_CLIENTS, mean_glucose
from tests.support.data import read_column, read_column_of_file
from tests.support.federation import local_federation, run_in, start_federation
from tff_amqp import protocol
from tff_amqp.errors import SiloError


@tff.federated_computation(ROWS_AT_CLIENTS)
def client_counts(rows):
    # Releases one value per client: not an aggregate.
    return tff.federated_map(
        tff.tensorflow.computation(
            lambda ds: ds.reduce(np.int32(0), lambda n, _: n + 1), tff.SequenceType(ROW)
        ),
        rows,
    )


def test_federated_mean_of_csv_column_equals_direct_mean(amqp_context, silo_federation):
    link = amqp_context.runtime.link
    received: list[bytes] = []
    link.taps.append(received.append)
    try:
        result = run_in(amqp_context, mean_glucose, tff_amqp.silo_data("readings"))
    finally:
        link.taps.remove(received.append)

    values = [
        v for folder in silo_federation.silos.values() for v in read_column(folder, "glucose")
    ]
    # The silos cast to float32 first, as the element type asks.
    expected = np.mean(np.asarray(values, np.float32).astype(np.float64))
    np.testing.assert_allclose(result, expected, rtol=1e-9)

    # No row reached the coordinator: none of the glucose values appears in
    # any received payload, in any encoding the silo might have used.
    payload = b"".join(received)
    assert payload, "the coordinator received no replies at all"
    for value in values:
        for encoded in (
            struct.pack("<f", value),
            struct.pack("<d", float(np.float32(value))),
            f"{value}".encode(),
        ):
            assert encoded not in payload, f"raw row value {value} reached the coordinator"
    assert b"confidential" not in payload
    # Replies are a few partial aggregates, far smaller than the data.
    # (Heartbeats are excluded: how many arrive depends on how long the call took.)
    status = {protocol.Kind.HELLO, protocol.Kind.HEARTBEAT, protocol.Kind.GOODBYE}
    replies = [b for b in received if protocol.decode(b).kind not in status]
    assert replies, "no result reached the coordinator"
    csv_bytes = sum(
        p.stat().st_size for f in silo_federation.silos.values() for p in f.glob("*.csv")
    )
    assert sum(len(b) for b in replies) < csv_bytes


def test_raw_client_values_are_refused_by_default_and_silo_keeps_serving(amqp_context):
    with pytest.raises(SiloError) as error:
        run_in(amqp_context, client_counts, tff_amqp.silo_data("readings"))
    assert error.value.code == "privacy_refused"
    assert "--allow-raw-client-values" in str(error.value)
    # The silos are still there and still answer.
    assert run_in(amqp_context, mean_glucose, tff_amqp.silo_data("readings")) > 0


@pytest.mark.slow
def test_raw_client_values_served_with_opt_in(amqp_url, tmp_path):
    with local_federation(amqp_url, tmp_path / "logs") as local:
        federation = start_federation(
            local,
            tmp_path,
            names=("solo",),
            clients_per_silo=(3,),
            extra_args=("--allow-raw-client-values",),
        )
        with tff_amqp.create_sync_amqp_execution_context(
            amqp_url, federation=federation.name, cohort_timeout=120.0
        ) as context:
            counts = run_in(context, client_counts, tff_amqp.silo_data("readings"))
    files = sorted(federation.silos["solo"].glob("*.csv"))
    expected = [len(read_column_of_file(f, "age")) for f in files]
    assert len(files) == 3
    assert [int(c) for c in counts] == expected


def test_missing_data_key_is_a_clear_error_naming_the_silo(amqp_context):
    with pytest.raises(SiloError) as error:
        run_in(amqp_context, mean_glucose, tff_amqp.silo_data("no-such-key"))
    assert error.value.code == "data_error"
    assert "no-such-key" in str(error.value)
    assert error.value.silo in str(error.value)
