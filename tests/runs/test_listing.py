"""raybranch.runs.listing on a real file:// store written by the Checkpointer: runs, the branch
tree (forks of forks, a renamed parent, slice ends through fork points, links), bytes."""
from __future__ import annotations

import os

import pytest
import torch

import raybranch as rb
from raybranch.errors import NotFoundError
from raybranch.ledger import create_branch
from raybranch.ledger.lineage import Lineage
from raybranch.ledger.refs import delete_branch, live_branch_id, move_link, rename_branch
from raybranch.runs.listing import branch_tree, format_runs, format_tree, human_bytes, list_runs

torch.set_num_threads(1)


class _Model:
    """A linear layer nudged a little before every save."""

    def __init__(self, seed: int = 0):
        torch.manual_seed(seed)
        self.m = torch.nn.Linear(8, 4)

    def state(self) -> dict:
        with torch.no_grad():
            for p in self.m.parameters():
                p.add_(0.01 * torch.randn_like(p))
        return self.m.state_dict()


def _disk_bytes(root: str) -> int:
    """Bytes of the files under ``root`` that a store lists (not dot files such as ref locks)."""
    total = 0
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if not x.startswith(".")]
        total += sum(os.path.getsize(os.path.join(d, f)) for f in files if not f.startswith("."))
    return total


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)


@pytest.fixture
def store(tmp_path):
    """Run "r": main 0..6 (branch-point at 0, slice ends 1, 2, 3 at 2, 4, 6); clean forked from main
    at 0 (1 tagged eval, slice ends 1, 2 at 2, 3), then renamed clean2; another forked from clean at 3
    (slice end 4 at 5); alt forked from main at 4, nothing saved; link served → clean@3 (moved before the rename). Run "s": main 0..1 and the
    non-ledger things a run directory holds (run.json, slices/, reports/, _ray/), plus an empty branch."""
    root = tmp_path / "store"
    st = rb.open_store("file://" + str(root))
    model = _Model()
    main = rb.Checkpointer(st, run="r", branch="main", background=False)
    tags = {0: ["branch-point"], 2: ["slice-end:1"], 4: ["slice-end:2"], 6: ["slice-end:3"]}
    for s in range(7):
        main.save(s, model.state(), tags=tags.get(s))
    clean = main.fork("clean", step=0)
    ctags = {1: ["eval"], 2: ["slice-end:1"], 3: ["slice-end:2"]}
    for s in range(1, 4):
        clean.save(s, model.state(), tags=ctags.get(s))
    another = clean.fork("another", step=3)
    another.save(4, model.state())
    another.save(5, model.state(), tags=["slice-end:4"])
    alt = main.fork("alt", step=4)  # no checkpoints of its own
    for ck in (main, clean, another, alt):
        ck.close()
    move_link(st, "r", "served", {"branch": "clean", "branch_id": live_branch_id(st, "r", "clean"), "step": 3})
    rename_branch(st, "r", "clean", "clean2")

    s_main = rb.Checkpointer(st, run="s", branch="main", background=False)
    s_main.save(0, model.state())
    s_main.save(1, model.state())
    s_main.close()
    create_branch(st, "s", "empty")
    _write(str(root / "s" / "run.json"), b'{"name": "s"}')
    _write(str(root / "s" / "slices" / "1.json"), b"{}" * 50)
    _write(str(root / "s" / "reports" / "report.md"), b"# report\n" * 20)
    _write(str(root / "s" / "_ray" / "trial" / "result.json"), b"{}" * 300)
    _write(str(root / "_ray" / "session" / "x.json"), b"{}")  # top-level, not a run
    return st, str(root)


def test_empty_store_lists_no_runs(tmp_path):
    st = rb.open_store("file://" + str(tmp_path / "empty"))
    assert list_runs(st) == []
    assert format_runs([]) == "no runs"
    with pytest.raises(NotFoundError, match="run 'r' does not exist .*runs: none"):
        branch_tree(st, "r")


def test_list_runs(store):
    st, root = store
    recs = list_runs(st)
    assert [r["run"] for r in recs] == ["r", "s"]
    r, s = recs
    assert r["branches"] == ["alt", "another", "clean2", "main"]
    assert r["steps"] == 7 + 3 + 2  # each branch's own checkpoints; the shared history once
    assert s["branches"] == ["empty", "main"]
    assert s["steps"] == 2
    assert r["has_run_json"] is False and s["has_run_json"] is True
    bid = live_branch_id(st, "r", "clean2")
    assert r["links"] == {"served": {"branch": "clean", "branch_id": bid, "step": 3}}  # the name when it moved
    assert s["links"] == {}
    for rec in recs:  # every byte under the run's directory, the non-ledger things included
        assert rec["bytes"] == _disk_bytes(os.path.join(root, rec["run"])) == st.total_bytes(rec["run"]) > 0
    assert s["bytes"] - _disk_bytes(os.path.join(root, "s", "branches")) > 600 + 180 + 100

    text = format_runs(recs).splitlines()
    assert len(text) == 3 and text[0].split() == ["run", "branches", "steps", "bytes", "links"]
    assert text[1].split()[:3] == ["r", "4", "12"] and "served→clean@3" in text[1] and text[1].endswith("(no run.json)")
    assert text[2].split()[:3] == ["s", "2", "2"] and text[2].endswith(" -")


