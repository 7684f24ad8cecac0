"""What the fault cases share: the writer's model and its deterministic training, digests of
restored state, object kinds of store paths, and checks (the writer processes: :mod:`.spawn`).

No pickle anywhere: writer processes get their arguments as JSON and answer in text lines.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np

SEED = 7
SNAPSHOT_EVERY = 8
AWS_VARS_TO_CLEAR = ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


# -- the model a writer checkpoints -----------------------------------------------------------
class Trainer:
    """A small MLP with BatchNorm (float buffers and an int64 counter) and SGD with momentum,
    trained on random batches from a seeded generator: the state after step ``s`` is the same in
    every process, so any process can rebuild what a killed writer saved."""

    def __init__(self, seed: int = SEED):
        import torch
        from torch import nn

        torch.set_num_threads(1)
        self.torch, self.nn = torch, nn
        g = torch.Generator().manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(32, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10))
        with torch.no_grad():
            for p in self.model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)
        self.gen = g
        self.step = -1

    def advance_to(self, step: int) -> "Trainer":
        """Train until the state is the one saved at ``step`` (one SGD step per step)."""
        if step < self.step:
            raise ValueError(f"trainer is at step {self.step}, cannot go back to {step}")
        while self.step < step:
            x = self.torch.randn(16, 32, generator=self.gen)
            y = self.torch.randint(0, 10, (16,), generator=self.gen)
            self.opt.zero_grad()
            self.nn.functional.cross_entropy(self.model(x), y).backward()
            self.opt.step()
            self.step += 1
        return self


def ckpt_kwargs(segment_size: int = 3, flush_every: int = 1) -> dict:
    # LC: its coding is a function of (u_t, ũ_{t−1}) alone, so a writer resumed after a kill codes
    # the next step exactly as the uninterrupted reference run did, which these checks compare.
    # The uniform codec's rate control also keeps in-memory state (the last u, σ, κ).
    # background=False: the save pipeline runs inside save() (as the checkpoint actor runs it), so
    # a writer's store operations, its kill points and its "saved" events follow its saves in
    # order, a commit a save closes is made before it returns, and no thread exists at a fork.
    # One attempt per group commit: the cases measure the store's own retries (``retry_deadline``:
    # the outage case checks that a save fails within about it), which the group commit's retries
    # would multiply.
    from ...checkpoint.group import RetryPolicy

    return dict(codec="lc", segment_size=segment_size, flush_every=flush_every, snapshot_every=SNAPSHOT_EVERY, save_rng=False,
                background=False, retry=RetryPolicy(attempts=1))


# -- digests ----------------------------------------------------------------------------------
def _feed(h, obj) -> None:
    import torch

    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        h.update(f"A{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    elif isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=str):
            h.update(repr(k).encode())
            _feed(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for v in obj:
            _feed(h, v)
        h.update(b"]")
    else:
        h.update(repr(obj).encode())


def digest(obj) -> str:
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()[:24]


def restored_digest(state: dict) -> str:
    """Digest of what a restore hands the user (model, optimizer, extra); not its metadata."""
    return digest({k: state.get(k) for k in ("model", "optimizer", "extra")})


def recon_digest(groups: dict, exact: dict) -> str:
    """Digest of a reconstruction: flat float32 per lossy group and the exact tensors."""
    import torch

    flat = {g: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v) for g, v in groups.items()}
    return digest({"groups": flat, "exact": dict(exact)})


def writer_recon_digest(ckpt) -> str:
    """What a Checkpointer's encoders hold as the reconstruction of its last save."""
    return recon_digest({g: e.recon for g, e in ckpt._enc.encoders.items()}, ckpt._enc.last_exact)


def store_recon_digests(store, run: str, branch: str, steps) -> dict[int, str]:
    """The same digest per step, rebuilt from the store by one fresh Reader (steps that do not
    restore are left out)."""
    from ...checkpoint.restore import Reader
    from ...errors import RaybranchError
    from ...ledger.lineage import Lineage

    reader, out = Reader(store, run), {}
    lin = Lineage(store, run, branch)
    for s in steps:
        try:
            acc, exact, _, _ = reader.recon(lin, s)
        except RaybranchError:
            continue
        out[s] = recon_digest(acc, exact)
    return out


