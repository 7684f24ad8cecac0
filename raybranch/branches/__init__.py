"""Branches and slices (report §7).

- :mod:`.slices`: slice-end checkpoints in the store, ``step_before_slice`` (light: the CLI's
  ``restore --before-slice`` imports only this);
- :mod:`.experiment`: ``ExperimentConfig``, ``Experiment``, ``run_experiment`` — branch point,
  main and clean branches, a poisoned slice, quarantine (instant recovery, replay), the oracle;
- :mod:`.report`: ``write_report`` — report.json, report.md, PNG plots.
"""
from .slices import BRANCH_POINT_TAG, branch_point_step, lineage, slice_end_tag, slice_ends, step_before_slice

__all__ = ["BRANCH_POINT_TAG", "branch_point_step", "lineage", "slice_end_tag", "slice_ends", "step_before_slice"]
