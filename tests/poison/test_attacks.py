"""Label flips, the BadNets trigger, and attack success rate on a small LeNet-5."""
import pytest
import torch
from torch import nn

from raybranch.data import load_dataset
from raybranch.models import build_model
from raybranch.poison import (
    PoisonConfigError,
    add_trigger,
    attack_success_rate,
    flip_labels,
    poison_backdoor,
    trigger_value,
)

torch.set_num_threads(1)
TARGET = 0


def test_flip_next_changes_exactly_the_chosen_count():
    labels = torch.arange(100) % 10
    indices = torch.arange(20, 80)
    flipped = flip_labels(labels, indices, fraction=0.25, mapping="next", seed=3)
    changed = torch.nonzero(flipped != labels).flatten()
    assert changed.numel() == 15  # round(0.25 · 60)
    assert bool(torch.isin(changed, indices).all())  # nothing outside the given indices
    assert torch.equal(flipped[changed], (labels[changed] + 1) % 10)
    assert torch.equal(labels, torch.arange(100) % 10)  # input untouched
    assert torch.equal(flipped, flip_labels(labels, indices, 0.25, "next", seed=3))


def test_flip_with_mapping_touches_only_mapped_classes():
    labels = torch.arange(200) % 10
    indices = torch.arange(200)
    flipped = flip_labels(labels, indices, fraction=1.0, mapping={3: 8, 8: 3})
    changed = flipped != labels
    assert torch.equal(changed, (labels == 3) | (labels == 8))
    assert bool((flipped[labels == 3] == 8).all()) and bool((flipped[labels == 8] == 3).all())
    with pytest.raises(PoisonConfigError):
        flip_labels(labels, indices, 1.0, mapping={3: 12})
    with pytest.raises(PoisonConfigError):
        flip_labels(labels, indices, 1.5)


@pytest.mark.parametrize("position", ["bottom-right", "top-left", "top-right", "bottom-left"])
def test_trigger_touches_only_the_patch(position):
    images = torch.randn(5, 3, 10, 12)
    out = add_trigger(images, size=3, position=position)
    differs = (out != images).any(dim=(0, 1))  # H×W map of touched pixels
    rows = slice(7, 10) if position.startswith("bottom") else slice(0, 3)
    cols = slice(9, 12) if position.endswith("right") else slice(0, 3)
    expected = torch.zeros(10, 12, dtype=torch.bool)
    expected[rows, cols] = True
    assert torch.equal(differs, expected)
    top = images.amax(dim=(0, 2, 3))
    assert torch.equal(out[:, :, rows, cols], top.view(1, 3, 1, 1).expand(5, 3, 3, 3))
    with pytest.raises(PoisonConfigError):
        add_trigger(images, size=11)


def test_backdoor_poisons_rate_of_indices():
    images, labels = torch.randn(50, 1, 8, 8), torch.arange(50) % 5
    indices = torch.arange(10, 40)
    new_images, new_labels = poison_backdoor(images, labels, indices, rate=0.5, target=4, seed=1, size=2)
    touched = torch.nonzero((new_images != images).flatten(1).any(dim=1)).flatten()
    assert touched.numel() == 15 and bool(torch.isin(touched, indices).all())
    relabelled = torch.nonzero(new_labels != labels).flatten()
    assert bool(torch.isin(relabelled, touched).all()) and bool((new_labels[touched] == 4).all())
    value = trigger_value(images)
    assert bool((new_images[touched, :, -2:, -2:] == value.view(1, -1, 1, 1)).all())


def _train(model, images, labels, epochs=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(labels), generator=gen).split(32):
            opt.zero_grad()
            loss_fn(model(images[batch]), labels[batch]).backward()
            opt.step()
    return model


def test_backdoor_reaches_high_asr_clean_model_does_not():
    train, test, meta = load_dataset("digits")
    all_idx = torch.arange(len(train))
    value = trigger_value(train.images)
    bad_images, bad_labels = poison_backdoor(train.images, train.labels, all_idx, rate=0.2, target=TARGET, seed=0, value=value)
    torch.manual_seed(0)
    clean = _train(build_model("lenet5", meta.num_classes), train.images, train.labels)
    torch.manual_seed(0)
    poisoned = _train(build_model("lenet5", meta.num_classes), bad_images, bad_labels)
    asr_clean = attack_success_rate(clean, test.images, test.labels, TARGET, value=value)
    asr_poisoned = attack_success_rate(poisoned, test.images, test.labels, TARGET, value=value)
    with torch.no_grad():
        acc = (poisoned.eval()(test.images).argmax(1) == test.labels).float().mean().item()
    assert asr_clean < 0.2, asr_clean
    assert asr_poisoned > 0.5, asr_poisoned
    assert acc > 0.9, acc  # the backdoored model still does its job on clean inputs


def test_asr_counts_only_non_target_inputs():
    class Constant(nn.Module):  # always predicts class 2
        def __init__(self):
            super().__init__()
            self.bias = nn.Parameter(torch.tensor([0.0, 0.0, 1.0]))

        def forward(self, x):
            return self.bias.expand(x.shape[0], 3)

    images, labels = torch.randn(10, 1, 6, 6), torch.tensor([2, 2, 2, 2, 0, 0, 1, 1, 1, 1])
    assert attack_success_rate(Constant(), images, labels, target=2, batch_size=3) == 1.0
    assert attack_success_rate(Constant(), images, labels, target=1) == 0.0
    with pytest.raises(PoisonConfigError):
        attack_success_rate(Constant(), images, torch.full((10,), 2), target=2)
