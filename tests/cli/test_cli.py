"""The raybranch command line, run as a user runs it (a subprocess), against real stores."""
import contextlib
import io
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import raybranch as rb
from raybranch.cli.main import main


def cli(*args):
    """In-process: ``main(argv)`` with stdout/stderr captured (one subprocess test below)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse: --help, usage errors
            code = exc.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def test_entry_point_runs_as_a_command(tmp_path):
    out = subprocess.run([sys.executable, "-m", "raybranch.cli.main", "log", "--store", "ftp://x", "--run", "r"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().startswith("raybranch: error:")


def _populate(uri):
    """main: 10 checkpoints (pages of 4 commits), the last the end of slice 1; clean: a fork at 5."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ck = rb.Checkpointer(uri, "exp1", "main", segment_size=4, flush_every=1)  # one commit per checkpoint
    x, y = torch.randn(64, 12), torch.randint(0, 3, (64,))
    for step in range(10):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ck.save(step, model, slices=[1] if step == 9 else None, tags=["slice-end:1"] if step == 9 else None)
    ck.fork("clean", step=5)
    return uri, ck


@pytest.fixture
def populated(file_uri):
    return _populate(file_uri)


@pytest.fixture(params=["file_uri", "s3_uri"])
def populated_both(request):
    """The same run in a local store and in the real S3 server."""
    return _populate(request.getfixturevalue(request.param))


def test_log_table_and_json(populated_both):
    uri, ck = populated_both
    out = cli("log", "--store", uri, "--run", "exp1", "--branch", "main")
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.strip().splitlines()) == 1 + 10
    recs = json.loads(cli("log", "--store", uri, "--run", "exp1", "--json").stdout)
    assert sorted({r["branch"] for r in recs}) == ["clean", "main"]
    assert [r["step"] for r in recs if r["branch"] == "main"] == list(range(10))
    main_recs = [r for r in recs if r["branch"] == "main"]
    assert main_recs[0]["kind"] == "snapshot" and {r["kind"] for r in main_recs[1:] if not r["tags"]} == {"delta"}
    assert all(r["kind"] == "key" for r in main_recs[1:] if r["tags"])  # tagged steps are exact key frames
    # a fork copies nothing: clean's log is its fork point, a record of main's step 5
    (fork,) = [r for r in recs if r["branch"] == "clean"]
    assert fork["kind"] == "fork" and fork["step"] == 5 and fork["parent"] == ["main", 5] and fork["bytes"] == 0
    assert fork["id"] == "exp1/clean/5"
    # each record names its commit; pages of 4 commits (commit 0 creates the branch) are sealed
    # and their steps compacted into one segment blob, the open page's are not
    assert [r["commit"] for r in main_recs] == list(range(1, 11))
    assert [r["compacted"] for r in main_recs] == [True] * 7 + [False] * 3
    assert main_recs[0]["parent"] is None and main_recs[3]["parent"] == ["main", 2]
    assert all(r["bytes"] > 0 for r in main_recs) and main_recs[9]["tags"] == ["slice-end:1"]
    table = cli("log", "--store", uri, "--run", "exp1", "--branch", "clean").stdout.splitlines()
    assert len(table) == 2 and table[1].split()[:4] == ["clean", "5", "fork", "main/5"]
    # --tail N: the newest N records, as the full log has them (crossing into a sealed page)
    tail = json.loads(cli("log", "--store", uri, "--run", "exp1", "--branch", "main", "--tail", "4", "--json").stdout)
    assert tail == main_recs[-4:]


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_restore_writes_the_reconstruction(populated, tmp_path, suffix):
    uri, ck = populated
    path = str(tmp_path / f"m{suffix}")
    out = cli("restore", "--store", uri, "--run", "exp1", "--branch", "main", "--step", "7", "--output", path)
    assert out.returncode == 0, out.stderr
    want = ck.restore(7)["model"]
    got = load_file(path) if suffix == ".safetensors" else torch.load(path, weights_only=True)
    assert list(got) == list(want) if suffix == ".pt" else set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_restore_of_fork_point_equals_parent(populated_both, tmp_path):
    uri, ck = populated_both
    path = str(tmp_path / "c.safetensors")
    assert cli("restore", "--store", uri, "--run", "exp1", "--branch", "clean", "--output", path).returncode == 0
    want = ck.restore(5)["model"]
    got = load_file(path)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_restore_before_slice_follows_the_lineage(populated_both, tmp_path):
    uri, ck = populated_both
    path = str(tmp_path / "b.pt")
    base = ["restore", "--store", uri, "--run", "exp1", "--output", path]
    out = cli(*base, "--branch", "main", "--before-slice", "2")
    assert out.returncode == 0 and "exp1/main/9" in out.stdout, out.stderr  # the end of slice 1
    got, want = torch.load(path, weights_only=True), ck.restore(9)["model"]
    assert all(torch.equal(got[k], want[k]) for k in want)
    # clean forked at 5, before slice 1 ended: slice 1 is the lineage's first checkpoint (main's 0)
    out = cli(*base, "--branch", "clean", "--before-slice", "1")
    assert out.returncode == 0 and "exp1/clean/0" in out.stdout, out.stderr
    out = cli(*base, "--branch", "clean", "--before-slice", "2")
    assert out.returncode == 2 and "has no end of slice 1" in out.stderr


