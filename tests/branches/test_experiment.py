"""Branches and slices (raybranch.branches): slice ends in the store, restore before slice K,
a poisoned slice raising the attack success rate on main, and quarantine removing it."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import raybranch as rb
from raybranch.branches.experiment import (
    BRANCH_KEYS,
    RECOVERY_KEYS,
    Experiment,
    ExperimentConfig,
    attribute_bytes,
    run_experiment,
)
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


def test_restored_head_is_the_branch_head_now(branched):
    """Experiment.restored(..., None) after more checkpoints gives the new head, not the head its
    checkpointer's reader saw first (replay's head is restored after its fork point was)."""
    _, store, main, clean = branched
    exp = Experiment(ExperimentConfig(), store)
    head = main.head()["step"]
    before = exp.restored(Net(), main, None)
    assert all(torch.equal(v, main.restore(head)["model"][k]) for k, v in before.state_dict().items())
    moved = Net()
    with torch.no_grad():
        for p in moved.parameters():
            p.fill_(0.25)
    main.save(head + 1, moved, snapshot=True)  # exact, so the comparison can be exact
    after = exp.restored(Net(), main, None)
    assert all(torch.equal(v, moved.state_dict()[k]) for k, v in after.state_dict().items())


def test_poisoned_slice_raises_asr_on_main_and_quarantine_removes_it(tmp_path):
    """LeNet-5 on digits, backdoor in slice 3, LC only, no early stopping (fixed epochs)."""
    cfg = ExperimentConfig(mechanisms=("lc",), epochs=5, patience=0, poison_rate=0.3, name="t")
    r = run_experiment(cfg, (tmp_path / "store").as_uri())
    lc = r["mechanisms"]["lc"]
    br, rec = lc["branches"], lc["recovery"]
    assert set(br) == {"main", "clean", "replay"}
    for v in br.values():
        assert all(k in v for k in BRANCH_KEYS)
    assert all(k in rec for k in RECOVERY_KEYS)
    clean_asr = br["clean"]["attack_success_rate"]
    assert rec["asr_before"] == br["main"]["attack_success_rate"]
    assert rec["asr_before"] >= clean_asr + 0.2, (rec["asr_before"], clean_asr)  # poisoning poisons (0.35 here)
    assert rec["asr_after"] <= clean_asr + 0.02  # replay without slice 3 removes it
    assert rec["asr_instant"] == clean_asr
    assert abs(rec["acc_replay"] - rec["acc_oracle"]) <= 0.02
    assert rec["acc_replay"] >= 0.85
    assert rec["replay_from_step"] == step_before_slice(Lineage(rb.open_store((tmp_path / "store").as_uri()), "t-lc", "main"), 3)
    # every checkpoint counted once: the per-branch figures add up to the run's
    t = lc["run_total"]
    assert sum(v["bytes_stored"] for v in br.values()) + t["shared_bytes"] == t["bytes_stored"]
    assert sum(v["checkpoints"] for v in br.values()) == t["checkpoints"]
    assert br["main"]["compression_ratio"] > 10
    # restored from the store (settled slice ends) = trained without raybranch, on main
    assert abs(br["main"]["acc_restored"] - br["main"]["acc_full"]) <= 1 / r["data"]["test"] + 1e-9
    assert len(br["main"]["per_slice_acc"]) == 4 and br["clean"]["per_slice_acc"][2] == br["clean"]["per_slice_acc"][1]


def test_config_errors_name_the_bad_input(tmp_path):
    for kwargs, msg in [
        ({"poison_slice": 5}, "poison_slice 5"),
        ({"mechanisms": ("lc", "zip")}, "mechanisms"),
        ({"poison": "gas"}, "poison must be"),
        ({"lora_merge": "sometimes"}, "lora_merge"),
        ({"warmup_fraction": 0.95}, "warmup_fraction"),
        ({"patience": -1}, "patience"),
    ]:
        with pytest.raises(RaybranchError, match=msg):
            run_experiment(ExperimentConfig(**kwargs), (tmp_path / "s").as_uri())
