"""Resume: a new Checkpointer continues a branch exactly; a restored model + optimizer + RNG
trains on identically to the original."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import raybranch as rb

from ckpt_testkit import MEMORYLESS, Recorder, assert_matches_record, make_model, sgd_step

BACKENDS = ["file_uri", "s3_uri"]


def _i32(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


@pytest.mark.parametrize(
    "segment_size, stop, sealed",
    # commit 0 is the branch's root, step s is commit s + 1: with pages of 3 commits, stopping after
    # step 7 leaves the head in sealed page 6-8, after step 9 in the unsealed page 9-11
    [(3, 7, True), (3, 9, False), (0, 9, False)],
    ids=["head-sealed", "head-unsealed", "no-compaction"],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_new_checkpointer_continues_the_chain(request, tmp_path, backend, segment_size, stop, sealed):
    uri = request.getfixturevalue(backend)

    def trajectory():
        model = make_model(0)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        gen = torch.Generator().manual_seed(5)
        for step in range(15):
            sgd_step(model, opt, gen)
            yield step, model, opt

    # uninterrupted reference run, in its own store; one commit per save, as the commit numbers below assume
    ref = rb.Checkpointer("file://" + str(tmp_path / "ref"), run="exp1", segment_size=segment_size, flush_every=1, **MEMORYLESS)
    ref_rec = Recorder()
    for step, model, opt in trajectory():
        ref_rec.save(ref, step, model, opt)

    # the same run, stopped after step ``stop`` and resumed by a new Checkpointer
    first = rb.Checkpointer(uri, run="exp1", segment_size=segment_size, flush_every=1, **MEMORYLESS)
    rec = Recorder()
    traj = trajectory()
    for step, model, opt in traj:
        rec.save(first, step, model, opt)
        if step == stop:
            break
    assert first.epoch == 1
    first.close()  # the writer stops (its last commits land)
    del first

    resumed = rb.Checkpointer(uri, run="exp1", segment_size=segment_size, flush_every=1, **MEMORYLESS)
    assert resumed.epoch is None
    head = resumed.head()  # loads the head: registers as the branch's writer
    assert resumed.epoch == 2
    assert head["step"] == stop and head["compacted"] == sealed
    # the encoder state rebuilt from the store is the one the first writer had, bit for bit
    assert set(resumed._enc.encoders) == set(rec.recon[stop])
    for g, r in rec.recon[stop].items():
        assert torch.equal(_i32(resumed._enc.encoders[g].recon), _i32(r))
    for step, model, opt in traj:
        rec.save(resumed, step, model, opt)
    log = resumed.log()
    assert [r["step"] for r in log] == list(range(15))
    nxt = log[stop + 1]
    assert nxt["parent"] == ["main", stop] and nxt["kind"] == "delta" and nxt["depth"] == stop + 1
    assert nxt["commit"] == stop + 3  # after the resumed writer's fence commit
    # …and continuing produced exactly what the uninterrupted run produced
    for step in range(stop + 1, 15):
        for g in ref_rec.recon[step]:
            assert torch.equal(_i32(rec.recon[step][g]), _i32(ref_rec.recon[step][g]))
    fresh = rb.Reader(rb.open_store(uri), "exp1")
    for step in (0, stop, stop + 1, 12, 14):
        assert_matches_record(fresh.restore("main", step), rec, step)


def test_resume_on_a_branch_whose_head_is_a_snapshot(file_uri):
    model = make_model(0)
    first = rb.Checkpointer(file_uri, run="exp1")
    first.save(0, model)
    first.close()
    resumed = rb.Checkpointer(file_uri, run="exp1")
    rec = Recorder()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sgd_step(model, opt, torch.Generator().manual_seed(0))
    rec.save(resumed, 1, model)
    assert [r["kind"] for r in resumed.log()] == ["snapshot", "delta"]
    assert_matches_record(rb.Checkpointer(file_uri, run="exp1").restore(1), rec, 1)


def test_resume_after_group_commits(file_uri):
    """A writer that commits in groups closes; a new one (another flush_every) goes on from its last step."""
    model = make_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    rec = Recorder()
    first = rb.Checkpointer(file_uri, run="exp1", flush_every=4, flush_seconds=None, segment_size=2)
    for step in range(7):
        sgd_step(model, opt, gen)
        rec.save(first, step, model, opt)
    first.close()  # steps 0 (the snapshot closes its group) | 1..4 | 5, 6 (committed by close)
    resumed = rb.Checkpointer(file_uri, run="exp1", flush_every=3, flush_seconds=None, segment_size=2)
    for step in range(7, 13):
        sgd_step(model, opt, gen)
        rec.save(resumed, step, model, opt)
    resumed.close()
    log = resumed.log()
    assert [r["step"] for r in log] == list(range(13))
    assert [r["commit"] for r in log] == [1, 2, 2, 2, 2, 3, 3, 5, 5, 5, 6, 6, 6]  # commit 4: the new writer's fence
    fresh = rb.Reader(rb.open_store(file_uri), "exp1")
    for step in range(13):
        assert_matches_record(fresh.restore("main", step), rec, step)


# -- restored training is identical ---------------------------------------------------------------
@pytest.fixture
def deterministic():
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(prev)


DATA_X = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(42))
DATA_Y = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(43))


def train_step(model, opt) -> float:
    """Uses every generator a checkpoint saves: numpy (batch), Python (noise scale), torch (noise, dropout)."""
    idx = torch.from_numpy(np.random.randint(0, 64, 16))
    x = DATA_X[idx] + random.random() * 0.1 * torch.randn(16, 1, 8, 8)
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), DATA_Y[idx])
    loss.backward()
    opt.step()
    return loss.item()


def make_opt(kind: str, model, lr: float):
    if kind == "sgd-momentum":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    return torch.optim.Adam(model.parameters(), lr=lr, betas=(0.8, 0.95))


def params_of(model) -> list[torch.Tensor]:
    return [t.detach().clone() for t in model.state_dict().values()]


@pytest.mark.parametrize("opt_kind", ["sgd-momentum", "adam"])
@pytest.mark.parametrize("mode", ["exact", "lossy"])
def test_restored_run_trains_on_identically(file_uri, deterministic, opt_kind, mode):
    """Train 6 steps with a checkpoint each, then compare K more steps of the original with K
    steps of a fresh model/optimizer restored from the last checkpoint (RNG restored too).

    mode "exact": ``exact=[".*"]`` stores the model losslessly, so the restored run must match
    the original as it is — the plain resume property.
    mode "lossy": the model is LC-coded; restore gives the *reconstruction* ũ, not u. The original
    is reset to ũ (taken from the encoder, not from restore) before going on, so the comparison
    isolates what else a resume needs: optimizer state, hyper-parameters, every RNG.
    """
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    model = make_model(0, p_drop=0.3)
    opt = make_opt(opt_kind, model, lr=0.05)
    kw = dict(exact=[".*"]) if mode == "exact" else dict(bits=2)
    ckpt = rb.Checkpointer(file_uri, run="exp1", save_rng=True, segment_size=4, **kw)
    for step in range(6):
        train_step(model, opt)
        ckpt.save(step, model, opt)
    ckpt.flush()  # committed, and the encoder's state settled
    if mode == "lossy":
        assert "model" in ckpt._enc.encoders
        sd = model.state_dict()
        with torch.no_grad():
            for g, enc in ckpt._enc.encoders.items():
                off = 0
                for n, size in zip(enc.names, enc.sizes):
                    sd[n].copy_(enc.recon[off : off + size].view_as(sd[n]))
                    off += size
    else:
        assert ckpt._enc.encoders == {}

    K = 4
    orig_losses, orig_params = [], []
    for _ in range(K):
        orig_losses.append(train_step(model, opt))
        orig_params.append(params_of(model))

    # somewhere else, later: other seeds, another init, another learning rate
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    model2 = make_model(77, p_drop=0.3)
    opt2 = make_opt(opt_kind, model2, lr=0.5)
    state = rb.Checkpointer(file_uri, run="exp1").restore()
    assert state["step"] == 5
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["optimizer"])
    rb.set_rng(state["rng"]["tensors"], state["rng"]["meta"])
    assert opt2.param_groups[0]["lr"] == 0.05

    for k in range(K):
        assert train_step(model2, opt2) == orig_losses[k]
        for a, b in zip(params_of(model2), orig_params[k]):
            assert a.dtype == b.dtype and torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))


def test_rng_round_trip_exact(file_uri):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in numpy's state
    random.gauss(0, 1)  # and in Python's
    ckpt = rb.Checkpointer(file_uri, run="exp1", save_rng=True)
    ckpt.save(0, make_model(0))
    want = (torch.rand(5), np.random.standard_normal(5), [random.gauss(0, 1) for _ in range(3)], random.random())
    torch.manual_seed(9)
    np.random.seed(9)
    random.seed(9)
    st = ckpt.restore(0)
    rb.set_rng(st["rng"]["tensors"], st["rng"]["meta"])
    got = (torch.rand(5), np.random.standard_normal(5), [random.gauss(0, 1) for _ in range(3)], random.random())
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and got[2] == want[2] and got[3] == want[3]


def test_uniform_writer_resumed_from_a_restore_keeps_the_bound(file_uri):
    """Training resumed from a restored head starts at ũ_head: the new writer takes that as u_{t−1},
    so every later step is within ``residual`` of its own update, and restores bit for bit."""
    model = make_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(5)
    first = rb.Checkpointer(file_uri, run="exp1", residual=0.5)
    for step in range(6):
        sgd_step(model, opt, gen)
        first.save(step, model, opt)
    first.close()
    del first
    resumed = rb.Checkpointer(file_uri, run="exp1", residual=0.5)
    state = resumed.restore()
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    rec = Recorder()
    for step in range(6, 12):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        sgd_step(model, opt, gen)
        rec.save(resumed, step, model, opt)
        enc = resumed._enc.encoders["model"]
        u = torch.cat([model.state_dict()[n].reshape(-1) for n in enc.names])
        prev = torch.cat([before[n].reshape(-1) for n in enc.names])
        assert float((u - enc.recon).norm()) <= 0.5 * float((u - prev).norm()) * (1 + 1e-6)
    resumed.flush()
    for step in range(6, 12):
        assert_matches_record(rb.Checkpointer(file_uri, run="exp1").restore(step), rec, step)
