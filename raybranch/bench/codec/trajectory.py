"""The benchmark recipe: digits upsampled to 28×28, SGD lr 0.01 momentum 0.9, batch 32, torch
seed 0, a checkpoint after every step (step 0 = the initial model). CPU, one thread."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

MODELS = ("lenet5", "lenet5-tanh", "resnet-small")


@dataclass
class Trajectory:
    name: str
    model: torch.nn.Module
    states: list[dict[str, torch.Tensor]]
    params: list[str]          # the parameters' names (the residual is measured over these)
    eval_images: torch.Tensor  # all 1797 digits
    eval_labels: torch.Tensor


def setup(name: str = "lenet5", seed: int = 0):
    """(model, SGD lr 0.01 momentum 0.9, train set, test set) of the recipe."""
    from ...data import load_dataset
    from ...models import build_model

    train_set, test_set, meta = load_dataset("digits")
    torch.manual_seed(seed)
    model = build_model(name, num_classes=meta.num_classes, in_channels=meta.in_channels, image_size=meta.image_size)
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), train_set, test_set


def train(name: str, steps: int, seed: int = 0) -> Trajectory:
    model, opt, train_set, test_set = setup(name, seed)
    X, Y = train_set.images, train_set.labels
    g = torch.Generator().manual_seed(seed)
    states = [_copy(model)]
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(Y), (32,), generator=g)
        loss = F.cross_entropy(model(X[idx]), Y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        states.append(_copy(model))
    return Trajectory(name, model, states, [n for n, _ in model.named_parameters()],
                      torch.cat([X, test_set.images]), torch.cat([Y, test_set.labels]))


def _copy(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def accuracy(traj: Trajectory, sd: dict) -> float:
    traj.model.load_state_dict(sd)
    traj.model.eval()
    return float((traj.model(traj.eval_images).argmax(1) == traj.eval_labels).float().mean())
