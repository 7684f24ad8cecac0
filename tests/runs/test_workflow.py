"""A run that lives in the store, driven by the CLI in this process (file:// store): init, slices
1–4 arriving one by one, slice 3 marked poisoned after slice 4 has trained, quarantine; the
replay equals the oracle bit for bit, the reports sit in the store; bad input changes nothing;
a replay killed in the middle resumes; a slice from image files."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import raybranch as rb
from raybranch.branches.slices import slice_ends
from raybranch.cli.main import main as cli
from raybranch.export import read_safetensors
from raybranch.ledger.lineage import Lineage
from raybranch.ledger.refs import read_link
from raybranch.ledger.verify import verify_store
from raybranch.runs.context import RunContext
from raybranch.runs.evaluate import branch_point_model, excluded_bytes
from raybranch.runs.spec import RunSpec, slice_key

TINY = ["epochs=2", "patience=0", "branch_point_max_epochs=3", "mechanisms=[lc]"]


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = cli(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def objects(store) -> dict[str, int]:
    return {i.rel: i.size for i in store.list("", recursive=True)}


def test_workflow_end_to_end_in_process(tmp_path, capsys):
    uri = (tmp_path / "store").as_uri()
    s = ["--store", uri, "--run", "r"]
    assert run_cli(capsys, "runs", "--store", uri, "--json")[:2] == (0, "[]\n")
    assert run_cli(capsys, "init", *s, *TINY)[0] == 0
    for k in (1, 2, 3, 4):
        rc, out, _ = run_cli(capsys, "train", *s, "--slice", str(k))
        assert rc == 0 and f"slice {k} of r: main trained slice(s) {k}" in out
        if k != 3:
            assert run_cli(capsys, "mark", *s, "--slice", str(k), "--verified")[0] == 0
    store = rb.open_store(uri)
    assert sorted(slice_ends(Lineage(store, "r", "clean"))) == [1, 2]  # clean waits at slice 3, undecided

    # bad input: one line, exit 2, nothing changed
    before = objects(store)
    for argv, msg in [
        (["train", "--store", uri, "--run", "nope", "--slice", "1"], "run 'nope' has no run.json"),
        (["train", *s, "--slice", "9"], "slice 9 is out of range"),
        (["train", *s, "--slice", "0"], "not a slice number"),
        (["mark", *s, "--slice", "2", "--poisoned"], "already marked verified"),
        (["mark", *s, "--slice", "7", "--verified"], "slice 7 is out of range"),
        (["quarantine", *s, "--slice", "1"], "already marked verified"),
        (["branches", "--store", uri, "--run", "nope"], "nope"),
    ]:
        rc, _, err = run_cli(capsys, *argv)
        assert rc == 2 and msg in err and err.count("\n") == 1, (argv, err)
    assert objects(store) == before

    rc, out, _ = run_cli(capsys, "mark", *s, "--slice", "3", "--poisoned", "--json")
    assert rc == 0 and json.loads(out)["trained"] == {"clean": [4]}  # clean skips 3 and catches up
    export = tmp_path / "served.safetensors"
    rc, out, _ = run_cli(capsys, "quarantine", *s, "--slice", "3", "--export", str(export), "--out", str(tmp_path / "rep"))
    assert rc == 0 and "instant recovery: served → r/clean/" in out and "kept as main-poisoned-3" in out

    # instant recovery: served is clean's head, exported; the replay is main, the old main kept
    clean_head = Lineage(store, "r", "clean").head_step
    assert read_link(store, "r", "served").doc["target"]["step"] == clean_head
    served = read_safetensors(export.read_bytes())
    want = rb.Reader(store, "r").restore("clean")["model"]
    assert all(torch.equal(served[k], want[k]) for k in want)
    assert sorted(slice_ends(Lineage(store, "r", "main"))) == [1, 2, 4]
    assert sorted(slice_ends(Lineage(store, "r", "main-poisoned-3"))) == [1, 2, 3, 4]
    # the replay is the oracle bit for bit: retrained from the branch point without slice 3
    ctx = RunContext(store, "r")
    bp, _ = branch_point_model(ctx)
    oracle = ctx.with_lora(bp) if ctx.spec.lora else bp
    opt = ctx.optimizer(oracle)
    step = 0
    for k in (1, 2, 4):
        step = ctx.train(oracle, opt, k, None, step).last_step
    replay = rb.Reader(store, "r").restore("main")["model"]
    assert all(torch.equal(replay[k], v) for k, v in oracle.state_dict().items())

    # the report: in the store and in --out; `report` writes the same files again
    doc = json.loads((tmp_path / "rep" / "report.json").read_text())
    rec = doc["mechanisms"]["lc"]["recovery"]
    br = doc["mechanisms"]["lc"]["branches"]
    assert rec["acc_replay"] == rec["acc_oracle"] and rec["asr_after"] <= br["clean"]["attack_success_rate"] + 0.02
    assert rec["instant_seconds"] < rec["retrain_from_scratch_seconds"]
    assert br["replay"]["slices_trained"] == [4] and br["clean"]["slices_trained"] == [1, 2, 4]
    stored = {i.base_name for i in store.list("r/reports")}
    assert {"report.json", "report.md", "accuracy_per_slice.png", "bytes_per_branch.png"} <= stored
    assert any(n.startswith("served-clean-") for n in stored)
    assert run_cli(capsys, "report", *s, "--out", str(tmp_path / "again"))[0] == 0
    assert (tmp_path / "again" / "report.json").read_bytes() == store.read_bytes("r/reports/report.json")
    # report bytes are not checkpoint bytes
    t = doc["mechanisms"]["lc"]["run_total"]
    assert t["excluded_bytes"] >= store.total_bytes("r/reports") > 0
    assert t["bytes_stored"] == store.total_bytes("r") - excluded_bytes(RunContext(store, "r"))  # the ledger alone

    # listings
    rc, out, _ = run_cli(capsys, "branches", *s, "--json")
    tree = {b["branch"]: b for b in json.loads(out)}
    assert set(tree) == {"main", "clean", "main-poisoned-3"}
    assert tree["main"]["parent"] == {"branch": "main-poisoned-3", "step": rec["replay_from_step"]}
    assert tree["clean"]["links"] == ["served"]
    rc, out, _ = run_cli(capsys, "runs", "--store", uri, "--json")
    assert [r["run"] for r in json.loads(out)] == ["r"]

    # a slice from image files: slice 5 arrives with --data, its bytes kept and hashed in the store
    folder = tmp_path / "slice5"
    rng = np.random.default_rng(0)
    from PIL import Image

    for c in ("1", "7"):
        (folder / c).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(folder / c / f"{i}.png")
    assert run_cli(capsys, "train", *s, "--slice", "6", "--data", str(folder))[0] == 2  # the next slice is 5
    rc, out, _ = run_cli(capsys, "train", *s, "--slice", "5", "--data", str(folder))
    assert rc == 0 and "main trained slice(s) 5" in out
    rec5 = store.read_json(slice_key("r", 5))
    assert rec5["source"] == "files" and rec5["images"] == 24
    pixels, labels = RunSpec.load(store, "r").load_file_slice(store, 5, rec5)
    assert pixels.shape == (24, 1, 28, 28) and sorted(set(labels.tolist())) == [1, 7]
    rc, out, _ = run_cli(capsys, "mark", *s, "--slice", "5", "--verified")
    assert rc == 0 and "clean trained slice(s) 5" in out
    assert read_link(store, "r", "served").doc["target"]["step"] == Lineage(store, "r", "clean").head_step  # served follows clean
    assert verify_store(store, "r").problems == []


KILL_REPLAY = """
import os, signal, sys, torch
torch.set_num_threads(1)
from raybranch.branches.data import Hooks
from raybranch.runs.ops import quarantine
from raybranch.store.store import open_store
at = int(sys.argv[2])
def step(s):
    if s == at:
        os.kill(os.getpid(), signal.SIGKILL)
