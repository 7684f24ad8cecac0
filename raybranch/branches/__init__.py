"""Branches and slices (report §7).

- :mod:`.slices`: slice-end checkpoints along a branch's lineage (a
  :class:`raybranch.ledger.Lineage`), ``step_before_slice`` (light: the CLI's
  ``restore --before-slice`` imports only this);
- :mod:`.experiment`: ``Experiment``, ``run_experiment`` — branch point, main and clean
  branches, a poisoned slice, quarantine (instant recovery, replay), the oracle; its inputs
  (``ExperimentConfig``, ``Hooks``, ``prepare_data``) are in :mod:`.config`, its byte accounting
  (``attribute_bytes``, ``torch_save_bytes``) in :mod:`.accounting`;
- :mod:`.report`: ``write_report`` — report.json, report.md, PNG plots.
"""
from .slices import BRANCH_POINT_TAG, branch_point_step, lineage, slice_end_tag, slice_ends, step_before_slice

__all__ = ["BRANCH_POINT_TAG", "branch_point_step", "lineage", "slice_end_tag", "slice_ends", "step_before_slice"]