def test_verify_ok(populated):
    uri, _ = populated
    out = cli("verify", "--store", uri)
    assert out.returncode == 0, out.stderr
    # format v2: main's 10 checkpoints; the fork at step 5 is main's, not a checkpoint of its own
    assert "10 checkpoints" in out.stdout and out.stdout.strip().endswith("OK"), out.stdout


@pytest.mark.parametrize(
    "args, words",
    [
        (["log", "--store", "ftp://x/y", "--run", "exp1"], "unsupported store URI scheme"),
        (["log", "--store", "s3://", "--run", "exp1"], "malformed S3 URI"),
        (["log", "--store", "STORE", "--run", "nope"], "run 'nope'"),
        (["log", "--store", "STORE", "--run", "exp1", "--branch", "nope"], "branch 'nope'"),
        (["restore", "--store", "STORE", "--run", "exp1", "--branch", "main", "--step", "99", "--output", "OUT.pt"], "no checkpoint at step 99"),
        (["restore", "--store", "STORE", "--run", "exp1", "--branch", "main", "--output", "OUT.txt"], "--output must end"),
        (["verify", "--store", "STORE", "--run", "nope"], "run 'nope' does not exist"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(populated, tmp_path, args, words):
    uri, _ = populated
    args = [uri if a == "STORE" else str(tmp_path / a) if a.startswith("OUT") else a for a in args]
    out = cli(*args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raybranch: error:") and words in lines[0], out.stderr
    assert not list(tmp_path.glob("OUT*"))


def test_unreachable_endpoint_is_one_line(tmp_path):
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = cli("log", "--store", f"s3://bucket/p?endpoint_override=http://127.0.0.1:{port}&retries=1&connect_timeout=1", "--run", "r")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "cannot reach" in out.stderr


@pytest.mark.parametrize("sub", [[], ["log"], ["restore"], ["verify"], ["bench"], ["demo"]])
def test_help(sub):
    out = cli(*sub, "--help")
    assert out.returncode == 0 and "usage: raybranch" in out.stdout


def test_bench_codec_json_small():
    out = cli("bench", "codec", "--steps", "30", "--models", "lenet5", "--no-large", "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)["models"]["lenet5"]["rows"]
    assert {"baseline", "default", "residual 0.5", "key_every 64"} <= set(rows)
    d = rows["default"]
    assert d["residual_max"] <= 0.95 * (1 + 1e-5) and d["restore_bit_exact"] and d["ratio"] > 1
    assert rows["residual 0.5"]["residual_max"] <= 0.5 * (1 + 1e-5) and rows["baseline"]["ratio_vs_baseline"] == 1.0
    bad = cli("bench", "codec", "--models", "nope")
    assert bad.returncode != 0 and "unknown nope" in bad.stderr


