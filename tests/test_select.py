"""federated_select and the sequence intrinsics: tff-amqp (3 real silos) against
TFF's native runtime, in the same test.

Silos release only aggregates, so per-client results are checked through one:
each client puts its selected values in the row of a matrix given by its own
client id (one-hot, zeros elsewhere) and the matrices are summed. Adding
zeros is exact, so the sum is every client's own result, in client order.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

import tff_amqp
from tests.support.federation import assert_close, run_in
from tff_amqp.errors import SiloError, UnsupportedIntrinsicError

# Long real-broker tests: not in the fast subset (-m 'not slow').
pytestmark = pytest.mark.slow

# ------------------------------------------------------------ select helpers


def _rows_select(table_rows: int, width: int) -> Any:
    @tff.tensorflow.computation(tff.TensorType(np.float32, [table_rows, width]), np.int32)
    def row_of(table: Any, key: Any) -> Any:
        return tf.gather(table, key)

    return row_of


def _spread(clients: int, keys: int, width: int) -> Any:
    """(client id, sequence of `keys` rows) -> that client's count and rows,
    placed in row `id` of zero tensors."""

    @tff.tensorflow.computation(np.int32, tff.SequenceType(tff.TensorType(np.float32, [width])))
    def spread(client_id: Any, rows: Any) -> Any:
        stacked = rows.reduce(
            tf.zeros([0, width], tf.float32), lambda acc, row: tf.concat([acc, row[None]], 0)
        )
        stacked = tf.ensure_shape(stacked, [keys, width])
        count = rows.reduce(np.int32(0), lambda n, _: n + 1)
        one_hot = tf.one_hot(client_id, clients, dtype=tf.int32)
        return collections.OrderedDict(
            count=one_hot * count,
            rows=tf.cast(one_hot, tf.float32)[:, None, None] * stacked[None],
        )

    return spread


def select_rows(clients: int, keys: int, table_rows: int, width: int) -> Any:
    """Every client selects rows of a SERVER table by its keys; the result is
    each client's selected rows (in key order) and their count, by client id."""
    table_type = tff.TensorType(np.float32, [table_rows, width])
    row_of = _rows_select(table_rows, width)
    spread = _spread(clients, keys, width)

    @tff.federated_computation(
        tff.FederatedType(tff.TensorType(np.int32, [keys]), tff.CLIENTS),
        tff.FederatedType(np.int32, tff.CLIENTS),
        tff.FederatedType(table_type, tff.SERVER),
        tff.FederatedType(np.int32, tff.SERVER),
    )
    def comp(client_keys: Any, ids: Any, table: Any, max_key: Any) -> Any:
        rows = tff.federated_select(client_keys, max_key, table, row_of)
        return tff.federated_sum(tff.federated_map(spread, tff.federated_zip((ids, rows))))

    return comp


def both(comp: Any, *args: Any, amqp_context: Any, native_context: Any) -> tuple[Any, Any]:
    return run_in(amqp_context, comp, *args), run_in(native_context, comp, *args)


def assert_same_rows(actual: Any, expected: Any) -> None:
    np.testing.assert_array_equal(actual["count"], expected["count"])
    assert_close(actual["rows"], expected["rows"])


def table(rows: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, width)).astype(np.float32)


# ------------------------------------------------------------------- select


def test_select_uneven_clients_repeated_keys(amqp_context, native_context):
    # 7 clients over 3 silos (3/2/2); keys repeat within a client, across
    # clients and across silos; key 0 and max_key both used.
    keys = [[0, 5, 5], [1, 2, 3], [5, 0, 1], [5, 5, 5], [2, 2, 0], [4, 1, 4], [0, 0, 0]]
    comp = select_rows(clients=len(keys), keys=3, table_rows=6, width=2)
    args = ([np.array(k, np.int32) for k in keys], list(range(len(keys))), table(6, 2), 5)
    actual, expected = both(comp, *args, amqp_context=amqp_context, native_context=native_context)
    assert_same_rows(actual, expected)
    # And both equal the definition: client c gets table[keys[c]] in key order.
    np.testing.assert_array_equal(actual["count"], [3] * len(keys))
    np.testing.assert_array_equal(actual["rows"], table(6, 2)[np.array(keys)])


