"""One rank of a part-wise writer for tests/checkpoint/test_parts.py: the same deterministic
random walk of a state dict on every rank (a replicated state), saved with ``TorchParts`` over a
gloo group on loopback. With world 1 it is the single writer the parts are compared with.

    python part_writer.py URI RUN BRANCH RANK WORLD PORT CODEC OUT [FAIL_AT]

With FAIL_AT, rank 1's store refuses the first blob holding step FAIL_AT (a StoreError after its
retries): each rank records the error its next call raised in ``OUT/error-<rank>.json`` and saves
again from the head it reads back.

After every save it records what its encoders hold (ũ of each lossy group it owns) into
``OUT/recon-<rank>.safetensors`` (keys ``<step>/<group>``) and the groups' names into
``OUT/names-<rank>.json``: the ground truth a restore must equal bit for bit.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from safetensors.torch import save_file

from raybranch.checkpoint.checkpointer import Checkpointer
from raybranch.checkpoint.parts import TorchParts
from raybranch.errors import StoreError
from raybranch.store.blob import read_blob

torch.set_num_threads(1)
STEPS, EXACT_EVERY = 30, 10


def states(n: int = STEPS, rank: int = 0):
    """(step, state dict, tags) of a random walk; the same on every call. The BatchNorm statistic
    ``bn.running_mean`` differs by rank (as under DDP, where each rank's forward updates its own):
    rank 0's is the one a checkpoint holds."""
    g = torch.Generator().manual_seed(7)
    sd = {"a": torch.randn(64, 32, generator=g), "b": torch.randn(40, generator=g), "c": torch.randn(16, 16, generator=g),
          "d": torch.randn(200, generator=g), "tiny": torch.zeros(3), "count": torch.zeros((), dtype=torch.int64),
          "bn.running_mean": torch.zeros(24)}
    for step in range(1, n + 1):
        for k in ("a", "b", "c", "d", "tiny", "bn.running_mean"):
            sd[k] = sd[k] + torch.randn(sd[k].shape, generator=g) * 1e-2
        sd["count"] = sd["count"] + 1
        out = {k: v.clone() for k, v in sd.items()}
        out["bn.running_mean"] += rank
        yield step, out, ["exact"] if step % EXACT_EVERY == 0 else []


def refuse_once(ck, rank: int, step: int) -> None:
    """Rank ``rank``'s first blob holding ``step`` fails to write."""
    put, state = ck.store.put_blob, {"done": False}

    def put_blob(run, data):
        lo, hi = read_blob(data)[1]["steps"]
        if ck.parts.rank == rank and lo <= step <= hi and not state["done"]:
            state["done"] = True
            raise StoreError(f"injected: rank {rank} cannot write steps {lo}..{hi}")
        return put(run, data)

    ck.store.put_blob = put_blob


def main(uri: str, run: str, branch: str, rank: int, world: int, port: int, codec: str, out: str,
         fail_at: int | None = None) -> None:
    parts = None
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        parts = TorchParts(timeout_s=60)
    ck = Checkpointer(uri, run, branch, codec=codec, key_every=6, flush_every=4, parts=parts)
    if fail_at is not None:
        refuse_once(ck, 1, fail_at)
    recon, names = {}, {}
    walk = list(states(rank=rank))
    i = 0
    while i < len(walk):
        step, sd, tags = walk[i]
        try:
            ck.save(step, sd, tags=tags)
        except StoreError as exc:  # the group before this save was not committed, on every rank
            head = ck.head()["step"]
            with open(os.path.join(out, f"error-{rank}.json"), "w") as f:
                json.dump({"type": type(exc).__name__, "message": str(exc), "at_save": step, "head": head}, f)
            i = head  # walk[head] is step head + 1
            continue
        ck._pipeline.wait()  # internal: the encoders' state after this step
        for g, enc in ck._enc.encoders.items():
            recon[f"{step}/{g}"], names[g] = enc.recon.clone(), list(enc.names)
        i += 1
    ck.close()
    save_file(recon, os.path.join(out, f"recon-{rank}.safetensors"))
    with open(os.path.join(out, f"names-{rank}.json"), "w") as f:
        json.dump(names, f)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1], a[2], int(a[3]), int(a[4]), int(a[5]), a[6], a[7], int(a[8]) if len(a) > 8 else None)
