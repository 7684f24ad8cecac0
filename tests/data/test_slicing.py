"""Slices (report §7.2, §8.2): disjoint, covering the train set, every class in every slice."""
import pytest
import torch

from raybranch.data import DataError, SPLIT_SPECS, load_dataset, make_slices, split_spec


@pytest.fixture(scope="module")
def digits_labels():
    train, _, _ = load_dataset("digits")
    return train.labels


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("4x25", [0.25] * 4),
        ("20x5", [0.05] * 20),
        ("80x1.25", [0.0125] * 80),
        ("70/10/10/10", [0.7, 0.1, 0.1, 0.1]),
        ("4×25%", [0.25] * 4),
        ("50/50", [0.5, 0.5]),
    ],
)
def test_split_spec_parses(spec, expected):
    assert split_spec(spec) == pytest.approx(expected)


@pytest.mark.parametrize("spec", ["3x25", "70/10/10", "4x25/1", "abc", "0x100", "100/0", "", "4x"])
def test_split_spec_rejects(spec):
    with pytest.raises(DataError) as err:
        split_spec(spec)
    assert "\n" not in str(err.value) and repr(spec) in str(err.value)


@pytest.mark.parametrize("spec", SPLIT_SPECS)
def test_slices_disjoint_covering_all_classes(digits_labels, spec):
    fractions = split_spec(spec)
    slices = make_slices(digits_labels, fractions, seed=7)
    n = digits_labels.numel()
    assert len(slices) == len(fractions)
    everything = torch.cat(slices)
    assert everything.numel() == n  # no index twice ...
    assert torch.equal(everything.sort().values, torch.arange(n))  # ... and every index once
    classes = torch.unique(digits_labels)
    for j, (idx, f) in enumerate(zip(slices, fractions)):
        assert torch.equal(torch.unique(digits_labels[idx]), classes), f"slice {j} lacks a class"
        assert abs(idx.numel() - f * n) <= len(classes), f"slice {j}: {idx.numel()} vs {f * n:.1f}"
        # each class split in proportion: ⌊n_c f⌋ or ⌈n_c f⌉ (up to the rare n_c·f < 1 fix-up)
        per_class = torch.bincount(digits_labels[idx], minlength=len(classes))
        n_c = torch.bincount(digits_labels, minlength=len(classes))
        assert bool(((per_class - n_c * f).abs() < 1 + 1e-9).all())


def test_slices_are_seeded(digits_labels):
    a = make_slices(digits_labels, split_spec("4x25"), seed=1)
    b = make_slices(digits_labels, split_spec("4x25"), seed=1)
    c = make_slices(digits_labels, split_spec("4x25"), seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_tiny_class_gets_into_every_slice():
    # class 1 has 4 samples for 4 slices of unequal size (n_c·f = 0.4 for the 10 % slices)
    labels = torch.tensor([0] * 40 + [1] * 4)
    slices = make_slices(labels, split_spec("70/10/10/10"), seed=0)
    assert all(bool((labels[idx] == 1).any()) and bool((labels[idx] == 0).any()) for idx in slices)
    assert torch.equal(torch.cat(slices).sort().values, torch.arange(44))


def test_class_smaller_than_slice_count_is_an_error():
    labels = torch.tensor([0] * 50 + [3] * 2)
    with pytest.raises(DataError, match="class 3 has 2 samples"):
        make_slices(labels, split_spec("4x25"), seed=0)


def test_bad_fractions_rejected():
    with pytest.raises(DataError):
        make_slices(torch.zeros(10, dtype=torch.int64), [0.5, 0.6], seed=0)