def test_select_with_no_keys_is_a_clear_error_as_native_cannot_run_it(amqp_context, native_context):
    # Key tensors have a static shape, so "no keys" means no keys for anyone.
    # TFF's worker cannot build the empty sequences; tff-amqp says so before
    # shipping anything.
    comp = select_rows(clients=4, keys=0, table_rows=3, width=2)
    args = ([np.zeros([0], np.int32)] * 4, [0, 1, 2, 3], table(3, 2), 2)
    with pytest.raises(Exception, match="cannot be used to create zero-length datasets"):
        run_in(native_context, comp, *args)
    with pytest.raises(
        UnsupportedIntrinsicError, match=r"zero keys per client \(\{int32\[0\]\}@CLIENTS\)"
    ):
        run_in(amqp_context, comp, *args)


def test_select_one_client_per_silo(amqp_context, native_context):
    comp = select_rows(clients=3, keys=2, table_rows=4, width=3)
    args = ([np.array(k, np.int32) for k in ([3, 0], [3, 3], [1, 2])], [0, 1, 2], table(4, 3), 3)
    actual, expected = both(comp, *args, amqp_context=amqp_context, native_context=native_context)
    assert_same_rows(actual, expected)


def test_select_fewer_clients_than_silos(amqp_context, native_context):
    comp = select_rows(clients=2, keys=2, table_rows=4, width=2)
    args = ([np.array([1, 3], np.int32), np.array([3, 1], np.int32)], [0, 1], table(4, 2), 3)
    actual, expected = both(comp, *args, amqp_context=amqp_context, native_context=native_context)
    assert_same_rows(actual, expected)


def select_entries(fields: tuple[str, str]) -> Any:
    """Clients select entries (a float32[3] row and an int32) of a SERVER
    database, a struct whose fields are named `fields` in that order; the
    result is each client's two entries, by client id."""
    floats, ints = fields

    def ordered(by_field: dict[str, Any]) -> collections.OrderedDict:
        return collections.OrderedDict((name, by_field[name]) for name in fields)

    db_type = tff.to_type(
        ordered({floats: tff.TensorType(np.float32, [5, 3]), ints: tff.TensorType(np.int32, [5])})
    )
    entry_type = ordered({floats: tff.TensorType(np.float32, [3]), ints: tff.TensorType(np.int32)})

    @tff.tensorflow.computation(db_type, np.int32)
    def entry_of(db: Any, key: Any) -> Any:
        return ordered({floats: tf.gather(db[floats], key), ints: tf.gather(db[ints], key)})

    @tff.tensorflow.computation(np.int32, tff.SequenceType(entry_type))
    def spread(client_id: Any, entries: Any) -> Any:
        stacked = entries.reduce(
            (tf.zeros([0, 3], tf.float32), tf.zeros([0], tf.int32)),
            lambda acc, e: (
                tf.concat([acc[0], e[floats][None]], 0),
                tf.concat([acc[1], e[ints][None]], 0),
            ),
        )
        one_hot = tf.one_hot(client_id, 5, dtype=tf.int32)
        return ordered(
            {
                floats: tf.cast(one_hot, tf.float32)[:, None, None]
                * tf.ensure_shape(stacked[0], [2, 3])[None],
                ints: one_hot[:, None] * tf.ensure_shape(stacked[1], [2])[None],
            }
        )

    @tff.federated_computation(
        tff.FederatedType(tff.TensorType(np.int32, [2]), tff.CLIENTS),
        tff.FederatedType(np.int32, tff.CLIENTS),
        tff.FederatedType(db_type, tff.SERVER),
    )
    def comp(client_keys: Any, ids: Any, db: Any) -> Any:
        max_key = tff.federated_value(np.int32(4), tff.SERVER)
        entries = tff.federated_select(client_keys, max_key, db, entry_of)
        return tff.federated_sum(tff.federated_map(spread, tff.federated_zip((ids, entries))))

    return comp


