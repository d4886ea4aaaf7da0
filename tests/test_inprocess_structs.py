"""`struct_of` builds the same `Struct` as TFF's constructor, and leaves bad
names to TFF's own error."""

import numpy as np
import pytest
from tensorflow_federated.python.common_libs import structure

from tff_amqp.inprocess.structs import struct_of, unnamed


@pytest.mark.parametrize(
    "elements",
    [
        [],
        [(None, 1)],
        [("a", np.float32(1.5)), ("b", np.arange(3))],
        [("a", 1), (None, 2), ("c", 3)],
        [("x", structure.Struct([("y", 1)])), (None, "s")],
    ],
)
def test_struct_of_equals_tffs_struct(elements):
    made = struct_of(elements)
    reference = structure.Struct(elements)
    assert type(made) is structure.Struct
    assert structure.to_elements(made) == structure.to_elements(reference)
    assert dir(made) == dir(reference)
    assert len(made) == len(reference)
    for name, _ in elements:
        if name is not None:
            assert getattr(made, name) is getattr(reference, name)
    assert repr(made) == repr(reference)


def test_struct_of_compares_and_hashes_as_tffs_struct():
    elements = [("a", 1), (None, 2.5), ("c", (3, 4))]
    made = struct_of(elements)
    assert made == structure.Struct(elements)
    assert hash(made) == hash(structure.Struct(elements))
    assert made != structure.Struct([("a", 1), (None, 2.5), ("d", (3, 4))])


def test_unnamed():
    assert structure.to_elements(unnamed(1, 2)) == [(None, 1), (None, 2)]


@pytest.mark.parametrize(
    ("elements", "error"),
    [
        ([("a", 1), ("a", 2)], ValueError),  # duplicated name
        ([("_asdict", 1)], ValueError),  # reserved name
        ([(3, 1)], TypeError),  # not a string
        ([("a", 1, 2)], TypeError),  # not a pair
        ([7], TypeError),  # not a pair
    ],
)
def test_struct_of_leaves_bad_names_to_tff(elements, error):
    with pytest.raises(error):
        structure.Struct(elements)
    with pytest.raises(error):
        struct_of(elements)
