"""The store's metadata, format v2 (docs/FORMAT.md): commits, fencing, refs, pages, retention.

Ray-free and codec-free: it moves JSON documents and names blobs; what a step's rows mean is the
checkpoint layer's business.
"""
from .branch import BranchLog, BranchWriter, PageInfo
from .lineage import Lineage, create_branch, open_at
from .pages import Sealer, seal_page

__all__ = ["BranchLog", "BranchWriter", "Lineage", "PageInfo", "Sealer", "create_branch", "open_at", "seal_page"]
