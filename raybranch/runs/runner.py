"""Where branches train: the small interface the run operations (:mod:`.ops`) call, and its
in-process implementation. The Ray implementation, one Ray Train worker group per branch, is
:class:`raybranch.cluster.runner.RayRunner`; both call
:func:`~raybranch.runs.branch_training.train_branch`, so the same plan gives the same
checkpoints (bit for bit where the seeds and thread counts agree).

A plan is ``[(branch, [slice, ...]), ...]``: every branch trains its slices in order; distinct
branches are independent (each has its own writer), so a runner may train them at once.
"""
from __future__ import annotations

from typing import Protocol

from .branch_training import train_branch
from .context import RunContext

Plan = list[tuple[str, list[int]]]


class Runner(Protocol):
    name: str

    def train(self, ctx: RunContext, plan: Plan) -> dict[str, dict]:
        """Train every branch of ``plan``; {branch: train_branch's result} (branches with no
        slices are left out)."""


class LocalRunner:
    """The branches one after the other, in this process."""

    name = "local"

    def train(self, ctx: RunContext, plan: Plan) -> dict[str, dict]:
        out = {}
        for branch, slices in plan:
            if slices:
                ctx.hooks.phase(f"{branch} slices {','.join(map(str, slices))}")
                out[branch] = train_branch(ctx, branch, list(slices))
        return out


__all__ = ["LocalRunner", "Plan", "Runner"]
