"""A checkpoint writer for the crash test: saves a deterministic random walk of a ~0.8M-parameter
state dict, one checkpoint per step, printing each committed step; the test SIGKILLs it.

    python crash_writer.py URI RUN SEED
"""
from __future__ import annotations

import sys

import torch

torch.set_num_threads(1)

SEGMENT_SIZE = 3  # pages of 3 commits: the writer is often sealing (compacting) a page when it dies
MAX_STEPS = 400


def states(seed: int, n: int = MAX_STEPS):
    """(step, state_dict) of a random walk; the same on every call with the same seed."""
    g = torch.Generator().manual_seed(seed)
    sd = {
        "w1": torch.randn(768, 768, generator=g) * 0.05,
        "w2": torch.randn(256, 768, generator=g) * 0.05,
        "b": torch.zeros(768),
        "count": torch.zeros((), dtype=torch.int64),
    }
    for step in range(n):
        for k in ("w1", "w2", "b"):
            sd[k] = sd[k] + torch.randn(sd[k].shape, generator=g) * 1e-3
        sd["count"] = sd["count"] + 1
        yield step, {k: v.clone() for k, v in sd.items()}


def checkpointer(uri: str, run: str):
    import raybranch as rb

    # one commit per step, made inside save() (flush_every=1, background=False): a printed step is committed
    return rb.Checkpointer(rb.open_store(uri), run=run, branch="main", segment_size=SEGMENT_SIZE,
                           flush_every=1, background=False,
                           codec="lc")  # compared with an uninterrupted run bit for bit: see ckpt_testkit.MEMORYLESS


def main(uri: str, run: str, seed: int) -> None:
    ckpt = checkpointer(uri, run)
    for step, sd in states(seed):
        ckpt.save(step, sd)
        print(step, flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