ENTRY_KEYS = [np.array(k, np.int32) for k in ([4, 0], [2, 2], [0, 4], [1, 3], [3, 3])]


def database(fields: tuple[str, str]) -> collections.OrderedDict:
    floats, ints = fields
    by_field = {floats: table(5, 3, seed=1), ints: np.arange(5, dtype=np.int32) * 7}
    return collections.OrderedDict((name, by_field[name]) for name in fields)


def test_select_structured_server_value(amqp_context, native_context):
    fields = ("bias", "weights")
    args = (ENTRY_KEYS, [0, 1, 2, 3, 4], database(fields))
    actual, expected = both(
        select_entries(fields), *args, amqp_context=amqp_context, native_context=native_context
    )
    np.testing.assert_array_equal(actual["bias"], expected["bias"])
    np.testing.assert_array_equal(actual["bias"], database(fields)["bias"][np.array(ENTRY_KEYS)])
    assert_close(actual["weights"], expected["weights"])
    assert_close(actual["weights"], database(fields)["weights"][np.array(ENTRY_KEYS)])


def test_select_struct_fields_out_of_name_order_fail_as_in_native(amqp_context, native_context):
    # TFF's worker builds each client's sequence with struct fields in name
    # order; a select_fn whose result names them otherwise gets a dataset the
    # consumer cannot read, natively too. tff-amqp runs the same worker, so it
    # fails alike (docs/intrinsics.md): keep result fields in name order.
    fields = ("weights", "bias")
    args = (ENTRY_KEYS, [0, 1, 2, 3, 4], database(fields))
    comp = select_entries(fields)
    with pytest.raises(Exception, match="Type mismatch"):
        run_in(native_context, comp, *args)
    with pytest.raises(SiloError, match="Type mismatch"):
        run_in(amqp_context, comp, *args)


@tff.tensorflow.computation(tff.TensorType(np.float32, [4]), np.int32)
def scaled_by_key(vector: Any, key: Any) -> Any:
    return vector * tf.cast(key, tf.float32)


@tff.tensorflow.computation(tff.SequenceType(tff.TensorType(np.float32, [4])))
def sum_and_squares(vectors: Any) -> Any:
    return vectors.reduce(
        (tf.zeros([4]), tf.zeros([4])), lambda acc, v: (acc[0] + v, acc[1] + v * v)
    )


def test_secure_select_has_plain_select_semantics(amqp_context, native_context):
    # TFF's native runtime cannot run federated_secure_select; tff-amqp runs
    # it as a select at the silos (the keys never leave them), so its result
    # must be native's plain federated_select's.
    def build(select: Any) -> Any:
        @tff.federated_computation(
            tff.FederatedType(tff.TensorType(np.int32, [3]), tff.CLIENTS),
            tff.FederatedType(tff.TensorType(np.float32, [4]), tff.SERVER),
        )
        def comp(client_keys: Any, vector: Any) -> Any:
            max_key = tff.federated_value(np.int32(9), tff.SERVER)
            chosen = select(client_keys, max_key, vector, scaled_by_key)
            return tff.federated_sum(tff.federated_map(sum_and_squares, chosen))

        return comp

    keys = [np.array(k, np.int32) for k in ([1, 2, 8], [8, 8, 0], [3, 1, 4], [5, 9, 2])]
    vector = np.array([1.0, -2.0, 0.5, 3.0], np.float32)
    expected = run_in(native_context, build(tff.federated_select), keys, vector)
    actual = run_in(amqp_context, build(tff.federated_secure_select), keys, vector)
    assert_close(actual, expected)