quarantine(open_store(sys.argv[1]), "q", 2, hooks=Hooks(step=step))
"""


def test_replay_killed_in_the_middle_resumes(tmp_path, capsys):
    uri = (tmp_path / "store").as_uri()
    s = ["--store", uri, "--run", "q"]
    assert run_cli(capsys, "init", *s, *TINY, "split=40/30/30", "poison_slice=2", "flush_every=4")[0] == 0
    for k in (1, 2, 3):
        assert run_cli(capsys, "train", *s, "--slice", str(k))[0] == 0
    store = rb.open_store(uri)
    main_ends = slice_ends(Lineage(store, "q", "main"))
    kill_at = main_ends[1] + (main_ends[3] - main_ends[2]) // 2 + 2  # in the replay of slice 3
    proc = subprocess.run([sys.executable, "-c", KILL_REPLAY, uri, str(kill_at)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    # killed mid-replay: the replay branch exists, main is still the old main, served moved already
    replay = Lineage(store, "q", "replay-2")
    assert main_ends[1] < replay.head_step < kill_at and 3 not in slice_ends(replay)
    assert read_link(store, "q", "served").doc["target"]["branch"] == "clean"
    rc, out, _ = run_cli(capsys, "quarantine", *s, "--slice", "2", "--no-report")
    assert rc == 0 and "it is now main" in out
    lin = Lineage(store, "q", "main")
    steps = [e["step"] for e in lin.all_entries()]
    assert steps == list(range(steps[0], steps[-1] + 1))  # no gap, no duplicate across the kill
    assert sorted(slice_ends(lin)) == [1, 3]
    assert verify_store(store, "q").problems == []
    # running it once more changes nothing
    before = objects(store)
    assert run_cli(capsys, "quarantine", *s, "--slice", "2", "--no-report")[0] == 0
    assert {k: v for k, v in objects(store).items() if "/records/" not in k} == {k: v for k, v in before.items() if "/records/" not in k}


def test_init_from_a_model_file_and_a_different_config_is_refused(tmp_path, capsys):
    uri = (tmp_path / "store").as_uri()
    from raybranch.models import build_model

    torch.manual_seed(3)
    model = build_model("lenet5", 10, 1, 28)
    path = tmp_path / "start.pt"
    torch.save(model.state_dict(), path)
    s = ["--store", uri, "--run", "f"]
    assert run_cli(capsys, "init", *s, *TINY, "--from", str(path))[0] == 0
    got = rb.Reader(rb.open_store(uri), "f").restore("main", 0)["model"]
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())
    assert run_cli(capsys, "init", *s, *TINY, "--from", str(path))[0] == 0  # the same again: resumes, nothing new
    rc, _, err = run_cli(capsys, "init", *s, *TINY, "lr=0.2")
    assert rc == 2 and "already exists with another" in err
    rc, _, err = run_cli(capsys, "init", "--store", uri, "--run", "g", "--from", str(tmp_path / "missing.pt"))
    assert rc == 2 and "--from" in err
    # slices arrive in order; nothing arrived can be marked or quarantined; nothing is written
    store = rb.open_store(uri)
    before = objects(store)
    for argv, msg in [(["train", *s, "--slice", "2"], "cannot arrive before slice 1"),
                      (["mark", *s, "--slice", "1", "--poisoned"], "has not arrived yet"),
                      (["quarantine", *s, "--slice", "1"], "has not trained slice 1")]:
        rc, _, err = run_cli(capsys, *argv)
        assert rc == 2 and msg in err, (argv, err)
    assert objects(store) == before
