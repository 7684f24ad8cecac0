"""Checkpointer end to end on a local store and on a real S3 server: restore = reconstruction
bit for bit, sealing and compaction of pages, log, fork, snapshots, corruption, bad input."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import zstandard

import raybranch as rb
from raybranch.checkpoint.restore import Reader
from raybranch.errors import ConflictError, CorruptBlobError, NonFiniteError, NotFoundError, RaybranchError
from raybranch.ledger.lineage import Lineage
from raybranch.ledger.records import commit_key, layout_key, page_key
from raybranch.ledger.verify import verify_store

from ckpt_testkit import (
    Recorder, assert_matches_record, branch_id, commit_seqs, local_files, make_model, sealed_pages, sgd_step, state_bytes,
    store_files,
)

BACKENDS = ["file_uri", "s3_uri"]


@pytest.fixture(params=BACKENDS)
def uri(request):
    return request.getfixturevalue(request.param)


def train_and_save(ckpt, steps, *, seed=0, start=0, model=None, opt=None, rec=None, extra=True):
    model = model if model is not None else make_model(seed)
    opt = opt if opt is not None else torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(seed + 1000 * start)
    rec = rec if rec is not None else Recorder()
    for step in range(start, start + steps):
        sgd_step(model, opt, gen)
        ex = {"epoch": step // 10, "tag": "t", "marker": torch.full((2,), float(step))} if extra else None
        rec.save(ckpt, step, model, opt, extra=ex)
    return model, opt, rec


def blob_names(store, run="exp1") -> set[str]:
    return {i.base_name for i in store.list(f"{run}/blobs")}


def referenced_blobs(store, run="exp1", branch="main") -> set[str]:
    return {p["blob"][0] + ".arrow" for e in Lineage(store, run, branch).all_entries() for p in e["parts"]}


# -- restore equals the encoder's reconstruction ----------------------------------------------------
def test_restore_equals_reconstruction_and_pages_seal(uri):
    """A new branch is commit 0 (no steps), then one commit per save: after N saves with
    segment_size S, (N + 1) // S pages are sealed, their steps compacted into one blob each,
    and the commit records of sealed pages are gone except the newest page's last."""
    store = rb.open_store(uri)
    ckpt = rb.Checkpointer(store, run="exp1", branch="main", bits=3, segment_size=8, flush_every=1)
    model, opt, rec = train_and_save(ckpt, 35)
    ckpt.flush()  # the last commits (and seals) run behind the training thread
    # commits 0..35: pages 0-7, 8-15, 16-23, 24-31 sealed; steps 31..34 (commits 32..35) loose
    assert sealed_pages(store, "exp1") == [(0, 7), (8, 15), (16, 23), (24, 31)]
    assert commit_seqs(store, "exp1") == [31, 32, 33, 34, 35]
    assert [r["compacted"] for r in ckpt.log()] == [True] * 31 + [False] * 4
    loose = {s: state_bytes(ckpt.restore(s)) for s in (31, 33, 34)}

    train_and_save(ckpt, 5, start=35, model=model, opt=opt, rec=rec)
    rng = np.random.default_rng(3)
    steps = sorted(set(rng.choice(40, 8, replace=False).tolist()) | {0, 1, 8, 9, 31, 32, 38, 39})
    before = {}
    for s in steps:
        state = ckpt.restore(s)
        assert_matches_record(state, rec, s)
        assert state["extra"]["epoch"] == s // 10 and state["extra"]["tag"] == "t"
        assert torch.equal(state["extra"]["marker"], torch.full((2,), float(s)))
        before[s] = state_bytes(state)
    assert ckpt.restore()["step"] == 39  # latest

    log = ckpt.log()
    assert [r["step"] for r in log] == list(range(40))
    assert [r["kind"] for r in log] == ["snapshot"] + ["delta"] * 39
    assert log[0]["parent"] is None and all(r["parent"] == ["main", r["step"] - 1] for r in log[1:])
    assert [r["depth"] for r in log] == list(range(40))
    assert [r["commit"] for r in log] == list(range(1, 41))
    # 41 commits: 5 full pages sealed and compacted, step 39 (commit 40) loose
    assert [r["compacted"] for r in log] == [True] * 39 + [False]
    assert all(r["id"] == f"exp1/main/{r['step']}" and r["bytes"] > 0 for r in log)
    bid = branch_id(store, "exp1")
    assert sealed_pages(store, "exp1") == [(0, 7), (8, 15), (16, 23), (24, 31), (32, 39)]
    assert [i.rel for i in store.list(f"exp1/branches/{bid}/pages")] == [page_key("exp1", bid, a, b, 0) for a, b in sealed_pages(store, "exp1")]
    assert commit_seqs(store, "exp1") == [39, 40]
    assert len({r["bytes"] for r in log[:7]}) == 1  # one page, one segment blob

    # sealing (and close, which has nothing left to seal) changes no restore, byte for byte
    ckpt.close()
    assert sealed_pages(store, "exp1")[-1] == (32, 39) and commit_seqs(store, "exp1") == [39, 40]
    fresh = Reader(rb.open_store(uri), "exp1")
    for s in steps:
        assert state_bytes(fresh.restore("main", s)) == before[s]
    for s, b in loose.items():
        assert state_bytes(fresh.restore("main", s)) == b  # restored loose, now compacted
    # every blob in the store is referenced: sealing removed the per-commit blobs it compacted
    assert blob_names(store) == referenced_blobs(store) and len(blob_names(store)) == 6
    rep = verify_store(store, "exp1")
    assert rep.problems == [] and rep.counts["steps"] == 40 and rep.counts["pages"] == 5


