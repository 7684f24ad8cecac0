"""A store that fails at the wrong moment must not break a branch's chain."""
import pytest
import torch

import raybranch as rb
from raybranch.checkpoint.verify import verify_run
from raybranch.errors import StoreError
from raybranch.store.store import Store
from raybranch.store.uri import parse_uri


class FlakyStore(Store):
    """A real file store whose chosen operations raise StoreError a set number of times."""

    def __init__(self, uri, fail_reads=0, fail_deletes=0):
        super().__init__(parse_uri(uri))
        self.fail_reads, self.fail_deletes = fail_reads, fail_deletes

    def read_bytes(self, rel):
        if self.fail_reads:
            self.fail_reads -= 1
            raise StoreError(f"injected read failure of {rel}")
        return super().read_bytes(rel)

    def delete(self, rel):
        if self.fail_deletes:
            self.fail_deletes -= 1
            raise StoreError(f"injected delete failure of {rel}")
        return super().delete(rel)


def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Linear(16, 8)


def test_failed_head_read_is_retried_not_a_new_chain(file_uri):
    m = _model(0)
    ck = rb.Checkpointer(file_uri, "r", "main")
    for s in range(3):
        with torch.no_grad():
            m.weight.add_(0.01)
        ck.save(s, m)
    flaky = FlakyStore(file_uri, fail_reads=1)
    resumed = rb.Checkpointer(flaky, "r", "main")
    with pytest.raises(StoreError):
        resumed.save(3, m)
    resumed.save(3, m)  # the head is read again, not forgotten
    rec = resumed.log()[-1]
    assert rec["kind"] == "delta" and rec["parent"] == ["main", 2]


def test_failed_compaction_delete_keeps_the_save_and_the_branch(file_uri):
    m = _model(1)
    flaky = FlakyStore(file_uri, fail_deletes=1)
    ck = rb.Checkpointer(flaky, "r", "main", segment_size=3)
    with pytest.warns(UserWarning, match="compaction"):
        for s in range(8):
            with torch.no_grad():
                m.weight.add_(0.01 * (s + 1))
            assert ck.save(s, m) == f"r/main/{s}"
    ck.close()
    assert [r["step"] for r in ck.log()] == list(range(8))
    problems, checked = verify_run(rb.open_store(file_uri), "r")
    assert problems == [] and checked == 8
    fresh = rb.Reader(rb.open_store(file_uri), "r")
    for s in range(8):
        assert torch.equal(fresh.restore("main", s)["model"]["weight"], ck.restore(s)["model"]["weight"])
