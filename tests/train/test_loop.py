"""The training loop of one slice (raybranch.train.loop): checkpoints, Delta-LoRA rebuild,
NaN rollback, early stopping, settle checkpoints, seeded batch order."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import raybranch as rb
from raybranch.errors import FencedError, RaybranchError
from raybranch.lora import inject_delta_lora, lora_anchor
from raybranch.train.loop import (
    NonFiniteLossError,
    batch_order,
    evaluate_accuracy,
    load_checkpoint,
    train_slice,
)

torch.set_num_threads(1)


class Net(nn.Module):
    """conv(1→4, 3×3) → ReLU → classifier Linear(144→16) → ReLU → Linear(16→3), 8×8 input."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.classifier = nn.Sequential(nn.Linear(4 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x):
        return self.classifier(torch.relu(self.conv(x)).flatten(1))


def make_data(n: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable 3-class problem: the class sets the mean brightness of one image row band."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.5
    x[torch.arange(n), 0, 2 * y + 1, :] += 2.0
    return x, y


def make_model(seed: int = 0, lora: bool = False) -> Net:
    torch.manual_seed(seed)
    m = Net()
    if lora:
        inject_delta_lora(m, "classifier", rank=2, generator=torch.Generator().manual_seed(seed + 1))
    return m


def steps_of(ckpt: rb.Checkpointer) -> list[int]:
    return [r["step"] for r in ckpt.log()]


def test_batch_order_is_seeded_and_depends_on_slice_and_epoch():
    a = batch_order(50, seed=3, slice_id=2, epoch=1)
    assert torch.equal(a, batch_order(50, seed=3, slice_id=2, epoch=1))
    assert sorted(a.tolist()) == list(range(50))
    assert not torch.equal(a, batch_order(50, seed=3, slice_id=2, epoch=2))
    assert not torch.equal(a, batch_order(50, seed=3, slice_id=3, epoch=1))


def test_training_is_deterministic_and_checkpoints_every_step(tmp_path):
    data = make_data()
    runs = []
    for i in range(2):
        m = make_model()
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        ck = rb.Checkpointer(rb.open_store((tmp_path / f"s{i}").as_uri()), "r", "main", save_rng=False)
        ck.save(0, m, opt)
        res = train_slice(m, opt, data, epochs=2, batch_size=32, ckpt=ck, step0=0, slice_id=1)
        runs.append((m, res, ck))
    (m0, r0, ck0), (m1, _, _) = runs
    for k, v in m0.state_dict().items():
        assert torch.equal(v, m1.state_dict()[k]), k
    assert r0.steps == 6 and r0.last_step == 6 and r0.checkpoints == 6
    log = ck0.log()
    assert [r["step"] for r in log] == list(range(7))
    assert log[-1]["tags"] == ["slice-end:1"] and all(r["slices"] == [1] for r in log[1:])
    assert all("slice-end:1" not in r["tags"] for r in log[:-1])
    assert evaluate_accuracy(m0, *data) > 0.6  # it learns


def test_delta_lora_branch_restores_to_the_same_model(tmp_path):
    """Stored losslessly (exact=everything), the LoRA checkpoint rebuilds the live model bit for
    bit: A, B and the rest from the state, W = W_a + λ·s·(BA − B_aA_a) from the anchor."""
    data = make_data()
    m = make_model(lora=True)
    opt = torch.optim.SGD(m.parameters(), lr=0.2)
    store = rb.open_store(tmp_path.as_uri())
    ck = rb.Checkpointer(store, "r", "main", exact=(".*",), save_rng=False)
    res = train_slice(m, opt, data, epochs=2, batch_size=16, ckpt=ck, step0=0, slice_id=1)
    assert res.steps == 12
    restored = ck.restore()
    assert "lora_anchor" in restored["extra"]
    assert not any(k.endswith("classifier.0.weight") for k in restored["model"])  # no dense W per step
    rebuilt = make_model(seed=5, lora=True)  # different init: everything must come from the store
    load_checkpoint(rebuilt, restored)
    x = data[0][:20]
    with torch.no_grad():
        assert torch.equal(rebuilt(x), m(x))
    for k, v in m.state_dict().items():
        assert torch.equal(v, rebuilt.state_dict()[k]), k
    # a W that moved: Delta-LoRA did update the dense weight
    anchor = lora_anchor(m)
    assert not torch.equal(m.classifier[0].weight, make_model(lora=True).classifier[0].weight)
    assert torch.equal(anchor["classifier.0.weight"], make_model(lora=True).classifier[0].weight)


def test_delta_lora_lc_restore_is_close_and_settle_tightens_it(tmp_path):
    data = make_data()
    errs = {}
    for settle in (0, 3):
        m = make_model(lora=True)
        opt = torch.optim.SGD(m.parameters(), lr=0.2)
        ck = rb.Checkpointer(rb.open_store((tmp_path / str(settle)).as_uri()), "r", "main", save_rng=False)
        res = train_slice(m, opt, data, epochs=2, batch_size=16, ckpt=ck, step0=0, slice_id=1, settle=settle)
        assert res.settle_checkpoints == settle and res.last_step == 12 + settle
        log = ck.log()
        assert log[-1]["tags"][-1] == "slice-end:1" and sum("slice-end:1" in r["tags"] for r in log) == 1
        rebuilt = make_model(seed=5, lora=True)
        load_checkpoint(rebuilt, ck.restore())
        with torch.no_grad():
            errs[settle] = float((rebuilt(data[0]) - m(data[0])).abs().max())
    assert errs[3] < errs[0] / 4
    assert errs[0] < 0.5


def test_nan_loss_rolls_back_to_the_last_checkpoint_and_halves_the_lr(tmp_path):
    data = make_data()
    m = make_model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    ck = rb.Checkpointer(rb.open_store(tmp_path.as_uri()), "r", "main", save_rng=False)
    ck.save(0, m, opt)
    seen: dict[int, dict] = {}
    lines: list[str] = []

    def hook(step, loss):
        seen[step] = {k: v.clone() for k, v in m.state_dict().items()}  # the state this step starts from
        return loss * float("nan") if step == 7 else loss

    res = train_slice(m, opt, data, epochs=3, batch_size=32, ckpt=ck, step0=0, slice_id=1,
                      loss_hook=hook, log=lines.append)
    assert res.rollbacks == [{"step": 7, "rolled_back_to": 6, "lr": 0.05}]
    assert lines == ["step 7: non-finite loss, rolled back to step 6, lr → 0.05"] == res.log
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05) and res.lr == pytest.approx(0.05)
    steps = steps_of(ck)
    assert 7 not in steps and steps == [0, 1, 2, 3, 4, 5, 6, 8, 9]
    # step 8 trained from the restored step-6 checkpoint (its LC reconstruction), and the
    # optimizer state saved at step 8 holds the reduced lr
    at6 = ck.restore(6)["model"]
    for k, v in seen[8].items():
        assert torch.equal(v, at6[k]), k
    assert ck.restore(8)["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.05)
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_a_second_failure_before_any_progress_rolls_back_one_checkpoint_further(tmp_path):
    """A head that fails again at once is suspect (finite but exploded): go one further back."""
    data = make_data()
    m = make_model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    ck = rb.Checkpointer(rb.open_store(tmp_path.as_uri()), "r", "main", save_rng=False)
    ck.save(0, m, opt)
    res = train_slice(m, opt, data, epochs=3, batch_size=32, ckpt=ck, step0=0, slice_id=1,
                      loss_hook=lambda s, l: l * float("nan") if s in (7, 8) else l)
    assert res.rollbacks == [{"step": 7, "rolled_back_to": 6, "lr": 0.05}, {"step": 8, "rolled_back_to": 5, "lr": 0.025}]
    assert steps_of(ck) == [0, 1, 2, 3, 4, 5, 6, 9]


def test_nan_on_a_fork_rolls_back_to_the_fork_point_in_the_parent(tmp_path):
    """A fork holds no copy of its fork point: the rollback restores it through the lineage."""
    data = make_data()
    m = make_model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    store = rb.open_store(tmp_path.as_uri())
    main = rb.Checkpointer(store, "r", "main", save_rng=False)
    main.save(0, m, opt)
    train_slice(m, opt, data, epochs=1, batch_size=32, ckpt=main, step0=0, slice_id=1)
    at3 = {k: v.clone() for k, v in main.restore(3)["model"].items()}
    fork = main.fork("alt", step=3)
    seen = {}

    def hook(step, loss):
        seen[step] = {k: v.clone() for k, v in m.state_dict().items()}
        return loss * float("nan") if step == 4 else loss

    load_checkpoint(m, fork.restore(), opt)
    res = train_slice(m, opt, data, epochs=1, batch_size=32, ckpt=fork, step0=3, slice_id=2, loss_hook=hook)
    assert res.rollbacks == [{"step": 4, "rolled_back_to": 3, "lr": 0.05}]
    for k, v in seen[5].items():
        assert torch.equal(v, at3[k]), k
    log = fork.log()
    assert [(r["kind"], r["step"]) for r in log[:2]] == [("fork", 3), ("delta", 5)] and log[-1]["step"] == 6
    assert steps_of(main) == [0, 1, 2, 3]  # the parent is untouched


def test_a_fenced_writer_cannot_train_into_the_branch(tmp_path):
    """Once a newer writer registered (a restarted worker), the old one's next checkpoint is
    refused: training stops with FencedError instead of forking the history."""
    data = make_data()
    m = make_model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    store = rb.open_store(tmp_path.as_uri())
    old = rb.Checkpointer(store, "r", "main", save_rng=False)
    old.save(0, m, opt)
    old.flush()
    newer = rb.Checkpointer(store, "r", "main", save_rng=False)
    assert newer.acquire() > old.epoch
    with pytest.raises(FencedError, match="fenced"):
        train_slice(m, opt, data, epochs=1, batch_size=32, ckpt=old, step0=0, slice_id=1)
    assert steps_of(newer) == [0]


def test_nan_rollback_without_a_checkpointer_uses_the_last_good_state():
    data = make_data()
    m = make_model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    seen = {}

    def hook(step, loss):
        seen[step] = {k: v.clone() for k, v in m.state_dict().items()}
        return loss + float("inf") if step == 3 else loss

    res = train_slice(m, opt, data, epochs=1, batch_size=16, ckpt=None, step0=0, slice_id=1, loss_hook=hook, lr_factor=0.25)
    assert res.rollbacks == [{"step": 3, "rolled_back_to": 2, "lr": 0.025}]
    for k, v in seen[4].items():
        assert torch.equal(v, seen[3][k])  # step 3 never changed the model


def test_nan_policy_raise_and_rollback_limit(tmp_path):
    data = make_data()
    m = make_model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.raises(NonFiniteLossError, match="step 2"):
        train_slice(m, opt, data, epochs=1, batch_size=16, ckpt=None, step0=0, slice_id=1,
                    loss_hook=lambda s, l: l * float("nan") if s == 2 else l, nan_policy="raise")
    with pytest.raises(NonFiniteLossError, match="after 2 rollbacks"):
        train_slice(m, opt, data, epochs=1, batch_size=16, ckpt=None, step0=0, slice_id=1,
                    loss_hook=lambda s, l: l * float("nan"), max_rollbacks=2)


def test_early_stopping_stops_or_rewinds_to_the_best_epoch(tmp_path):
    data = make_data()
    scores = iter([0.5, 0.9, 0.6, 0.4, 0.95, 0.99])
    m = make_model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    res = train_slice(m, opt, data, epochs=6, batch_size=48, ckpt=None, step0=0, slice_id=1,
                      eval_fn=lambda model: next(scores), patience=2)
    assert res.stopped_early and res.epochs == 4 and res.best_epoch == 2 and res.steps == 8
    assert res.metric_history == [0.5, 0.9, 0.6, 0.4]

    # restore_best: the best epoch's model becomes one more checkpoint, the slice end
    states = []

    def score(model):
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        return [0.5, 0.9, 0.6, 0.4][len(states) - 1]

    m = make_model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    ck = rb.Checkpointer(rb.open_store(tmp_path.as_uri()), "r", "main", save_rng=False)
    ck.save(0, m, opt)
    res = train_slice(m, opt, data, epochs=6, batch_size=48, ckpt=ck, step0=0, slice_id=1,
                      eval_fn=score, patience=2, restore_best=True)
    assert res.restored_best and res.last_step == 9
    for k, v in m.state_dict().items():
        assert torch.equal(v, states[1][k])
    log = ck.log()
    assert log[-1]["step"] == 9 and log[-1]["tags"] == ["slice-end:1"]
    assert log[-2]["step"] == 8 and log[-2]["tags"] == []


def test_bad_arguments_are_one_line_errors():
    m = make_model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    data = make_data(8)
    for kwargs, msg in [
        ({"epochs": 0}, "epochs"),
        ({"nan_policy": "ignore"}, "nan_policy"),
        ({"lr_factor": 2.0}, "lr_factor"),
        ({"patience": 2}, "patience needs an eval_fn"),
        ({"lora": True}, "no Delta-LoRA"),
        ({"settle": -1}, "settle"),
    ]:
        args = {"epochs": 1, "batch_size": 4, "ckpt": None, "step0": 0, "slice_id": 1, **kwargs}
        with pytest.raises(RaybranchError, match=msg):
            train_slice(m, opt, data, **args)
    with pytest.raises(RaybranchError, match="as many images as labels"):
        train_slice(m, opt, (data[0], data[1][:3]), epochs=1, batch_size=4, ckpt=None, step0=0, slice_id=1)


def test_loss_is_cross_entropy_of_the_batch():
    """A sanity anchor for the loop's objective: one SGD step equals a hand-written one."""
    data = make_data(16)
    a, b = make_model(), make_model()
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1)
    train_slice(a, opt_a, data, epochs=1, batch_size=16, ckpt=None, step0=0, slice_id=1, seed=4)
    order = batch_order(16, 4, 1, 0)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1)
    F.cross_entropy(b(data[0][order]), data[1][order]).backward()
    opt_b.step()
    for k, v in a.state_dict().items():
        assert torch.allclose(v, b.state_dict()[k], atol=1e-6), k


