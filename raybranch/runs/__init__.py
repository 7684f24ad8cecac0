"""Runs that live in the store, operated one command at a time (Ray-free; docs/DESIGN.md,
"Branching: runs in the store").

- :mod:`.spec`: run.json, slice arrivals with content hashes, marks, command records;
- :mod:`.context`: a run opened from the store — its data, model template and training helpers;
- :mod:`.ops`: init, a slice's arrival, marks, quarantine (with :mod:`.swap`);
- :mod:`.branch_training`: one branch trained on slices, resumed from the store;
- :mod:`.runner`: the runner interface and the local runner (the Ray one is
  :mod:`raybranch.cluster.runner`);
- :mod:`.baselines`: the branch point and plain training (full training, the oracle);
- :mod:`.evaluate`, :mod:`.reports`: a run's figures from the store, and reports in the store;
- :mod:`.listing`: the runs of a store and the branch tree of a run;
- :mod:`.experiment`: the branching experiment as a script over the operations.
"""
