"""Example coordinator program for the Kubernetes Job: the federated mean of
the `glucose` column of every silo's `patients` data (the demo's spreadsheets).
Replace it with your own program; the environment gives the broker URL
(TFF_AMQP_BROKER, from a Secret), the federation and the cohort size."""

import collections
import os

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

import tff_amqp

ROW = collections.OrderedDict(
    age=np.float32, systolic_bp=np.float32, glucose=np.float32, diabetic=np.int32
)


@tff.tensorflow.computation(tff.SequenceType(ROW))
def glucose_total_and_count(rows):
    return rows.reduce(
        (np.float64(0), np.float64(0)),
        lambda acc, row: (acc[0] + tf.cast(row["glucose"], tf.float64), acc[1] + 1.0),
    )


@tff.tensorflow.computation(np.float64, np.float64)
def ratio(total, count):
    return total / count


@tff.federated_computation(tff.FederatedType(tff.SequenceType(ROW), tff.CLIENTS))
def mean_glucose(rows):
    sums = tff.federated_sum(tff.federated_map(glucose_total_and_count, rows))
    return tff.federated_map(ratio, sums)


def main() -> None:
    min_silos = os.environ.get("MIN_SILOS")
    tff_amqp.set_sync_amqp_execution_context(
        os.environ["TFF_AMQP_BROKER"],
        federation=os.environ["FEDERATION"],
        # Unset: every cohort silo must answer; K: K of N (docs/failures.md).
        min_silos=int(min_silos) if min_silos else None,
        queue_type=os.environ.get("TFF_AMQP_QUEUE_TYPE", "classic"),
        cohort_timeout=300.0,
        deadline=600.0,
    )
    mean = float(mean_glucose(tff_amqp.silo_data("patients")))
    print(f"mean glucose over the federation: {mean:.4f}")


if __name__ == "__main__":
    main()