@pytest.mark.parametrize(
    "kw",
    [
        dict(codec="lc", bits=1, granularity="tensor", value="midrange"),
        dict(codec="lc", bits=8, granularity="global", value="mean", optimizer_codec="lc"),
        dict(codec="lc", bits=2, granularity="tensor", value="mean", optimizer_codec="lc", segment_size=0),
        dict(residual=0.3, optimizer_codec="lc"),
        dict(residual=2.0, key_every=4, standalone_every=2),
    ],
    ids=["lc-b1-tensor-midrange", "lc-b8-global-lcoptim", "lc-b2-tensor-nocompact", "uniform-r0.3-lcoptim", "uniform-keys"],
)
def test_restore_equals_reconstruction_codec_options(file_uri, kw):
    kw = {"segment_size": 5, **kw}
    ckpt = rb.Checkpointer(file_uri, run="exp1", flush_every=1, **kw)  # one commit per save
    _, _, rec = train_and_save(ckpt, 12, extra=False)
    ckpt.flush()
    if kw.get("optimizer_codec") == "lc":
        assert "optim" in ckpt._enc.encoders and "model" in ckpt._enc.encoders
    fresh = Reader(rb.open_store(file_uri), "exp1")
    for s in range(12):
        assert_matches_record(fresh.restore("main", s), rec, s)
    # commits 0..12: pages 0-4 and 5-9 sealed (steps 0..8); segment_size=0 seals nothing before 64 commits
    want = [False] * 12 if kw["segment_size"] == 0 else [True] * 9 + [False] * 3
    assert [r["compacted"] for r in ckpt.log()] == want


