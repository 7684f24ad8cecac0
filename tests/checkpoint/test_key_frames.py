"""Key frames store only the exact tensors that changed since their ref (a Delta-LoRA anchor is
stored once, not at every key frame), and every step still restores bit for bit — also after a
writer resumes the branch and when exact tensors change between key frames."""
from __future__ import annotations

import torch

import raybranch as rb
from raybranch.checkpoint.restore import Reader

from ckpt_testkit import Recorder, assert_matches_record, make_model, sgd_step


def _exact_rows(store, run: str, step: int, reader: Reader) -> set[str]:
    entry = next(e for e in reader.lineage("main", refresh=True).all_entries() if e["step"] == step)
    return {r.name for r in reader.blobs.step_rows(entry) if r.kind == "exact"}


def test_key_frames_skip_unchanged_exact_tensors(file_uri):
    ckpt = rb.Checkpointer(file_uri, run="k", segment_size=0, snapshot_every=3, standalone_every=3, flush_every=1)
    model, gen, rec = make_model(), torch.Generator().manual_seed(0), Recorder()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    anchor = {"w": torch.randn(64, 64, generator=gen)}  # an unchanged extra, like a Delta-LoRA anchor
    for step in range(10):
        if step:
            sgd_step(model, opt, gen)  # num_batches_tracked changes every step (BatchNorm in train mode)
        rec.save(ckpt, step, model, extra={"anchor": anchor})
    ckpt.flush()
    kinds = {r["step"]: r["kind"] for r in ckpt.log()}
    assert [kinds[s] for s in range(10)] == ["snapshot", "delta", "delta", "key", "delta", "delta", "key",
                                            "delta", "delta", "snapshot"]
    reader = Reader(rb.open_store(file_uri), "k")
    store = rb.open_store(file_uri)
    assert "extra/anchor/w" in _exact_rows(store, "k", 0, reader)       # the snapshot stores everything
    for key in (3, 6):
        rows = _exact_rows(store, "k", key, reader)
        assert "extra/anchor/w" not in rows                              # unchanged since the ref: not again
        assert "bn.num_batches_tracked" in rows                          # changed since the ref: stored
    assert "extra/anchor/w" in _exact_rows(store, "k", 9, reader)
    for step in range(10):
        got = reader.restore("main", step)
        assert_matches_record(got, rec, step)
        assert torch.equal(got["extra"]["anchor"]["w"], anchor["w"])

    # a writer that resumes the branch reads its chain base's exact tensors from the store: its
    # first key frame does not re-store the anchor either, and everything still restores
    again = rb.Checkpointer(file_uri, run="k", segment_size=0, snapshot_every=3, standalone_every=3, flush_every=1)
    for step in range(10, 14):
        sgd_step(model, opt, gen)
        rec.save(again, step, model, extra={"anchor": anchor})
    again.flush()
    kinds = {r["step"]: r["kind"] for r in again.log()}
    first_key = min(s for s in range(10, 14) if kinds[s] == "key")
    rows = _exact_rows(store, "k", first_key, Reader(store, "k"))
    assert "extra/anchor/w" not in rows and "bn.num_batches_tracked" in rows
    for step in range(14):
        assert_matches_record(Reader(store, "k").restore("main", step), rec, step)
