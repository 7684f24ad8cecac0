"""Part-wise checkpoints: two ranks (real processes, gloo on loopback) write one replicated
state. Every step restores bit for bit as the reconstruction the ranks' encoders built, exact
steps as the saved state, and with LC (a per-tensor codec) as a single writer's; every commit
names both parts and the world size, and the chain has no gap."""
from __future__ import annotations

import json
import os
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

WRITER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "part_writer.py")


def _write(uri: str, branch: str, world: int, codec: str, out) -> None:
    port = pick_ports(1)[0]
    os.makedirs(out, exist_ok=True)
    procs = [subprocess.Popen([sys.executable, WRITER, uri, "r", branch, str(rank), str(world), str(port), codec, str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(world)]
    for p in procs:
        out_, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out_


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    uri = "file://" + str(root / "store")
    for branch, world, codec in (("ddp", 2, "uniform"), ("lc-solo", 1, "lc"), ("lc-ddp", 2, "lc")):
        _write(uri, branch, world, codec, root / branch)
    return uri, root


def _flat(model: dict, names: list[str]) -> torch.Tensor:
    return torch.cat([model[n].reshape(-1).float() for n in names])


def test_every_step_restores_as_the_encoders_built_it(written):
    uri, root = written
    reader = Reader(open_store(uri), "r")
    recon = {**load_file(str(root / "ddp" / "recon-0.safetensors")), **load_file(str(root / "ddp" / "recon-1.safetensors"))}
    names = {}
    for rank in (0, 1):
        with open(root / "ddp" / f"names-{rank}.json") as f:
            names.update(json.load(f))
    assert sorted(names) == ["model.0", "model.1"]
    for step, sd, tags in part_writer.states():
        model = reader.restore("ddp", step)["model"]
        assert list(model) == list(sd)  # the plain state dict, in its order
        for g, ns in names.items():
            got = _flat(model, ns)
            assert torch.equal(got.view(torch.int32), recon[f"{step}/{g}"].view(torch.int32)), (step, g)
            if tags:  # an exact checkpoint is the saved (rank 0's) state itself
                assert torch.equal(got, _flat(sd, ns)), (step, g)
        assert torch.equal(model["count"], sd["count"]) and torch.equal(model["tiny"], sd["tiny"])
        # the fidelity bound holds part by part, hence for the whole state: ‖u − ũ‖ ≤ ρ‖u_t − u_{t−1}‖


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
    h = "ab" * 32
    assert ints_hash(hash_ints(h)) == h
