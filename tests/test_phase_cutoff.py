"""When an aggregation phase stops waiting for silos that have not answered."""

from __future__ import annotations

import pytest

from tff_amqp.coordinator.options import CoordinatorOptions
from tff_amqp.coordinator.quorum import phase_cutoff


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
        ({"quorum_grace": -1.0}, "quorum_grace"),
        ({"straggler_timeout": 0.0}, "straggler_timeout"),
        ({"min_silos": 3, "max_silos": 2}, "max_silos"),
    ],
)
def test_bad_options_are_refused_with_the_option_named(options, words):
    with pytest.raises(ValueError, match=words):
        CoordinatorOptions(broker_url="amqp://guest:guest@127.0.0.1/", **options)
