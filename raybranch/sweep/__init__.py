"""Sweeps without Ray: the trial grid (:mod:`.grid`) and the tables and plot of the results
(:mod:`.tables`). :mod:`raybranch.cluster.sweep` runs the trials with Ray Tune."""
