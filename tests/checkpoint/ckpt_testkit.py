"""Shared pieces of the checkpoint tests: a tiny model, SGD steps on random data, a recorder that
keeps, after every save, what the encoder says the reconstruction is, and readers of what a
branch holds in the store (format v2: commit records, sealed pages)."""
from __future__ import annotations

# Tests that compare a resumed or rebuilt writer with an uninterrupted one bit for bit use LC: it codes
# step t from (u_t, ũ_{t−1}) alone. The uniform codec also uses u_{t−1}, which a writer that
# continues a branch takes to be ũ_{t−1} (training resumed from a restore starts there).
MEMORYLESS = {"codec": "lc"}

import os

import torch
from torch import nn

torch.set_num_threads(1)


class TinyNet(nn.Module):
    """conv(1→8, 3×3) → BatchNorm → ReLU → dropout → linear(288 → 3).

    Lossy (≥ 8 entries, float): conv.weight/bias, bn.weight/bias/running_mean/running_var, fc.weight.
    Exact: fc.bias (3 entries), bn.num_batches_tracked (int64).
    """

    def __init__(self, p_drop: float = 0.0):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(p_drop)
        self.fc = nn.Linear(8 * 6 * 6, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        return self.fc(self.drop(h).flatten(1))


def make_model(seed: int = 0, p_drop: float = 0.0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(p_drop)


def sgd_step(model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator, batch: int = 16) -> float:
    """One training step on a random batch drawn from ``gen``."""
    x = torch.randn(batch, 1, 8, 8, generator=gen)
    y = torch.randint(0, 3, (batch,), generator=gen)
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.item()


class Recorder:
    """After each save: the encoder's reconstruction ũ per lossy group, and the exact tensors."""

    def __init__(self):
        self.recon: dict[int, dict[str, torch.Tensor]] = {}
        self.exact: dict[int, dict[str, torch.Tensor]] = {}
        self.names: dict[int, dict[str, list[str]]] = {}
        self.optim: dict[int, dict] = {}
        self.keys: dict[int, list[str]] = {}

    def save(self, ckpt, step: int, model, optimizer=None, **kw) -> str:
        cid = ckpt.save(step, model, optimizer, **kw)
        self.record(ckpt, step, model, optimizer)
        return cid

    def record(self, ckpt, step: int, model, optimizer=None) -> None:
        settle(ckpt)
        encs = ckpt._enc.encoders  # internal: what the encoder holds is the ground truth of restore
        self.recon[step] = {g: e.recon.clone() for g, e in encs.items()}
        self.names[step] = {g: list(e.names) for g, e in encs.items()}
        lossy = {n for names in self.names[step].values() for n in names}
        sd = model.state_dict() if isinstance(model, nn.Module) else model
        self.keys[step] = list(sd)
        self.exact[step] = {k: v.detach().clone() for k, v in sd.items() if k not in lossy}
        if optimizer is not None:
            osd = optimizer.state_dict()
            self.optim[step] = {pid: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in e.items()} for pid, e in osd["state"].items()}


def settle(ckpt) -> None:
    """Wait until the save pipeline has encoded every capture queued so far (without closing the
    open group: nothing more is committed than would be anyway), so the encoder's state can be read."""
    if ckpt._pipeline is not None:
        ckpt._pipeline.wait()


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32) if t.dtype == torch.float32 else t


def _restored_tensor(state: dict, name: str) -> torch.Tensor:
    if name.startswith("optim/state/"):
        _, _, pid, key = name.split("/", 3)
        return state["optimizer"]["state"][int(pid)][key]
    return state["model"][name]


def assert_matches_record(state: dict, rec: Recorder, step: int) -> None:
    """The restored state equals the encoder's reconstruction (lossy groups) and the saved
    tensors (exact ones), bit for bit."""
    assert state["step"] == step
    lossy = set()
    for g, names in rec.names[step].items():
        lossy.update(names)
        flat = torch.cat([_restored_tensor(state, n).reshape(-1).float() for n in names])
        want = rec.recon[step][g]
        assert flat.shape == want.shape
        assert torch.equal(bits(flat), bits(want)), f"lossy group {g!r} differs at step {step}"
    model = state["model"]
    assert list(model) == list(rec.keys[step])  # state_dict order kept
    for k, v in rec.exact[step].items():
        assert model[k].dtype == v.dtype and model[k].shape == v.shape
        assert torch.equal(bits(model[k]), bits(v)), f"exact tensor {k!r} differs at step {step}"
    if step in rec.optim:
        got = state["optimizer"]["state"]
        assert set(got) == set(rec.optim[step])
        for pid, entry in rec.optim[step].items():
            for k, v in entry.items():
                if f"optim/state/{pid}/{k}" in lossy:
                    continue
                if torch.is_tensor(v):
                    assert torch.equal(bits(got[pid][k]), bits(v)), f"optimizer {pid}/{k} differs at step {step}"
                else:
                    assert got[pid][k] == v


def _raw(v: torch.Tensor) -> tuple:
    return (str(v.dtype), tuple(v.shape), v.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())


def state_bytes(state: dict) -> dict[str, tuple]:
    """Every restored model/optimizer tensor as (dtype, shape, raw bytes), to compare two restores exactly."""
    out = {f"model/{k}": _raw(v) for k, v in state["model"].items()}
    if state.get("optimizer"):
        for pid, e in state["optimizer"]["state"].items():
            for k, v in e.items():
                if torch.is_tensor(v):
                    out[f"optim/{pid}/{k}"] = _raw(v)
    return out


def local_files(root: str) -> dict[str, bytes]:
    """Every file under a local store root, with its bytes (temporaries included)."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


def store_files(store) -> dict[str, int]:
    """Every listed object of a store (any backend) with its size."""
    return {i.path[len(store.root) + 1 :]: int(i.size) for i in store.list("", recursive=True)}


# -- what a branch holds (format v2) -----------------------------------------------------------
def branch_id(store, run: str, branch: str = "main") -> str:
    from raybranch.ledger.refs import live_branch_id

    return live_branch_id(store, run, branch)


def sealed_pages(store, run: str, branch: str = "main") -> list[tuple[int, int]]:
    """(first seq, last seq) of every sealed page of the branch, in order (newest generation)."""
    from raybranch.ledger.records import pages_dir, parse_page_key

    found = {parse_page_key(i.rel)[:2] for i in store.list(pages_dir(run, branch_id(store, run, branch))) if parse_page_key(i.rel)}
    return sorted(found)


def commit_seqs(store, run: str, branch: str = "main") -> list[int]:
    """Seqs of the commit records the branch still has (sealed pages' records are deleted)."""
    from raybranch.ledger.records import commits_dir, seq_of_commit_key

    seqs = (seq_of_commit_key(i.rel) for i in store.list(commits_dir(run, branch_id(store, run, branch)), recursive=True))
    return sorted(s for s in seqs if s is not None)


def committed(store, run: str, branch: str = "main") -> list[tuple[int, list[int]]]:
    """(commit seq, its steps) of every commit of the branch with steps, read afresh from the store."""
    from raybranch.ledger.lineage import Lineage

    out: dict[int, list[int]] = {}
    for e in Lineage(store, run, branch).log.all_entries():
        out.setdefault(e["seq"], []).append(e["step"])
    return sorted(out.items())
