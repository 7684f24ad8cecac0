"""ResNet-50-sized state on CPU: real shapes (torchvision's resnet50, random init, no download),
deltas from a few real SGD steps on random 64 px images; the last step restored from a new Reader
against ``torch.load`` of the same state, and an exact key frame's size against a snapshot's."""
from __future__ import annotations

import os
import shutil
import time

import torch
import torch.nn.functional as F

from ...checkpoint.checkpointer import Checkpointer
from ...checkpoint.restore import Reader
from ...store.store import open_store
from .measure import timed_torch_load


def run_large(root: str, steps: int = 3, seed: int = 0) -> dict:
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.resnet50(num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(8, 3, 64, 64), torch.randint(0, 10, (8,))
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    uri = "file://" + os.path.join(root, "store")
    ck = Checkpointer(open_store(uri, check=False), "big", "main", flush_every=1, background=False)  # a commit per step: its size
    sizes = {}
    for t in range(steps + 1):
        if t:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        ck.save(t, model, snapshot=(t == steps))
        sizes[t] = sum(p["blob"][1] for p in ck.reader.lineage("main", refresh=True).entry(t)["parts"])
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    load_s = timed_torch_load(state, os.path.join(root, "whole.pt"), repeats=3)
    # restore the last delta step: a second branch whose chain is snapshot + steps − 1 deltas
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        out = Reader(open_store(uri, check=False), "big").restore("main", steps - 1)
        best = min(best, time.perf_counter() - t0)
    ck.close()
    return {"params": sum(p.numel() for p in model.parameters()), "steps": steps - 1,
            "restore_s": best, "torch_load_s": load_s, "restore_vs_torch_load": best / load_s,
            "snapshot_bytes": sizes[0], "key_bytes": sizes[steps], "delta_bytes": sizes[1],
            "restored_tensors": len(out["model"])}
