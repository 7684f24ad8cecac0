"""Slices along branches (raybranch.branches.slices, .accounting): slice ends in the store,
restore before slice K, the bytes charged to each branch."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import raybranch as rb
from raybranch.branches.accounting import attribute_bytes
from raybranch.branches.slices import lineage, slice_ends, step_before_slice
from raybranch.cli.main import main as cli_main
from raybranch.errors import NotFoundError, RaybranchError
from raybranch.ledger import Lineage
from raybranch.train.loop import train_slice

torch.set_num_threads(1)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def slice_data(k: int, n: int = 32):
    g = torch.Generator().manual_seed(k)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 1, 8, 8, generator=g)
    x[torch.arange(n), 0, 2 * y + 1, :] += 2.0
    return x, y


@pytest.fixture
def branched(tmp_path):
    """main trains slices 1-4, clean (a fork at the branch point) skips slice 3."""
    torch.manual_seed(0)
    uri = (tmp_path / "store").as_uri()
    store = rb.open_store(uri)
    models = {}
    main = rb.Checkpointer(store, "r", "main", save_rng=False)
    m = Net()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    main.save(0, m, opt, tags=["branch-point"])
    clean = main.fork("clean", step=0)
    cm = Net()
    cm.load_state_dict(m.state_dict())
    copt = torch.optim.SGD(cm.parameters(), lr=0.1)
    step = {"main": 0, "clean": 0}
    for k in range(1, 5):
        step["main"] = train_slice(m, opt, slice_data(k), epochs=2, batch_size=16, ckpt=main, step0=step["main"],
                                   slice_id=k, settle=1).last_step
        if k != 3:
            step["clean"] = train_slice(cm, copt, slice_data(k), epochs=2, batch_size=16, ckpt=clean,
                                        step0=step["clean"], slice_id=k).last_step
    models.update(main=m, clean=cm)
    return uri, store, main, clean


def test_slice_ends_are_tagged_checkpoints_on_each_lineage(branched):
    _, store, main, clean = branched
    ends = slice_ends(Lineage(store, "r", "main"))
    assert sorted(ends) == [1, 2, 3, 4]
    assert ends == {k: 5 * k for k in range(1, 5)}  # 4 steps + 1 settle checkpoint per slice
    assert sorted(slice_ends(Lineage(store, "r", "clean"))) == [1, 2, 4]
    # clean's lineage: main's branch point (shared, not copied), then its own checkpoints
    lin = Lineage(store, "r", "clean")
    hist = lineage(lin)
    assert hist[0]["branch"] == "main" and hist[0]["step"] == 0
    assert hist[0]["branch_id"] == Lineage(store, "r", "main").entry(0)["branch_id"] != lin.log.bid
    assert all(e["branch"] == "clean" and e["branch_id"] == lin.log.bid for e in hist[1:])
    assert [e["step"] for e in lin.log.all_entries()] == [e["step"] for e in hist[1:]]  # the fork point is not copied
    assert lin.fork["step"] == 0 and lin.fork["branch"] == "main"


def test_restore_before_slice_k_is_the_end_of_slice_k_minus_1(branched, tmp_path):
    uri, store, main, clean = branched
    lm, lc = Lineage(store, "r", "main"), Lineage(store, "r", "clean")
    log = {r["step"]: r for r in main.log()}
    for k in (2, 3, 4):
        step = step_before_slice(lm, k)
        assert f"slice-end:{k - 1}" in log[step]["tags"]
        before, end = main.restore(step)["model"], main.restore(slice_ends(lm)[k - 1])["model"]
        for name in before:
            assert torch.equal(before[name], end[name])
    assert step_before_slice(lm, 1) == 0  # the branch point
    # clean skipped slice 3: before slice 4 it was at the end of slice 2
    assert step_before_slice(lc, 4) == slice_ends(lc)[2]
    assert step_before_slice(lc, 3) == slice_ends(lc)[2]
    assert step_before_slice(lc, 1) == 0
    with pytest.raises(NotFoundError, match="no end of slice 5"):
        step_before_slice(lm, 6)
    with pytest.raises(RaybranchError, match="K ≥ 1"):
        step_before_slice(lm, 0)
    with pytest.raises(NotFoundError, match="no branch 'nope'"):
        step_before_slice(Lineage(store, "r", "nope"), 2)  # naming the run's branches
    with pytest.raises(NotFoundError, match=r"branches: clean, main"):
        Lineage(store, "r", "nope")

    # the CLI: `raybranch restore --before-slice 3` restores main at the end of slice 2
    out = tmp_path / "before3.pt"
    assert cli_main(["restore", "--store", uri, "--run", "r", "--branch", "main", "--before-slice", "3", "--output", str(out)]) == 0
    got = torch.load(out, weights_only=True)
    want = main.restore(slice_ends(lm)[2])["model"]
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_attributed_bytes_add_up_to_the_run(branched):
    _, store, main, clean = branched
    per, shared, total = attribute_bytes(store, "r", ["main", "clean"])
    assert per["main"]["bytes_stored"] + per["clean"]["bytes_stored"] + shared == total == store.total_bytes("r")
    assert per["main"]["checkpoints"] == 1 + 16 and per["main"]["settle_checkpoints"] == 4
    assert per["clean"]["checkpoints"] == 12 and per["clean"]["settle_checkpoints"] == 0
    assert 0 <= shared < 4096  # layout documents only
