"""Branches and slices (report §7): the pieces the run operations (:mod:`raybranch.runs`) build on.

- :mod:`.slices`: slice-end checkpoints along a branch's lineage (a
  :class:`raybranch.ledger.Lineage`), ``step_before_slice`` (light: the CLI's
  ``restore --before-slice`` imports only this);
- :mod:`.data`: a run's data rebuilt from its config (warm-up, validation, slices with the
  poisoned one, test) and the progress ``Hooks``;
- :mod:`.accounting`: the ``torch.save`` baseline and the bytes charged to each branch;
- :mod:`.metrics`: the report's figures, targets and summary lines;
- :mod:`.report`: ``write_report`` — report.json, report.md, PNG plots.
"""
from .slices import BRANCH_POINT_TAG, branch_point_step, lineage, slice_end_tag, slice_ends, step_before_slice

__all__ = ["BRANCH_POINT_TAG", "branch_point_step", "lineage", "slice_end_tag", "slice_ends", "step_before_slice"]
