"""When an aggregation phase stops waiting for silos that have not answered."""

from __future__ import annotations

import pytest

from tff_amqp.coordinator.options import CoordinatorOptions
from tff_amqp.coordinator.quorum import cohort_floor, drop_reason, phase_cutoff, quorum_of
from tff_amqp.errors import SiloError, SiloRestartedError, SiloUnreachableError, SiloWorkerError


def test_without_limits_the_phase_waits_for_every_silo():
    assert phase_cutoff(100.0, None, None, None) is None
    assert phase_cutoff(100.0, 101.0, None, None) is None


def test_straggler_timeout_counts_from_the_start_of_the_phase():
    assert phase_cutoff(100.0, None, 2.0, None) == 102.0
    assert phase_cutoff(100.0, 101.5, 2.0, None) == 102.0


def test_quorum_grace_counts_from_the_quorum_and_needs_one():
    assert phase_cutoff(100.0, None, None, 0.5) is None  # no quorum yet: no grace
    assert phase_cutoff(100.0, 103.0, None, 0.5) == 103.5


def test_the_earlier_limit_wins():
    assert phase_cutoff(100.0, 100.2, 2.0, 0.5) == 100.7
    assert phase_cutoff(100.0, 101.8, 2.0, 0.5) == 102.0


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"min_silos": 1, "quorum_grace": -1.0}, "quorum_grace"),
        ({"min_silos": 1, "straggler_timeout": 0.0}, "straggler_timeout"),
        ({"min_silos": 0}, "min_silos"),
        # Cut-offs drop silos down to min_silos: without it they could drop nobody.
        ({"straggler_timeout": 5.0}, "set min_silos=K"),
        ({"quorum_grace": 1.0}, "set min_silos=K"),
        ({"min_silos": 3, "max_silos": 2}, "max_silos"),
    ],
)
def test_bad_options_are_refused_with_the_option_named(options, words):
    with pytest.raises(ValueError, match=words):
        CoordinatorOptions(broker_url="amqp://guest:guest@127.0.0.1/", **options)


def test_by_default_every_cohort_silo_is_required():
    # min_silos unset: one live silo starts the cohort, all of it must answer.
    assert cohort_floor(None) == 1
    assert [quorum_of(None, n) for n in (1, 3, 8)] == [1, 3, 8]
    assert CoordinatorOptions(broker_url="amqp://guest:guest@127.0.0.1/").min_silos is None


def test_k_of_n_needs_min_silos_and_never_more_than_the_cohort():
    assert cohort_floor(3) == 3
    assert quorum_of(3, 8) == 3
    assert quorum_of(3, 2) == 2  # fewer clients than min_silos: every chosen silo


def test_which_silo_errors_may_drop_a_silo():
    assert drop_reason(None) == "straggler"
    assert drop_reason(SiloError("a", "lost", "heartbeats lapsed")) == "lost"
    assert drop_reason(SiloRestartedError("a", "old", "new")) == "restarted"
    assert drop_reason(SiloUnreachableError("a")) == "unreachable"
    # A refused or failed operation would fail at every silo: never dropped.
    assert drop_reason(SiloError("a", "forbidden", "raw release refused")) is None
    assert drop_reason(SiloWorkerError("a", "worker", "assertion", "INVALID_ARGUMENT")) is None
    assert drop_reason(ValueError("not a silo error")) is None