def test_large_server_value_is_published_once_for_all_silos(amqp_context, native_context):
    # 8 MB table, above the inline limit: one chunked transfer that the broker
    # fans out to the 3 silos, not one per silo or per client.
    rows, width = 500_000, 4
    comp = select_rows(clients=5, keys=2, table_rows=rows, width=width)
    keys = [np.array(k, np.int32) for k in ([0, rows - 1], [7, 7], [123_456, 0], [1, 2], [3, 9])]
    args = (keys, [0, 1, 2, 3, 4], table(rows, width, seed=3), rows - 1)
    bulk = amqp_context.runtime.bulk
    sent_before, transfers_before = bulk.sent_bytes, bulk.transfers
    actual = run_in(amqp_context, comp, *args)
    sent, transfers = bulk.sent_bytes - sent_before, bulk.transfers - transfers_before
    expected = run_in(native_context, comp, *args)
    assert_same_rows(actual, expected)
    table_bytes = 4 * rows * width
    assert transfers == 1
    assert table_bytes <= sent < 1.1 * table_bytes


# ------------------------------------------------- opt-in: only slices shipped


@pytest.fixture
def sliced_context(amqp_context: Any) -> Iterator[Any]:
    """The shared context with `select_slices` on for one test. (Switched on
    the running context: a second coordinator of the federation is refused.)"""
    runtime = amqp_context.runtime
    plain = runtime.options
    runtime.options = dataclasses.replace(plain, select_slices=True)
    try:
        yield amqp_context
    finally:
        runtime.options = plain


def test_sliced_select_uneven_clients_repeated_keys(sliced_context, native_context):
    keys = [[0, 5, 5], [1, 2, 3], [5, 0, 1], [5, 5, 5], [2, 2, 0], [4, 1, 4], [0, 0, 0]]
    comp = select_rows(clients=len(keys), keys=3, table_rows=6, width=2)
    args = ([np.array(k, np.int32) for k in keys], list(range(len(keys))), table(6, 2), 5)
    actual, expected = both(comp, *args, amqp_context=sliced_context, native_context=native_context)
    assert_same_rows(actual, expected)
    np.testing.assert_array_equal(actual["rows"], table(6, 2)[np.array(keys)])


def test_sliced_select_structured_server_value(sliced_context, native_context):
    fields = ("bias", "weights")
    args = (ENTRY_KEYS, [0, 1, 2, 3, 4], database(fields))
    actual, expected = both(
        select_entries(fields), *args, amqp_context=sliced_context, native_context=native_context
    )
    np.testing.assert_array_equal(actual["bias"], expected["bias"])
    assert_close(actual["weights"], expected["weights"])


def test_sliced_select_ships_only_requested_slices(sliced_context, native_context):
    # The same 8 MB table as above; 5 clients ask for 8 distinct rows: a few
    # hundred bytes of slices go out (inline), no transfer of the table.
    rows, width = 500_000, 4
    comp = select_rows(clients=5, keys=2, table_rows=rows, width=width)
    keys = [np.array(k, np.int32) for k in ([0, rows - 1], [7, 7], [123_456, 0], [1, 2], [3, 9])]
    args = (keys, [0, 1, 2, 3, 4], table(rows, width, seed=3), rows - 1)
    link, bulk = sliced_context.runtime.link, sliced_context.runtime.bulk
    sliced_context.run(sliced_context.runtime.settle())
    published_before, transfers_before = link.stats["published_bytes"], bulk.transfers
    actual = run_in(sliced_context, comp, *args)
    published = link.stats["published_bytes"] - published_before
    expected = run_in(native_context, comp, *args)
    assert_same_rows(actual, expected)
    assert bulk.transfers == transfers_before
    assert published < 4 * rows * width / 20


def test_sliced_select_refuses_keys_beyond_max_key(sliced_context, native_context):
    # TFF documents keys in [0, max_key]; native does not check (a select_fn
    # that gathers still works), but slices are only computed for that range.
    comp = select_rows(clients=3, keys=2, table_rows=6, width=2)
    args = ([np.array(k, np.int32) for k in ([0, 1], [2, 5], [1, 1])], [0, 1, 2], table(6, 2), 3)
    assert run_in(native_context, comp, *args)["count"].sum() == 6
    with pytest.raises(ValueError, match=r"outside \[0, max_key=3\]"):
        run_in(sliced_context, comp, *args)