def test_branch_tree(store):
    st, root = store
    recs = branch_tree(st, "r")
    assert [r["branch"] for r in recs] == ["main", "alt", "clean2", "another"]  # depth first, siblings by name
    main = recs[0]
    ids = {r["branch"]: live_branch_id(st, "r", r["branch"]) for r in recs}
    assert {r["branch"]: r["branch_id"] for r in recs} == ids
    assert ids["clean2"].startswith("clean.")  # a branch id keeps the name at birth
    assert [r["parent"] for r in recs] == [
        None, {"branch": "main", "step": 4}, {"branch": "main", "step": 0}, {"branch": "clean2", "step": 3}]
    assert [r["head"] for r in recs] == [6, 4, 3, 5]  # a fork with no checkpoints of its own: the fork step
    assert [r["checkpoints"] for r in recs] == [7, 0, 3, 2]
    assert [r["slices"] for r in recs] == [[1, 2, 3], [1, 2], [1, 2], [1, 2, 4]]
    assert [r["own_slices"] for r in recs] == [[1, 2, 3], [], [1, 2], [4]]
    assert [r["tags"] for r in recs] == [["branch-point"], [], ["eval"], []]
    assert [r["links"] for r in recs] == [[], [], ["served"], []]  # by branch id: the link predates the rename
    for r in recs:  # at least its own commits and branch.json, and never the whole run
        assert _disk_bytes(os.path.join(root, "r", "branches", r["branch_id"])) < r["bytes"] < list_runs(st)[0]["bytes"]
    assert sum(r["bytes"] for r in recs) <= list_runs(st)[0]["bytes"]
    # the fork record keeps the parent's old name; the tree shows its live one
    assert Lineage(st, "r", "another").fork["branch"] == "clean"

    text = format_tree(recs).splitlines()
    assert text[0].startswith("main ") and "head      6" in text[0] and "slices 1,2,3 " in text[0] and "←" not in text[0]
    assert text[1].startswith("  └ alt @4 ") and "head      4" in text[1] and "    0 ckpts" in text[1]
    assert text[2].startswith("  └ clean2 @0 ") and "slices 1,2 " in text[2] and text[2].endswith("← served")
    assert text[3].startswith("    └ another @3 ") and "head      5" in text[3] and "slices 1,2,4 " in text[3]
    assert human_bytes(main["bytes"]) in text[0]


def test_branch_tree_of_a_run_with_extra_files_and_an_empty_branch(store):
    st, _ = store
    recs = branch_tree(st, "s")
    assert [(r["branch"], r["parent"], r["head"], r["checkpoints"], r["slices"], r["tags"]) for r in recs] == [
        ("empty", None, None, 0, [], []), ("main", None, 1, 2, [], [])]
    assert "head      -" in format_tree(recs).splitlines()[0]


def test_unknown_run_names_the_runs(store):
    st, _ = store
    with pytest.raises(NotFoundError) as ei:
        branch_tree(st, "nope")
    assert "'nope'" in str(ei.value) and "(runs: r, s)" in str(ei.value) and "\n" not in str(ei.value)


def test_a_deleted_parent_leaves_a_root_named_by_its_parents_id(tmp_path):
    st = rb.open_store("file://" + str(tmp_path / "store"))
    model = _Model(1)
    main = rb.Checkpointer(st, run="d", branch="main", background=False)
    main.save(0, model.state(), tags=["slice-end:1"])
    main.save(1, model.state())
    side = main.fork("side", step=0)
    side.save(1, model.state())
    main.close()
    side.close()
    main_id = delete_branch(st, "d", "main")
    recs = branch_tree(st, "d")
    assert [(r["branch"], r["parent"], r["slices"], r["own_slices"]) for r in recs] == [
        ("side", {"branch": main_id, "step": 0}, [1], [])]
    assert list_runs(st)[0]["steps"] == 1  # the deleted branch's checkpoints are not counted
    assert format_tree(recs).startswith(f"side @{main_id}/0 ")


def test_human_bytes():
    assert [human_bytes(n) for n in (0, 812, 1024, 1258291, 5 * 1024 ** 3)] == ["0 B", "812 B", "1.0 KiB", "1.2 MiB", "5.0 GiB"]