def test_key_frames(uri):
    store = rb.open_store(uri)
    ckpt = rb.Checkpointer(store, run="exp1", key_every=5, standalone_every=3, segment_size=3)
    _, _, rec = train_and_save(ckpt, 27, extra=False)
    log = ckpt.log()
    # exact every 5 checkpoints; every 3rd exact one standalone, the others coded against the one before
    assert [(r["step"], r["kind"]) for r in log if r["kind"] != "delta"] == [
        (0, "snapshot"), (5, "key"), (10, "key"), (15, "snapshot"), (20, "key"), (25, "key")]
    assert [r["depth"] for r in log] == [s % 5 for s in range(27)]
    # an exact checkpoint restores the trained state itself, bit for bit
    model, opt = make_model(3), None
    exact_ck = rb.Checkpointer(store, run="exact", key_every=3, standalone_every=2)
    gen = torch.Generator().manual_seed(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    trained = {}
    for step in range(10):
        sgd_step(model, opt, gen)
        exact_ck.save(step, model)
        trained[step] = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = {r["step"]: r["kind"] for r in exact_ck.log()}
    fresh_exact = Reader(rb.open_store(uri), "exact")
    for step in (0, 3, 6, 9):
        assert kinds[step] in ("snapshot", "key")
        got = fresh_exact.restore("main", step)["model"]
        assert all(torch.equal(got[k].view(torch.uint8) if got[k].is_floating_point() else got[k],
                               trained[step][k].view(torch.uint8) if got[k].is_floating_point() else trained[step][k]) for k in got)
    fresh = Reader(rb.open_store(uri), "exp1")
    for s in range(17):
        assert_matches_record(fresh.restore("main", s), rec, s)


def test_forced_snapshot_and_layout_change(file_uri):
    ckpt = rb.Checkpointer(file_uri, run="exp1", segment_size=0)
    model, opt, rec = train_and_save(ckpt, 3, extra=False)
    rec.save(ckpt, 3, model, opt, snapshot=True)
    # a different model layout (another set of tensors) starts a new chain with a snapshot
    other = torch.nn.Linear(10, 10)
    ckpt.save(4, other)
    ckpt.save(5, other)
    assert [r["kind"] for r in ckpt.log()] == ["snapshot", "delta", "delta", "key", "snapshot", "delta"]
    for s in range(4):
        assert_matches_record(ckpt.restore(s), rec, s)
    st = ckpt.restore(5)
    assert set(st["model"]) == {"weight", "bias"} and st["optimizer"] is None


def test_restore_latest_sees_new_commits(file_uri):
    ckpt = rb.Checkpointer(file_uri, run="exp1", segment_size=3)
    model, opt, rec = train_and_save(ckpt, 4, extra=False)
    reader = Reader(rb.open_store(file_uri), "exp1")
    assert ckpt.restore()["step"] == 3 and reader.restore("main")["step"] == 3
    train_and_save(ckpt, 4, start=4, model=model, opt=opt, rec=rec, extra=False)
    assert_matches_record(ckpt.restore(), rec, 7)
    assert_matches_record(reader.restore("main"), rec, 7)


# -- fork ------------------------------------------------------------------------------------
def test_fork_shares_history(uri):
    store = rb.open_store(uri)
    main = rb.Checkpointer(store, run="exp1", branch="main", segment_size=8, flush_every=1)
    model, opt, rec = train_and_save(main, 20, extra=False)
    main.flush()
    assert sealed_pages(store, "exp1") == [(0, 7), (8, 15)]  # step 13 (commit 14) is sealed

    blobs_before = blob_names(store)
    files_before = store_files(store)
    alt = main.fork("alt", step=13)
    assert blob_names(store) == blobs_before  # no blob written for the shared part
    new_files = set(store_files(store)) - set(files_before)
    bid = branch_id(store, "exp1", "alt")
    assert new_files == {"exp1/refs/branches/alt.json", f"exp1/branches/{bid}/branch.json", commit_key("exp1", bid, 0)}

    parent_13 = state_bytes(main.restore(13))
    assert state_bytes(alt.restore(13)) == parent_13
    assert state_bytes(Reader(rb.open_store(uri), "exp1").restore("alt", 13)) == parent_13
    alt_log = alt.log()
    assert [(r["step"], r["kind"], r["parent"], r["tags"]) for r in alt_log] == [(13, "fork", ["main", 13], ["fork"])]
    assert alt.head()["step"] == 13

    # the fork trains on differently from the parent's step-13 state
    fmodel = make_model(0)
    fmodel.load_state_dict(alt.restore(13)["model"])
    fopt = torch.optim.SGD(fmodel.parameters(), lr=0.2, momentum=0.5)
    _, _, frec = train_and_save(alt, 5, seed=7, start=14, model=fmodel, opt=fopt, extra=False)
    alt_log = alt.log()
    assert [r["step"] for r in alt_log] == [13, 14, 15, 16, 17, 18]
    assert alt_log[1]["parent"] == ["alt", 13] and alt_log[1]["kind"] == "delta"
    assert alt_log[1]["depth"] == main.log()[13]["depth"] + 1
    # a fork at a step whose page is not sealed yet; the parent goes on and seals it
    alt2 = main.fork("alt2", step=17)
    parent_17 = state_bytes(main.restore(17))
    train_and_save(main, 3, start=20, model=model, opt=opt, rec=rec, extra=False)
    main.flush()
    assert sealed_pages(store, "exp1")[-1] == (16, 23) and commit_seq_gone(store, 18)
    fresh = Reader(rb.open_store(uri), "exp1")
    assert state_bytes(fresh.restore("alt2", 17)) == parent_17
    assert state_bytes(alt2.restore(17)) == parent_17
    for s in range(14, 19):
        assert_matches_record(fresh.restore("alt", s), frec, s)
    for s in (0, 12, 13, 14, 19, 22):
        assert_matches_record(fresh.restore("main", s), rec, s)
    assert [r["step"] for r in main.log()] == list(range(23))

    with pytest.raises(ConflictError, match="'alt'"):
        main.fork("alt", step=5)
    with pytest.raises(NotFoundError, match="777"):
        main.fork("other", step=777)
    assert verify_store(store, "exp1").problems == []


def commit_seq_gone(store, seq, run="exp1", branch="main") -> bool:
    return seq not in commit_seqs(store, run, branch)


# -- corruption ------------------------------------------------------------------------------
def _flip(path: str, pos: int | None = None) -> None:
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        i = len(data) // 2 if pos is None else pos
        data[i] ^= 0xFF
        f.seek(0)
        f.write(data)


@pytest.fixture
def small_run(file_uri):
    """Commits 0..10: pages 0-3 (steps 0 snapshot, 1, 2) and 4-7 (steps 3..6) sealed and
    compacted into one blob each; steps 7, 8, 9 (commits 8, 9, 10) loose, one blob each."""
    ckpt = rb.Checkpointer(file_uri, run="exp1", segment_size=4, flush_every=1)  # one commit per save
    train_and_save(ckpt, 10, extra=False)
    ckpt.close()
    entries = {e["step"]: e for e in Lineage(ckpt.store, "exp1", "main").all_entries()}
    assert sorted(entries) == list(range(10)) and entries[0]["kind"] == "snapshot"
    assert [p["name"] for p in entries[5]["parts"]] == ["segment"] and [p["name"] for p in entries[8]["parts"]] == ["0"]
    assert entries[0]["parts"] == entries[2]["parts"] != entries[3]["parts"]
    assert sealed_pages(ckpt.store, "exp1") == [(0, 3), (4, 7)] and commit_seqs(ckpt.store, "exp1") == [7, 8, 9, 10]
    return file_uri, ckpt.store, entries


def _problems(uri) -> list[str]:
    return verify_store(rb.open_store(uri), "exp1").problems


@pytest.mark.parametrize(
    "which, bad_steps, good_steps",
    [("segment", [3, 6, 9], [0, 1, 2]), ("loose", [8, 9], [0, 4, 7]), ("snapshot", [0, 5, 9], [])],
)
def test_flipped_byte_in_blob(small_run, which, bad_steps, good_steps):
    uri, store, entries = small_run
    assert _problems(uri) == []
    h = entries[{"segment": 5, "loose": 8, "snapshot": 0}[which]]["parts"][0]["blob"][0]
    _flip(os.path.join(store.root, "exp1", "blobs", f"{h}.arrow"))

    problems = _problems(uri)
    assert problems and all("\n" not in p for p in problems)
    assert any(h in p for p in problems)

    reader = Reader(rb.open_store(uri), "exp1")
    for s in bad_steps:
        with pytest.raises(CorruptBlobError) as ei:
            reader.restore("main", s)
        msg = str(ei.value)
        assert "\n" not in msg and h in msg
    for s in good_steps:
        assert reader.restore("main", s)["step"] == s  # damage stays local to the chains through it


def test_flipped_byte_anywhere_in_a_loose_blob(small_run):
    uri, store, entries = small_run
    h = entries[9]["parts"][0]["blob"][0]
    path = os.path.join(store.root, "exp1", "blobs", f"{h}.arrow")
    size = os.path.getsize(path)
    for pos in np.random.default_rng(5).choice(size, 12, replace=False).tolist() + [0, size - 1]:
        _flip(path, pos)
        with pytest.raises(CorruptBlobError):
            Reader(rb.open_store(uri), "exp1").restore("main", 9)
        _flip(path, pos)  # undo
    assert Reader(rb.open_store(uri), "exp1").restore("main", 9)["step"] == 9


def _edit_json(path: str) -> None:
    with open(path) as f:
        doc = json.load(f)
    doc["steps"][0]["step"] += 100
    with open(path, "w") as f:
        json.dump(doc, f)


@pytest.mark.parametrize(
    "damage, bad_steps, good_steps",
    [
        ("edit", [8, 9], [0, 5, 7]),  # a loose commit record (step 8) edited: its checksum fails
        ("garbage", [8, 9], [0, 5, 7]),  # …or not JSON at all
        ("head", [0, 4, 9], []),  # the head commit is read to open the branch at all
        ("page", [3, 5, 9], [0, 2]),  # a sealed page (steps 3..6) edited
    ],
)
def test_corrupt_commit_record_or_page(small_run, damage, bad_steps, good_steps):
    uri, store, entries = small_run
    bid = branch_id(store, "exp1")
    if damage == "page":
        rel = page_key("exp1", bid, 4, 7, 0)
        path = os.path.join(store.root, rel)
        with open(path, "rb") as f:
            doc = json.loads(zstandard.ZstdDecompressor().decompress(f.read()))
        doc["steps"][0]["step"] += 100
        with open(path, "wb") as f:
            f.write(zstandard.ZstdCompressor().compress(json.dumps(doc).encode()))
    else:
        rel = commit_key("exp1", bid, 10 if damage == "head" else 9)
        path = os.path.join(store.root, rel)
        if damage == "garbage":
            with open(path, "w") as f:
                f.write('{"seq": 9, "kind": "ste')
        else:
            _edit_json(path)
    for step in bad_steps:
        for restore in (lambda s: rb.Checkpointer(uri, run="exp1").restore(s), lambda s: Reader(rb.open_store(uri), "exp1").restore("main", s)):
            with pytest.raises(CorruptBlobError) as ei:
                restore(step)
            msg = str(ei.value)
            assert "\n" not in msg and rel in msg
    for step in good_steps:
        assert Reader(rb.open_store(uri), "exp1").restore("main", step)["step"] == step
    problems = _problems(uri)
    assert any(rel in p for p in problems), problems


def test_corrupt_layout(small_run):
    uri, store, entries = small_run
    rel = layout_key("exp1", entries[9]["layout"])
    with open(os.path.join(store.root, rel), "r+") as f:
        doc = json.load(f)
        doc["model_keys"] = list(reversed(doc["model_keys"]))
        f.seek(0)
        json.dump(doc, f)
        f.truncate()
    with pytest.raises(CorruptBlobError) as ei:
        rb.Checkpointer(uri, run="exp1").restore(9)
    assert rel in str(ei.value) and "\n" not in str(ei.value)
    assert any(rel in p for p in _problems(uri))


# -- bad input -------------------------------------------------------------------------------
def test_unknown_run_branch_step(uri):
    ckpt = rb.Checkpointer(uri, run="exp1")
    train_and_save(ckpt, 3, extra=False)
    ckpt.flush()  # the saves' commit is a write; what follows must not be
    cases = [
        (lambda: rb.Checkpointer(uri, run="ghost").restore(), "'ghost'"),
        (lambda: Reader(rb.open_store(uri), "ghost").restore("main", 0), "'ghost'"),
        (lambda: ckpt.restore(branch="nobranch"), "'nobranch'"),
        (lambda: ckpt.restore(1, branch="nobranch"), "'nobranch'"),
        (lambda: ckpt.restore(7), "step 7"),
        (lambda: ckpt.restore(-1), "step -1"),
    ]
    files = store_files(ckpt.store)
    for fn, names in cases:
        with pytest.raises(NotFoundError) as ei:
            fn()
        msg = str(ei.value)
        assert names in msg and "\n" not in msg, msg
    assert store_files(ckpt.store) == files  # looking things up writes nothing


@pytest.mark.parametrize(
    "when, tensor",
    [
        ("first", "fc.weight"),  # the snapshot path, lossy tensor
        ("first", "fc.bias"),  # exact tensor
        ("delta", "conv.weight"),  # the LC path
        ("delta", "fc.bias"),
        ("delta", "bn.running_var"),
        ("resumed", "conv.weight"),  # the first save of a new Checkpointer on the branch: no fence commit either
        ("resumed", "fc.bias"),
    ],
)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_weights_write_nothing(file_uri, when, tensor, bad):
    ckpt = rb.Checkpointer(file_uri, run="exp1", segment_size=2)
    model = make_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    rec = Recorder()
    if when in ("delta", "resumed"):
        for s in range(3):
            sgd_step(model, opt, gen)
            rec.save(ckpt, s, model, opt)
    ckpt.close()  # steps 0..2 committed: the store is settled before the bad save
    if when == "resumed":
        ckpt = rb.Checkpointer(file_uri, run="exp1", segment_size=2)
    root = rb.open_store(file_uri).root
    files = local_files(root) if os.path.isdir(root) else {}
    recon = {g: e.recon.clone() for g, e in ckpt._enc.encoders.items()}
    good = model.state_dict()[tensor].clone()
    with torch.no_grad():
        model.state_dict()[tensor].view(-1)[1] = bad
    step = 0 if when == "first" else 3
    with pytest.raises(NonFiniteError) as ei:
        ckpt.save(step, model, opt)
    msg = str(ei.value)
    assert repr(tensor) in msg and "\n" not in msg
    after = local_files(root) if os.path.isdir(root) else {}
    assert after == files, f"written despite NaN/Inf: {sorted(set(after) ^ set(files))}"
    assert all(torch.equal(ckpt._enc.encoders[g].recon, r) for g, r in recon.items())
    # fixing the weights, the same step saves and restores
    with torch.no_grad():
        model.state_dict()[tensor].copy_(good)
    rec.save(ckpt, step, model, opt)
    ckpt.close()
    assert_matches_record(rb.Checkpointer(file_uri, run="exp1").restore(step), rec, step)


def test_step_not_after_head(file_uri):
    ckpt = rb.Checkpointer(file_uri, run="exp1")
    model, opt, _ = train_and_save(ckpt, 6, extra=False)
    ckpt.flush()  # steps 1..5 committed now, not by the time window while the refused saves run
    root = ckpt.store.root
    files = local_files(root)
    for step in (5, 2, -1):
        with pytest.raises(RaybranchError) as ei:
            ckpt.save(step, model, opt)
        assert f"step {step}" in str(ei.value) and "\n" not in str(ei.value)
    assert local_files(root) == files
    ckpt.save(8, model, opt)  # gaps are fine
    assert [r["step"] for r in ckpt.log()] == [0, 1, 2, 3, 4, 5, 8]


@pytest.mark.parametrize(
    "kw, names",
    [
        (dict(run="a/b"), "'a/b'"),
        (dict(run=""), "''"),
        (dict(run="x", branch="../up"), "'../up'"),
        (dict(run="x", bits=9), "9"),
        (dict(run="x", granularity="layer"), "'layer'"),
        (dict(run="x", snapshot_every=0), "0"),
        (dict(run="x", key_every=0), "key_every"),
        (dict(run="x", standalone_every=0), "standalone_every"),
        (dict(run="x", codec="zip"), "'zip'"),
        (dict(run="x", residual=0), "residual"),
        (dict(run="x", segment_size=-1), "-1"),
        (dict(run="x", optimizer_codec="zip"), "'zip'"),
        (dict(run="x", flush_every=0), "0"),
    ],
)
def test_bad_checkpointer_arguments(file_uri, kw, names):
    with pytest.raises(RaybranchError) as ei:
        rb.Checkpointer(file_uri, **kw)
    assert names in str(ei.value) and "\n" not in str(ei.value)


def test_bad_store_uri_in_checkpointer():
    with pytest.raises(rb.StoreError):
        rb.Checkpointer("ftp://host/x", run="exp1")


def test_restore_reads_stay_within_the_key_frame_budget(file_uri):
    """A restore decodes at most key_every − 1 deltas and standalone_every − 1 key frames, so its
    reads do not grow with the branch's history."""
    ckpt = rb.Checkpointer(file_uri, run="exp1", key_every=6, standalone_every=3, segment_size=4, flush_every=1)
    _, _, rec = train_and_save(ckpt, 120, extra=False)
    ckpt.close()
    lin = Lineage(rb.open_store(file_uri), "exp1", "main")
    from raybranch.checkpoint.restore import chain_to, key_refs

    for s in range(120):
        chain = chain_to(lin, lin.entry(s))
        assert len(chain) <= 6 and len(key_refs(lin, chain[0])) <= 2

    def reads(step):
        store = rb.open_store(file_uri)
        out = Reader(store, "exp1").restore("main", step)
        assert_matches_record(out, rec, step)
        return store.stats.reads

    early = max(reads(s) for s in range(24, 36))
    late = max(reads(s) for s in range(108, 120))
    assert late <= early + 1  # five times the history, the same reads (+1: one more page level at most)


def test_restore_budget_sets_the_key_frame_interval(file_uri):
    """restore_budget_s: key frames as often as the measured delta decode time allows."""
    tight = rb.Checkpointer(file_uri, run="tight", restore_budget_s=1e-9)  # below one delta's decode: every save exact
    train_and_save(tight, 8, extra=False)
    log = tight.log()  # (waits for the pipeline, which measures the deltas and sets key_every)
    assert tight._enc.key_every == 1 and all(r["kind"] != "delta" for r in log[5:])
    loose = rb.Checkpointer(file_uri, run="loose", restore_budget_s=3600.0)
    _, _, rec = train_and_save(loose, 12, extra=False)
    log = loose.log()
    assert loose._enc.key_every == 4096 and [r["kind"] for r in log][1:] == ["delta"] * 11
    for s in range(12):
        assert_matches_record(Reader(rb.open_store(file_uri), "loose").restore("main", s), rec, s)
    fork = loose.fork("other", step=5)
    assert fork.restore_budget_s == 3600.0
    with pytest.raises(RaybranchError, match="not both"):
        rb.Checkpointer(file_uri, run="x", restore_budget_s=1.0, key_every=5)
    with pytest.raises(RaybranchError, match="restore_budget_s"):
        rb.Checkpointer(file_uri, run="x", restore_budget_s=0)
