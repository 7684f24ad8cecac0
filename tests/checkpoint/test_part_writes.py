"""Part-wise checkpoints: two ranks (real processes, gloo on loopback) write one replicated
state (but a BatchNorm statistic that differs by rank, as under DDP). Every step restores bit for
bit as the reconstruction the ranks' encoders built, exact steps as rank 0's saved state, and
with LC (a per-tensor codec) as a single writer's; every commit names both parts and the world
size, and the chain has no gap."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from raybranch.checkpoint.layout import LayoutRules
from raybranch.checkpoint.parts import assign_exact, hash_ints, ints_hash, split_groups
from raybranch.checkpoint.restore import Reader
from raybranch.ledger.lineage import Lineage
from raybranch.ledger.verify import verify_store
from raybranch.store.store import open_store
from raybranch.testing.ports import pick_ports

sys.path.insert(0, os.path.dirname(__file__))
import part_writer  # noqa: E402

FAIL_AT = 10  # rank 1 cannot write the blob of the group holding step 10
WRITER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "part_writer.py")


def _start(uri: str, branch: str, world: int, codec: str, out, port: int, *extra: str) -> list[subprocess.Popen]:
    os.makedirs(out, exist_ok=True)
    return [subprocess.Popen([sys.executable, WRITER, uri, "r", branch, str(rank), str(world), str(port), codec, str(out), *extra],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(world)]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    uri = "file://" + str(root / "store")
    writers = [("ddp", 2, "uniform"), ("lc-solo", 1, "lc"), ("lc-ddp", 2, "lc"), ("fault", 2, "uniform", str(FAIL_AT))]
    ports = pick_ports(len(writers))
    procs = [p for (b, w, c, *extra), port in zip(writers, ports) for p in _start(uri, b, w, c, root / b, port, *extra)]
    for p in procs:  # every branch at once, each group on its own port
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out
    return uri, root


def _flat(model: dict, names: list[str]) -> torch.Tensor:
    return torch.cat([model[n].reshape(-1).float() for n in names])


@pytest.mark.parametrize("branch", ["ddp", "fault"])
def test_every_step_restores_as_the_encoders_built_it(written, branch):
    uri, root = written
    reader = Reader(open_store(uri), "r")
    recon = {**load_file(str(root / branch / "recon-0.safetensors")), **load_file(str(root / branch / "recon-1.safetensors"))}
    names = {}
    for rank in (0, 1):
        with open(root / branch / f"names-{rank}.json") as f:
            names.update(json.load(f))
    assert sorted(names) == ["buffers.0", "model.0", "model.1"]  # the BatchNorm statistic is rank 0's to write
    for step, sd, tags in part_writer.states():
        model = reader.restore(branch, step)["model"]
        assert list(model) == list(sd)  # the plain state dict, in its order
        for g, ns in names.items():
            got = _flat(model, ns)
            assert torch.equal(got.view(torch.int32), recon[f"{step}/{g}"].view(torch.int32)), (step, g)
            if tags:  # an exact checkpoint is the saved state itself, rank 0's buffers included
                assert torch.equal(got, _flat(sd, ns)), (step, g)
        assert torch.equal(model["count"], sd["count"]) and torch.equal(model["tiny"], sd["tiny"])
        # the fidelity bound holds part by part, hence for the whole state: ‖u − ũ‖ ≤ ρ‖u_t − u_{t−1}‖


def test_a_part_not_written_fails_the_commit_on_every_rank(written):
    uri, root = written
    errors = [json.loads((root / "fault" / f"error-{rank}.json").read_text()) for rank in (0, 1)]
    # both ranks raise the same class at the same save and read back the same head: the group that
    # held step FAIL_AT was committed by neither (nothing half-written), the steps before it stand
    assert [e["type"] for e in errors] == ["StoreError", "StoreError"]
    lo, hi = map(int, re.search(r"cannot write steps (\d+)\.\.(\d+)", errors[1]["message"]).groups())
    assert lo <= FAIL_AT <= hi
    assert errors[0]["at_save"] == errors[1]["at_save"] and errors[0]["head"] == errors[1]["head"] == lo - 1
    assert "rank 1 failed" in errors[0]["message"] and f"steps {lo}..{hi} not committed" in errors[0]["message"]
    lin = Lineage(open_store(uri), "r", "fault")
    assert [e["step"] for e in lin.entries_between(1, part_writer.STEPS)] == list(range(1, part_writer.STEPS + 1))
    assert verify_store(open_store(uri), "r").problems == []


def test_lc_parts_restore_as_a_single_writer(written):
    reader = Reader(open_store(written[0]), "r")
    for step, _, _ in part_writer.states():
        solo, ddp = reader.restore("lc-solo", step)["model"], reader.restore("lc-ddp", step)["model"]
        for k in solo:
            assert torch.equal(ddp[k], solo[k]), (step, k)


def test_commits_name_both_parts_and_the_world_size(written):
    uri = written[0]
    lin = Lineage(open_store(uri), "r", "ddp")
    entries = lin.entries_between(1, part_writer.STEPS)
    assert [e["step"] for e in entries] == list(range(1, part_writer.STEPS + 1))  # no gap, no duplicate
    for e in entries:
        assert [p["name"] for p in e["parts"]] == ["0", "1"]
        assert len({p["blob"][0] for p in e["parts"]}) == 2
    assert lin.log.head["world_size"] == 2
    assert verify_store(open_store(uri), "r").problems == []


def test_split_is_balanced_at_tensor_boundaries():
    sizes = {"a": 2048, "b": 40, "c": 256, "d": 200}
    groups, owners = split_groups({"model": ["a", "b", "c", "d"]}, sizes, 2)
    assert groups == {"model.0": ["a"], "model.1": ["b", "c", "d"]}  # a's midpoint 1024 < 2544/2; b's 2068 ≥ 1272
    assert owners == {"model.0": 0, "model.1": 1}
    assert assign_exact(["x", "y", "z"], {"x": 8, "y": 24, "z": 16}, 2) == {"y": 0, "z": 1, "x": 1}
    doc, _, _ = LayoutRules(parts=2).layout(
        {"a": torch.zeros(64, 32), "tiny": torch.zeros(3), "n": torch.zeros((), dtype=torch.int64)}, set())
    assert doc["parts"] == 2 and doc["owners"] == {"model.1": 1, "tiny": 0, "n": 1}  # one tensor: its midpoint is S/2
    # buffers (and RNG states) are rank 0's, whole
    doc, _, _ = LayoutRules(parts=2).layout({"a": torch.zeros(64), "bn.running_mean": torch.zeros(64), "bn.running_var": torch.zeros(64),
                                             "bn.tiny": torch.zeros(2), "rng/torch": torch.zeros(8, dtype=torch.uint8)},
                                            {"bn.running_mean", "bn.running_var", "bn.tiny"})
    assert doc["owners"] == {"model.1": 1, "buffers.0": 0, "bn.tiny": 0, "rng/torch": 0}
    h = "ab" * 32
    assert ints_hash(hash_ints(h)) == h