# ----------------------------------------------------- select over silo data

ROW = collections.OrderedDict(age=np.int32, glucose=np.float32)
KEYS_PER_CLIENT = 4  # every fixture client has at least 4 rows
AGE_BUCKETS = 10


@tff.tensorflow.computation(tff.SequenceType(ROW))
def age_buckets(rows: Any) -> Any:
    keys = rows.take(KEYS_PER_CLIENT).map(lambda r: r["age"] // AGE_BUCKETS)
    keys = keys.batch(KEYS_PER_CLIENT).reduce(
        tf.zeros([0], tf.int32), lambda acc, b: tf.concat([acc, b], 0)
    )
    return tf.ensure_shape(keys, [KEYS_PER_CLIENT])


@tff.tensorflow.computation(tff.TensorType(np.float32, [AGE_BUCKETS, 2]), np.int32)
def bucket_row(buckets: Any, key: Any) -> Any:
    return tf.gather(buckets, key)


@tff.tensorflow.computation(tff.SequenceType(tff.TensorType(np.float32, [2])))
def weighted_by_position(rows: Any) -> Any:
    # Order-sensitive: a client receiving its rows in another order differs.
    return rows.enumerate().reduce(
        tf.zeros([2]), lambda acc, item: acc + tf.cast(item[0] + 1, tf.float32) * item[1]
    )


@tff.federated_computation(
    tff.FederatedType(tff.SequenceType(ROW), tff.CLIENTS),
    tff.FederatedType(tff.TensorType(np.float32, [AGE_BUCKETS, 2]), tff.SERVER),
)
def select_by_age_bucket(readings: Any, buckets: Any) -> Any:
    client_keys = tff.federated_map(age_buckets, readings)
    max_key = tff.federated_value(np.int32(AGE_BUCKETS - 1), tff.SERVER)
    chosen = tff.federated_select(client_keys, max_key, buckets, bucket_row)
    return tff.federated_sum(tff.federated_map(weighted_by_position, chosen))


def client_datasets(silo_federation: Any) -> list[tf.data.Dataset]:
    """The fixture silos' CSV clients in federation order, for TFF native."""
    datasets = []
    for folder in silo_federation.silos.values():
        for path in sorted(Path(folder).glob("*.csv")):
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
            datasets.append(
                tf.data.Dataset.from_tensor_slices(
                    collections.OrderedDict(
                        age=np.array([int(r["age"]) for r in rows], np.int32),
                        glucose=np.array([float(r["glucose"]) for r in rows], np.float32),
                    )
                )
            )
    return datasets


def test_select_keys_from_silo_data(amqp_context, native_context, silo_federation):
    buckets = table(AGE_BUCKETS, 2, seed=4)
    actual = run_in(amqp_context, select_by_age_bucket, tff_amqp.silo_data("readings"), buckets)
    expected = run_in(
        native_context, select_by_age_bucket, client_datasets(silo_federation), buckets
    )
    assert_close(actual, expected)
    assert np.any(actual != 0)


# ------------------------------------------------------- sequence intrinsics

F32_SEQ = tff.SequenceType(np.float32)
CLIENT_SEQUENCES = [[1.0, 2.0, 3.5], [], [-4.0], [0.25, 0.5], [10.0, -1.0, 2.0, 7.0]]


@tff.tensorflow.computation(np.float32, np.float32)
def add(a: Any, b: Any) -> Any:
    return a + b


@tff.tensorflow.computation(np.float32)
def squared(x: Any) -> Any:
    return x * x


reduce_sum = tff.federated_computation(
    lambda ds: tff.sequence_reduce(ds, np.float32(0.0), add), F32_SEQ
)
sum_of_squares = tff.federated_computation(
    lambda ds: tff.sequence_reduce(tff.sequence_map(squared, ds), np.float32(0.0), add), F32_SEQ
)


@tff.federated_computation(tff.FederatedType(F32_SEQ, tff.CLIENTS))
def reduce_at_clients(data: Any) -> Any:
    return tff.federated_sum(tff.federated_map(reduce_sum, data)), tff.federated_max(
        tff.federated_map(sum_of_squares, data)
    )


@tff.federated_computation(tff.FederatedType(F32_SEQ, tff.SERVER))
def reduce_at_server(data: Any) -> Any:
    return tff.federated_map(sum_of_squares, data)


@tff.federated_computation(F32_SEQ)
def reduce_unplaced(data: Any) -> Any:
    return tff.sequence_reduce(data, np.float32(0.0), add)


@tff.federated_computation(tff.FederatedType(tff.SequenceType(ROW), tff.CLIENTS))
def glucose_sum_of_squares(readings: Any) -> Any:
    glucose = tff.tensorflow.computation(lambda r: r["glucose"], ROW)
    per_client = tff.federated_computation(
        lambda ds: tff.sequence_reduce(
            tff.sequence_map(squared, tff.sequence_map(glucose, ds)), np.float32(0.0), add
        ),
        tff.SequenceType(ROW),
    )
    return tff.federated_sum(tff.federated_map(per_client, readings))


@pytest.mark.parametrize(
    "comp, arg",
    [
        (reduce_at_clients, CLIENT_SEQUENCES),
        (reduce_at_server, [3.0, -1.5, 2.0]),
        (reduce_unplaced, [3.0, -1.5, 2.0]),
    ],
    ids=["at_clients", "at_server", "unplaced"],
)
def test_sequence_reduce_and_map_match_native(comp, arg, amqp_context, native_context):
    actual, expected = both(comp, arg, amqp_context=amqp_context, native_context=native_context)
    assert_close(actual, expected)


def test_sequence_map_over_silo_data(amqp_context, native_context, silo_federation):
    actual = run_in(amqp_context, glucose_sum_of_squares, tff_amqp.silo_data("readings"))
    expected = run_in(native_context, glucose_sum_of_squares, client_datasets(silo_federation))
    assert_close(actual, expected)
    assert actual > 0


@tff.federated_computation(tff.FederatedType(F32_SEQ, tff.CLIENTS))
def sequence_sum_at_clients(data: Any) -> Any:
    return tff.federated_sum(
        tff.federated_map(tff.federated_computation(tff.sequence_sum, F32_SEQ), data)
    )


@tff.federated_computation(F32_SEQ)
def sequence_sum_unplaced(data: Any) -> Any:
    return tff.sequence_sum(data)


@pytest.mark.parametrize(
    "comp, arg",
    [(sequence_sum_at_clients, CLIENT_SEQUENCES), (sequence_sum_unplaced, [1.0, 2.0])],
    ids=["at_clients", "unplaced"],
)
def test_sequence_sum_is_a_clear_error_as_native_cannot_run_it(
    comp, arg, amqp_context, native_context
):
    with pytest.raises(Exception, match="does not support intrinsic URI: sequence_sum"):
        run_in(native_context, comp, arg)
    with pytest.raises(UnsupportedIntrinsicError, match=r"sequence_sum.*sequence_reduce"):
        run_in(amqp_context, comp, arg)
    # The federation still serves.
    assert run_in(amqp_context, reduce_unplaced, [1.0, 2.0]) == pytest.approx(3.0)


def test_sliced_select_keys_from_silo_data(sliced_context, native_context, silo_federation):
    buckets = table(AGE_BUCKETS, 2, seed=5)
    actual = run_in(sliced_context, select_by_age_bucket, tff_amqp.silo_data("readings"), buckets)
    expected = run_in(
        native_context, select_by_age_bucket, client_datasets(silo_federation), buckets
    )
    assert_close(actual, expected)
    assert np.any(actual != 0)
