"""The default lossy codec: a uniform quantizer per tensor, its step set each checkpoint so the
restored step is within a target distance of the trained one.

For a group of tensors flattened to u_t ∈ ℝ^N, with error feedback as in LC-checkpoint
(:mod:`raybranch.codec.delta`):

    δ_t = u_t − ũ_{t−1},    q_i = sign(δ_i) · ⌊|δ_i| / Δ_{s(i)} + ½⌋,    ũ_t = ũ_{t−1} + q ⊙ Δ_{s(·)}

where s(i) is the tensor of entry i. The residual after the save is e_t = u_t − ũ_t = δ_t − q⊙Δ.

**Steps.** Δ_s = κ_t · √σ_s, with σ_s tensor s's update RMS ‖u_t − u_{t−1}‖_s / √n_s (its
‖δ_t‖_s / √n_s when it did not move). One scalar κ_t is shared by every tensor of the group (the
rate allocation), so tensors with small updates get proportionally finer steps and none is
starved: √σ sits between one global step (equal slope, best for the plain L2 residual) and
steps ∝ σ (equal relative error per tensor); docs/DECISIONS.md has the measurements.

**Rate control.** κ_t is the largest value on the grid 2^(j/16) for which

    ‖u_t − ũ_t‖₂ ≤ ρ · ‖u_t − u_{t−1}‖₂          (ρ = ``residual``, default 0.95)

checked exactly on the float32 reconstruction the decoder will hold, not estimated: every
checkpoint is within ρ of one step's update of the trained state. The search starts at the last
save's j (the first from the data: κ₀ = RMS(δ) / mean √σ), gallops up or down to the first grid
point on the other side of the target and bisects: 3–5 quantizer passes a save on the benchmark
runs (7–8 for a search from scratch). A step that changes nothing (u_t = u_{t−1}) codes nothing. |q_i| is clipped at
2^16; the clip only binds at steps far below the entries.

The encoder needs u_{t−1}. A writer that continues a branch (a restarted job, a fork) takes it to
be the head's reconstruction ũ: training that goes on from a restored state starts exactly
there. After a group that failed to commit, the training went on from the true state instead, and
the first step's bound is relative to its distance from the last committed reconstruction.

**Decoding** is a table lookup and a sparse add: ũ_t[i] = ũ_{t−1}[i] + float32(q_i) · Δ_{s(i)} at
the nonzero q_i, the same float32 product and sum the encoder formed, so the decoder rebuilds ũ
bit for bit. Parts of a state (tensors, shards, a rank's slice) encode independently: nothing here
needs more than the part being encoded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import NonFiniteError, RaybranchError
from .sparse import MAX_MAGNITUDE, SPARSE_LEVEL, decode_parts, encode_nonzeros, encode_sparse

_GRID = 2.0 ** (1 / 16)  # κ takes the values 2^(j/16): found to within 4.4 %
SUBSAMPLE_MIN = 1 << 20  # groups this large (where a pass is memory-bound, not per-op overhead) search κ on every SUBSAMPLE_STRIDE-th entry first
SUBSAMPLE_STRIDE = 8


def _grid_index(kappa: float) -> int:
    return int(math.floor(math.log(kappa, _GRID))) if kappa > 0 else -(1 << 20)


@dataclass(frozen=True)
class UniformParams:
    """residual: ρ, the bound on ‖u_t − ũ_t‖ / ‖u_t − u_{t−1}‖ every checkpoint keeps (0 < ρ ≤ 4)."""

    residual: float = 0.95
    mode: str = "uniform"

    def __post_init__(self):
        if not isinstance(self.residual, (int, float)) or not 0 < self.residual <= 4:
            raise RaybranchError(f"residual must be a number in (0, 4] (step-updates), got {self.residual!r}")

    def to_json(self) -> dict:
        return {"mode": "uniform", "residual": float(self.residual)}

    @classmethod
    def from_json(cls, d: dict) -> "UniformParams":
        return cls(residual=float(d["residual"]))


class UniformEncoder:
    """Holds ũ (and the last u, for the step's own update) for one group of lossy tensors."""

    def __init__(self, names: list[str], sizes: list[int], params: UniformParams, device: torch.device | str = "cpu"):
        self.names, self.sizes, self.params = list(names), list(sizes), params
        self.device = torch.device(device)
        sizes_t = torch.tensor(self.sizes, dtype=torch.int64)
        # per-tensor sums/maxima and the steps spread over the entries: numpy's segment ops on a
        # CPU (several times faster than torch's there), a scatter / gather on an accelerator
        self._np_segments = self.device.type == "cpu" and all(n > 0 for n in self.sizes)
        self._offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self._seg = torch.repeat_interleave(torch.arange(len(self.sizes)), sizes_t).to(self.device)
        self._count = sizes_t.clamp_min(1).to(self.device, torch.float32)
        ends = np.cumsum(self.sizes)
        k = SUBSAMPLE_STRIDE  # entries i ≡ 0 (mod k) of each tensor [o, o + n): ⌈(o + n)/k⌉ − ⌈o/k⌉
        self._sub_counts = -(-ends // k) - -(-self._offsets // k)
        self.recon: torch.Tensor | None = None
        self.prev: torch.Tensor | None = None  # u_{t−1}
        self._captured: torch.Tensor | None = None  # u_t of the last encode, until advance()
        self._j: int | None = None  # the last κ's grid index: where the next search starts
        self.last_residual: float | None = None  # ‖e_t‖ / ‖u_t − u_{t−1}‖ of the last encode

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def reset(self, flat: torch.Tensor) -> None:
        """Start (or restart) the chain at a stored state: ũ = u_{t−1} = ``flat``."""
        self.recon = flat.detach().to(self.device, torch.float32, copy=True)
        self.recon += 0.0  # −0 → +0, as the decoder's first add does: then ũ + q⊙Δ never makes a −0
        self.prev = self.recon.clone()

    def encode(self, flat: torch.Tensor, level: int = SPARSE_LEVEL) -> tuple[bytes, np.ndarray, torch.Tensor]:
        """u_t → (sparse symbol stream, steps Δ [S] float32, q ⊙ Δ). ũ moves only in :meth:`advance`."""
        q, steps, qv = self.quantize(flat)
        if q.device.type == "cpu":
            return encode_sparse(q.numpy(), level), steps.numpy(), qv
        idx = torch.nonzero(q).flatten()  # on the device: only the nonzeros cross to the host
        vals = q[idx].to(torch.int16 if q.numel() and int(q.abs().max()) < 1 << 15 else torch.int32)
        return encode_nonzeros(idx.cpu().numpy(), vals.cpu().numpy(), level), steps.cpu().numpy(), qv

    def quantize(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """u_t → (q int32 [N], steps Δ [S] float32, q ⊙ Δ), on the encoder's device; raises
        NonFiniteError (nothing changes) on NaN/Inf or a delta that overflows float32."""
        assert self.recon is not None, "reset() first"
        u = flat.detach().to(self.device, torch.float32)
        delta = u - self.recon
        if not bool(torch.isfinite(delta.sum())):  # a finite sum: every entry is finite
            if not bool(torch.isfinite(delta).all()):
                name = self._first_nonfinite(u if not bool(torch.isfinite(u).all()) else delta)
                if bool(torch.isfinite(u).all()):
                    raise NonFiniteError(f"the delta of tensor {name!r} overflows float32; nothing was saved")
                raise NonFiniteError(f"tensor {name!r} holds NaN or Inf; nothing was saved")
        step_update = u - self.prev
        scale = self._scales(step_update, delta)
        q, steps, qv = self._rate_control(u, delta, scale, float(step_update.norm()))
        self._captured = u  # a reference until advance(), which copies it
        return q, steps, qv

    def advance(self, qv: torch.Tensor) -> None:
        """ũ_t = ũ_{t−1} + q ⊙ Δ, and u_t becomes the next step's u_{t−1}."""
        self.recon += qv
        self.prev.copy_(self._captured)  # a copy: the caller may reuse its buffer
        self._captured = None

    # -- internals ----------------------------------------------------------------------------
    def _per_tensor(self, x: torch.Tensor, reduce: str) -> torch.Tensor:
        """Per-tensor "sum" or "amax" of an [N] vector."""
        if self._np_segments:
            ufunc = np.add if reduce == "sum" else np.maximum
            return torch.from_numpy(ufunc.reduceat(x.numpy(), self._offsets))
        out = torch.zeros(len(self.sizes), dtype=x.dtype, device=x.device)
        return out.scatter_reduce_(0, self._seg, x, reduce, include_self=True)

    def _spread(self, steps: torch.Tensor, sub: bool = False) -> torch.Tensor:
        """[S] per-tensor values → [N], each entry its tensor's (``sub``: of every
        :data:`SUBSAMPLE_STRIDE`-th entry only)."""
        if self._np_segments:
            return torch.from_numpy(np.repeat(steps.numpy(), self._sub_counts if sub else self.sizes))
        return steps.index_select(0, self._seg[::SUBSAMPLE_STRIDE] if sub else self._seg)

    def _per_tensor_rms(self, x: torch.Tensor) -> torch.Tensor:
        return (self._per_tensor(x * x, "sum") / self._count).sqrt()

    def _scales(self, step_update: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        st = self._per_tensor_rms(step_update)
        if not bool((st > 0).all()):
            st = torch.where(st > 0, st, self._per_tensor_rms(delta))
        return st.clamp_min(torch.finfo(torch.float32).tiny).sqrt()

    def _rate_control(self, u: torch.Tensor, delta: torch.Tensor, scale: torch.Tensor, step_norm: float):
        """The largest κ (to 5 %) with ‖u_t − (ũ_{t−1} + q⊙Δ)‖ ≤ ρ·‖u_t − u_{t−1}‖; see the module docstring."""
        dnorm = float(delta.norm())
        target = self.params.residual * step_norm
        if dnorm <= target or dnorm == 0:
            self.last_residual = dnorm / step_norm if step_norm > 0 else None
            return torch.zeros_like(delta, dtype=torch.int32), torch.zeros_like(scale), torch.zeros_like(delta)
        amax = self._per_tensor(delta.abs(), "amax")
        live = amax > 0
        j_min = _grid_index(float((amax[live] / scale[live]).min()) / MAX_MAGNITUDE)  # below it every tensor's largest entry clips

        scale_np = scale.numpy() if self._np_segments else None
        j_noclip = _grid_index(float((amax[live] / scale[live]).max()) / MAX_MAGNITUDE) + 1  # from here on nothing clips

        def steps_at(j: int) -> torch.Tensor:  # Δ_s = κ·√σ_s in float32, κ = 2^(j/16)
            if scale_np is not None:
                return torch.from_numpy(np.float32(_GRID ** j) * scale_np)  # the same float32 product, no tensor to build
            return torch.tensor(_GRID ** j, dtype=torch.float32, device=scale.device) * scale

        j = self._j if self._j is not None else _grid_index(dnorm / math.sqrt(delta.numel()) / float(scale.mean()))
        if delta.numel() >= SUBSAMPLE_MIN:  # search on every k-th entry first; the full vector then confirms
            d_sub = delta[::SUBSAMPLE_STRIDE].contiguous()
            limit = target * math.sqrt(d_sub.numel() / delta.numel())
            j = _search(_Trials(d_sub, lambda st: self._spread(st, sub=True), steps_at, j_noclip, limit), j, j_min, limit)
        trials = _Trials(delta, self._spread, steps_at, j_noclip, target)
        _search(trials, j, j_min, target)
        reachable = trials.best_j is not None
        lo = trials.best_j if reachable else min(trials.r, key=trials.r.__getitem__)  # else a clip binds: the closest
        e = torch.empty_like(delta)
        while True:
            trials.keep(lo)
            torch.sub(u, torch.add(self.recon, trials.qv, out=e), out=e)  # the decoder's float32 sum, exactly
            r = float(torch.dot(e, e)) ** 0.5
            if r <= target or lo <= j_min or not reachable:
                break
            lo -= 1  # the trial met the target only within float32 rounding of the sum: one grid point finer
        self._j = lo
        self.last_residual = r / step_norm if step_norm > 0 else None
        return trials.q.to(torch.int32), steps_at(lo), trials.qv

    def _first_nonfinite(self, flat: torch.Tensor) -> str:
        bad = torch.nonzero(~torch.isfinite(flat))[0].item()
        return self.names[int(np.searchsorted(np.cumsum(self.sizes), bad, side="right"))]


class _Trials:
    """Quantizer trials on δ (or a subsample of it) at grid indices j, as ``_search`` asks for them:
    r(j) = ‖δ − q⊙Δ‖ with q = round(x / κ_j), x = δ / √σ per entry. That is ‖u − (ũ + q⊙Δ)‖ up to
    the float32 rounding of the sum, which the caller checks exactly on the choice. Keeps q and q⊙Δ
    of the largest j whose r met ``limit`` (``best_j``); :meth:`keep` makes any j the kept one."""

    def __init__(self, d: torch.Tensor, spread, steps_at, j_noclip: int, limit: float):
        self.d, self.spread, self.steps_at, self.j_noclip, self.limit = d, spread, steps_at, j_noclip, limit
        self.x = d / spread(steps_at(0))  # κ_0 = 1: the per-tensor √σ itself
        self.r: dict[int, float] = {}
        self.best_j: int | None = None
        self.q, self.qv = torch.empty_like(d), torch.empty_like(d)  # the kept trial's
        self._q, self._qv = torch.empty_like(d), torch.empty_like(d)  # scratch

    def __call__(self, j: int) -> float:
        if j not in self.r:
            self._run(j)
            if self.r[j] <= self.limit and (self.best_j is None or j > self.best_j):
                self._take(j)
        return self.r[j]

    def keep(self, j: int) -> None:
        if self.best_j != j:
            self._run(j)
            self._take(j)

    def _run(self, j: int) -> None:
        q, qv = self._q, self._qv
        torch.mul(self.x, 1.0 / _GRID ** j, out=q).round_()  # any integer q decodes exactly; this one is nearest
        if j < self.j_noclip:
            q.clamp_(-MAX_MAGNITUDE, MAX_MAGNITUDE)
        torch.mul(q, self.spread(self.steps_at(j)), out=qv)
        self.r[j] = float(torch.dist(self.d, qv))

    def _take(self, j: int) -> None:
        self.best_j = j
        self.q, self._q = self._q, self.q
        self.qv, self._qv = self._qv, self.qv


def apply_uniform(acc: np.ndarray, payloads: list[bytes], steps: list[np.ndarray], seg_offsets: np.ndarray | None) -> None:
    """acc ← acc + q ⊙ Δ for consecutive deltas, in order, in place: float32, the same products
    and sums the encoder formed, so bit-exact with it. ``np.add.at`` adds repeated indices in
    order, so one pass serves every delta of a chain."""
    if not payloads:
        return
    p = decode_parts(payloads, acc.size)
    offs = np.zeros(1, np.int64) if seg_offsets is None else seg_offsets
    table = np.stack([np.asarray(t, np.float32).reshape(-1) for t in steps])
    if table.shape[1] != offs.size:
        raise ValueError(f"{table.shape[1]} steps for {offs.size} segments")
    # where each (delta, tensor) run of entries begins: one search over the ascending keys,
    # clipped to the delta's own entries (a later delta's keys start right after its last one)
    end = np.cumsum(p.counts)[:, None]
    begin = np.minimum(np.searchsorted(p.key, p.base[:, None] + offs[None, :]), end)
    runs = (np.concatenate([begin[:, 1:], end], axis=1) - begin).reshape(-1)
    vals = p.mag.astype(np.float32)
    vals += np.float32(1.0)  # |q| (< 2^24: exact)
    vals *= np.repeat(table.reshape(-1), runs)
    np.negative(vals, out=vals, where=p.neg)
    np.add.at(acc, p.idx, vals)


def _search(residual, j: int, j_min: int, target: float) -> int:
    """The largest grid index j ≥ j_min with residual(j) ≤ target, for a residual that grows with
    κ; starts at ``j``. Secant steps on log r: from a trial's r, the next index is where a line
    through the last two trials (in log₂ r against j/16; slope 1 until there are two) crosses the
    target, kept strictly inside the bracket known so far, so every trial shrinks it. A smooth
    r(κ) takes 2–3 trials; below j_min (every tensor's largest entry clips) it returns j_min."""
    lo = hi = None  # the largest index known to pass, the smallest known to fail
    slope, last = 1.0, None
    while True:
        r = residual(j)
        if r <= target:
            lo = j
        else:
            hi = j
        if lo is not None and hi is not None and hi - lo <= 1:
            return lo
        if hi is not None and j <= j_min:
            return j_min
        if last is not None and last[1] > 0 and r > 0 and last[0] != j and r != last[1]:
            slope = min(4.0, max(0.125, (math.log2(r) - math.log2(last[1])) * 16 / (j - last[0])))
        last = (j, r)
        if r > 0 and target > 0:
            move = 16 * math.log2(target / r) / slope
        else:  # nothing left to code (go coarser), or nothing may be left over (go finer, to j_min)
            move = 64.0 if r == 0 else -64.0
        guess = j + (math.floor(move) if move > 0 else -math.ceil(-move))
        if lo is not None and lo - j > 1 << 12:
            return lo  # r no longer grows with κ (nothing left to code): far enough
        if lo is not None:
            guess = max(guess, lo + 1)
        if hi is not None:
            guess = min(guess, hi - 1)
        j = max(guess, j_min) if hi is not None and lo is None else guess
