"""TrainingState: collect groups a save's tensors, and a state crosses a process boundary as one
buffer and JSON, every dtype intact, read back as views."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from raybranch.checkpoint.training_state import TrainingState, collect, from_buffer, to_buffer
from raybranch.errors import RaybranchError

from ckpt_testkit import make_model


def test_collect_groups_model_optimizer_rng_and_extra():
    model = make_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    opt.step()
    state = collect(model, opt, {"epoch": 3, "ema": torch.ones(4)})
    groups = state.groups
    assert set(groups) == {"model", "optim", "rng", "extra"}  # rng: an optimizer makes it resumable
    assert groups["model"] == list(model.state_dict())
    assert all(n.startswith("optim/state/") for n in groups["optim"])
    assert "rng/torch" in groups["rng"] and groups["extra"] == ["extra/ema"]
    assert state.buffers == {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}
    assert state.meta["extra"] == {"epoch": 3, "ema": {"__tensor__": "ema"}}
    assert "rng" not in collect(model).groups and "rng" in collect(model, rng=True).groups
    with pytest.raises(RaybranchError, match="clashes with raybranch's reserved prefixes"):
        collect({"optim/x": torch.zeros(2)})


def test_buffer_round_trips_every_dtype_as_views():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = TrainingState({
        "w": base.t(),  # not contiguous
        "half": torch.randn(5).to(torch.bfloat16),
        "count": torch.tensor(7, dtype=torch.int64),  # 0-d
        "empty": torch.empty(0, 3),
        "flag": torch.tensor([True, False, True]),
    }, frozenset({"count"}), {"extra": {"k": 1}})
    before = {k: v.clone() for k, v in state.tensors.items()}
    buf, doc = to_buffer(state)
    assert all(off % 64 == 0 for *_, off in json.loads(doc)["tensors"])
    out = from_buffer(buf.numpy(), doc)
    assert out.buffers == state.buffers and out.meta == state.meta
    for k, v in state.tensors.items():
        assert out.tensors[k].dtype == v.dtype and out.tensors[k].shape == v.shape and torch.equal(out.tensors[k], v), k
    assert out.tensors["w"].untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()  # views, no copies
    base.add_(1)  # the buffer does not follow the live tensors
    assert all(torch.equal(out.tensors[k], before[k]) for k in state.tensors)
    ro = np.frombuffer(buf.numpy().tobytes(), np.uint8)  # a read-only buffer, as the object store hands out
    assert torch.equal(from_buffer(ro, doc).tensors["half"], before["half"])
    with pytest.raises(RaybranchError, match="lies outside its"):
        from_buffer(ro[:64], doc)