def test_gradient_clipping_bounds_every_step():
    data = make_data()
    m = make_model()
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    before: dict[int, list[torch.Tensor]] = {}

    def hook(step, loss):
        before[step] = [p.detach().clone() for p in m.parameters()]
        return loss * 100.0  # large gradients: clipping must bound them

    train_slice(m, opt, data, epochs=1, batch_size=32, ckpt=None, step0=0, slice_id=1, loss_hook=hook, clip_grad=0.01)
    after = [p.detach() for p in m.parameters()]
    last = max(before)
    moved = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(after, before[last])))
    assert 0 < moved <= 0.01 * 1.0 + 1e-6  # one SGD step of lr 1 with ‖g‖ ≤ 0.01


def test_a_rollback_keeps_each_parameter_groups_own_lr(tmp_path):
    data = make_data()
    m = make_model()
    params = list(m.parameters())
    opt = torch.optim.SGD([{"params": params[:2], "lr": 0.1}, {"params": params[2:], "lr": 0.4}])
    ck = rb.Checkpointer(rb.open_store(tmp_path.as_uri()), "r", "main", save_rng=False)
    ck.save(0, m, opt)
    res = train_slice(m, opt, data, epochs=2, batch_size=32, ckpt=ck, step0=0, slice_id=1,
                      loss_hook=lambda step, loss: loss * float("nan") if step == 4 else loss)
    assert len(res.rollbacks) == 1
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.05, 0.2])  # each halved, not set to group 0's
