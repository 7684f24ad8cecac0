"""A run opened from the store: its spec, its data, its model template and the helpers every
command and both runners use (optimizer, a slice's training, evaluation, restores).

``RunContext(store, run)`` reads ``run.json``; the data are rebuilt lazily from the run's
dataset and slicing (deterministic from its seed) the first time they are needed, and every
slice handed to training is checked against the content hash recorded for it, so a replay
trains the same bytes as the branch it replaces. ``RunContext.for_config`` builds one before
``run.json`` exists (``raybranch init``).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..branches.data import Hooks, SplitData, prepare_data
from ..checkpoint.checkpointer import Checkpointer
from ..config.classes import ExperimentConfig
from ..data.files import normalise
from ..errors import RunError
from ..lora import delta_lora_layers, inject_delta_lora, merge_and_reinit_
from ..models import build_model
from ..poison import attack_success_rate
from ..store.store import Store, open_store
from ..train.ddp import unwrap
from ..train.loop import evaluate_accuracy, load_checkpoint, train_slice
from .spec import RunSpec, content_hash, slice_key


class RunContext:
    """One run's spec, data and model helpers (see the module docstring)."""

    def __init__(self, store: Store | str, run: str, spec: RunSpec | None = None, hooks: Hooks | None = None,
                 data: SplitData | None = None):
        self.store = open_store(store) if isinstance(store, str) else store
        self.run = run
        self.spec = spec or RunSpec.load(self.store, run)
        self.cfg: ExperimentConfig = self.spec.config
        self.hooks = hooks or Hooks()
        self._data = data  # None: rebuilt from the config when first needed
        self._checked: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._template: nn.Module | None = None

    @classmethod
    def for_config(cls, store: Store | None, run: str, cfg: ExperimentConfig, mechanism: str, hooks: Hooks | None = None,
                   start: dict | None = None) -> "RunContext":
        """A context for a run not yet in the store (``init``; or plain training with no store):
        its spec is the run.json ``init`` writes, with the dataset slices' hashes taken here."""
        ctx = cls(store, run, RunSpec.new(run, cfg, mechanism, [], start or {"source": "trained"}), hooks)
        ctx.spec.dataset_slices.extend(ctx.dataset_slice_records())
        return ctx

    # -- data -----------------------------------------------------------------------------------
    @property
    def data(self) -> SplitData:
        if self._data is None:
            self._data = prepare_data(self.cfg)
        return self._data

    def dataset_slice_records(self) -> list[dict]:
        """[{"slice", "images", "sha256"}] of the dataset's slices (what run.json records)."""
        return [{"slice": k, "images": int(x.shape[0]), "sha256": content_hash(x, y)}
                for k, (x, y) in enumerate(self.data.slices, start=1)]

    def slice_data(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) of slice k as the model trains on them, checked against its hash."""
        if k in self._checked:
            return self._checked[k]
        n = self.spec.n_dataset_slices
        record = self.store.read_json(slice_key(self.run, k)) if k > n else None
        if k <= n:
            x, y = self.data.slices[k - 1]
            expect = self.spec.dataset_slices[k - 1]["sha256"]
            if content_hash(x, y) != expect:
                raise RunError(f"slice {k} of run {self.run!r} rebuilt from {self.cfg.dataset} does not match the hash in "
                               "run.json: the dataset or the code that slices it changed")
        else:
            pixels, y = self.spec.load_file_slice(self.store, k, record)
            x = normalise(pixels, self.data.meta)
        self._checked[k] = (x, y)
        return x, y

    # -- models ---------------------------------------------------------------------------------
    def base_model(self) -> nn.Module:
        """The model as built from the config and seed (before any training)."""
        torch.manual_seed(self.cfg.seed)
        meta = self.data.meta
        return build_model(self.cfg.model, meta.num_classes, meta.in_channels, meta.image_size)

    def with_lora(self, model: nn.Module, init: bool = True) -> nn.Module:
        """A copy of ``model`` with the run's Delta-LoRA layers (seeded: the same A on every process).

        ``lora_init: svd`` starts B, A at the truncated SVD of each adapted layer's warm-up update
        ΔW = W(model) − W(the seeded untrained model) and subtracts s·B A from W, so the model's
        function is unchanged and the factors start along the directions training took. ``init``
        False (the restore template) skips it: a restore loads the anchor.
        """
        cfg = self.cfg
        m = copy.deepcopy(model)
        svd = init and cfg.lora_init == "svd"
        deltas = None
        if svd:
            start = dict(self.base_model().named_modules())
            deltas = {n: mod.weight.detach() - start[n].weight.detach() for n, mod in m.named_modules()
                      if isinstance(mod, (nn.Linear, nn.Conv2d))}
            deltas.update({f"{n}.in_proj": mod.in_proj_weight.detach() - start[n].in_proj_weight.detach()
                           for n, mod in m.named_modules() if isinstance(mod, nn.MultiheadAttention)})
        inject_delta_lora(m, cfg.lora_pattern, rank=cfg.lora_rank, scale=cfg.lora_s(), lam=cfg.lora_lam,
                          init="svd" if svd else "lora", deltas=deltas, train_bias=cfg.lora_train_bias,
                          generator=torch.Generator().manual_seed(cfg.seed + 1), min_saving=cfg.lora_min_saving,
                          keep_function=True)
        return m

    def template(self) -> nn.Module:
        """A model of the run's shape (Delta-LoRA layers for ``lc+dlora``); weights come from restores."""
        if self._template is None:
            base = self.base_model()
            self._template = self.with_lora(base, init=False) if self.spec.lora else base
        return copy.deepcopy(self._template)

    def optimizer(self, model: nn.Module, lora: bool | None = None) -> torch.optim.Optimizer:
        """Plain SGD at ``lr``; a Delta-LoRA model's in groups: A at ``lora_lr``, B at
        ``lora_b_ratio × lora_lr`` (LoRA+), every other trainable parameter at ``lora_dense_lr``
        (None: ``lora_lr``)."""
        cfg = self.cfg
        lora = self.spec.lora if lora is None else lora
        if not lora:
            return torch.optim.SGD(model.parameters(), lr=cfg.lr)
        layers = delta_lora_layers(unwrap(model))
        a = [layer.lora_A for layer in layers.values()]
        b = [layer.lora_B for layer in layers.values()]
        factors = {id(p) for p in a + b}
        dense = [p for p in model.parameters() if p.requires_grad and id(p) not in factors]
        groups = [{"params": a, "lr": cfg.lora_lr}, {"params": b, "lr": cfg.lora_lr * cfg.lora_b_ratio}]
        if dense:
            groups.append({"params": dense, "lr": cfg.lora_lr if cfg.lora_dense_lr is None else cfg.lora_dense_lr})
        return torch.optim.SGD(groups, lr=cfg.lora_lr)

    def merge_generator(self, slice_id: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.cfg.seed * 7919 + 31 * slice_id + 5)

    def ck_kwargs(self) -> dict:
        return dict(self.spec.doc["checkpointer"])

    def checkpointer(self, branch: str, **kw) -> Checkpointer:
        return Checkpointer(self.store, self.run, branch, **{**self.ck_kwargs(), **kw})

    def end_snapshot(self, branch: str) -> bool:
        """Whether ``branch``'s slice ends are exact key frames (clean's are served)."""
        return self.cfg.exact_slice_end(self.spec.mechanism, branch)

    def restored(self, branch: str, step: int | None = None, ck=None) -> nn.Module:
        """The model of ``branch`` at ``step`` (None: its head now), read from the store."""
        model = self.template()
        state = ck.restore(step) if ck is not None else self.reader().restore(branch, step)
        load_checkpoint(model, state)
        return model

    def reader(self):
        from ..checkpoint.restore import Reader

        return Reader(self.store, self.run)

    # -- training and evaluation ----------------------------------------------------------------
    def train(self, model: nn.Module, opt, k: int, ck, step0: int, merge: str = "none", end_snapshot: bool = False,
              data: tuple[torch.Tensor, torch.Tensor] | None = None):
        """One slice on one branch (+ the merge policy at its end); returns the SliceResult."""
        cfg = self.cfg
        res = train_slice(
            model, opt, data if data is not None else self.slice_data(k), epochs=cfg.epochs, batch_size=cfg.batch_size,
            ckpt=ck, step0=step0, slice_id=k, eval_fn=self.val_acc, patience=cfg.patience or None,
            checkpoint_every=cfg.checkpoint_every, settle=cfg.settle, end_snapshot=end_snapshot, seed=cfg.seed,
            on_step=self.hooks.step, log=self.hooks.log,
            clip_grad=cfg.lora_clip if delta_lora_layers(unwrap(model)) else None,
        )
        if merge == "slice-end":
            merge_and_reinit_(unwrap(model), self.merge_generator(k))
        return res

    def acc(self, model: nn.Module) -> float:
        return evaluate_accuracy(model, *self.data.test)

    def val_acc(self, model: nn.Module) -> float:
        return evaluate_accuracy(model, *self.data.val)

    def asr(self, model: nn.Module) -> float | None:
        if self.cfg.poison != "backdoor":
            return None
        return attack_success_rate(model, *self.data.test, self.cfg.poison_target, size=self.cfg.trigger_size,
                                   value=self.data.trigger)


__all__ = ["RunContext"]