# -- store paths ------------------------------------------------------------------------------
KINDS = ("blob", "layout", "commit", "page", "top", "ref", "link", "branch")


def kind_of(rel: str) -> str:
    name = rel.rsplit("/", 1)[-1]
    if name.startswith(".lock-"):
        return "lock"
    if ".tmp-" in name:
        return "tmp"
    if "/blobs/" in f"/{rel}" and name.endswith(".arrow"):
        return "blob"
    if "/layouts/" in f"/{rel}":
        return "layout"
    if "/commits/" in rel:
        return "commit"
    if "/pages/" in rel:
        return "page"
    if name == "top.json":
        return "top"
    if "/refs/branches/" in rel:
        return "ref"
    if "/refs/links/" in rel:
        return "link"
    if name == "branch.json":
        return "branch"
    return "other"


def local_tmp_files(root: str) -> list[str]:
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if ".tmp-" in f]


def committed_steps(store, run: str, branch: str = "main") -> list[int]:
    """Steps the branch's log shows (what a reader sees); [] when the branch does not exist."""
    from ...errors import NotFoundError
    from ...ledger.lineage import Lineage

    try:
        return [e["step"] for e in Lineage(store, run, branch).all_entries()]
    except NotFoundError:
        return []


def restore_all(store, run: str, branch: str, steps: list[int]) -> tuple[dict[int, str], dict[int, str]]:
    """({step: digest}, {step: error}) restoring every step with one fresh Reader (on ``store``, a
    Store or a URI); an error that is not a RaybranchError is prefixed ``CRASH``."""
    from ...checkpoint.restore import Reader
    from ...store.store import open_store

    from ...errors import RaybranchError

    reader = Reader(open_store(store) if isinstance(store, str) else store, run)
    ok, bad = {}, {}
    for s in steps:
        try:
            ok[s] = restored_digest(reader.restore(branch, s))
        except RaybranchError as exc:
            bad[s] = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # noqa: BLE001 - every failure is a counted outcome
            bad[s] = f"CRASH {type(exc).__name__}: {exc}"
    return ok, bad


def verify_problems(store, run: str | None = None) -> list[str]:
    """verify's problems (a crash of verify itself is reported as a problem, prefixed)."""
    from ...ledger.verify import verify_store

    try:
        return list(verify_store(store, run).problems)
    except Exception as exc:  # noqa: BLE001
        return [f"VERIFY RAISED {type(exc).__name__}: {exc}"]


class Reference:
    """The uninterrupted run: what every step must restore to (restore digest and recon digest)."""

    def __init__(self, workdir: str, steps: int, seed: int = SEED):
        from ...checkpoint.checkpointer import Checkpointer
        from ...store.store import open_store

        uri = "file://" + os.path.join(workdir, "reference")
        tr = Trainer(seed)
        ck = Checkpointer(open_store(uri), "ref", **ckpt_kwargs(4, 1))
        self.recon: dict[int, str] = {}
        for s in range(steps):
            ck.save(s, tr.advance_to(s).model, tr.opt)
            self.recon[s] = writer_recon_digest(ck)
        ck.close()
        self.restored, bad = restore_all(uri, "ref", "main", list(range(steps)))
        if bad:
            raise RuntimeError(f"the reference run does not restore: {bad}")
        self.steps = steps


def s3_env(server) -> dict:
    return dict(server.env())


def set_s3_env(server) -> None:
    """Point this process's AWS variables at the test server (the writers inherit them)."""
    for k in AWS_VARS_TO_CLEAR:
        os.environ.pop(k, None)
    os.environ.update(server.env())


def with_query(uri: str, **opts) -> str:
    extra = "&".join(f"{k}={v}" for k, v in opts.items() if v is not None)
    if not extra:
        return uri
    return uri + ("&" if "?" in uri else "?") + extra


def one_line(s: str, n: int = 240) -> str:
    s = " ".join(str(s).split())
    return s if len(s) <= n else s[: n - 1] + "…"
