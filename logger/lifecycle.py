"""What changes during a run: the model's parameters, the optimizer that steps them, the structure document.

Parameters are replaced (``load_state_dict(assign=True)``, modules added or
swapped), frozen and unfrozen; an optimizer is built later in the run. The
collectors measure the model's own tensors at every logged step, and the
structure document is written again whenever what it says changed.
"""

from __future__ import annotations

import itertools
import operator
from typing import Any, Callable, Optional, Sequence

from torch import nn

from tb_diag_logger import distributed
from tb_diag_logger.collectors import Collector, Selection, zero
from tb_diag_logger.collectors.optim_state import optimizer_params
from tb_diag_logger.structure import module_tree

_VERSION = operator.attrgetter("_version")
_REQUIRES_GRAD = operator.attrgetter("requires_grad")


class Lifecycle:
    """The parameters diagnostics cover, the optimizer followed, and what the last structure document said."""

    def __init__(self, model: nn.Module, selected: Selection, optimizer: Any, zero_opt: Any,
                 report: Callable[[str, BaseException], None]) -> None:
        self.model = model
        self.optimizer = optimizer
        self.zero_opt = zero_opt  # a DeepSpeed ZeRO optimizer (its partitioned groups), or None
        self._selected = selected
        self._report = report
        self.params: list[tuple[str, nn.Parameter]] = []
        self._ids: Optional[list[int]] = None  # None: the first `refresh` always runs (a model may have none)
        self._held_key: tuple = ((), None, None)  # (optimizer groups, `_ids`, held flag per parameter)
        self.refresh([])
        self.zero = zero.any_zero(self.params)  # ZeRO: gradients and weights from the engine's partitions
        self._structure_key: Optional[tuple] = None  # what the last structure document said (`key`)
        self._structure_sites: Optional[set[str]] = None
        self._versions: Optional[list[int]] = None  # the weights' versions at the last logged step

    def refresh(self, collectors: Sequence[Collector]) -> None:
        """Follow the model's parameters when they were replaced: the tensors measured are its own."""
        ids = self._current_ids()
        if ids == self._ids:
            return
        self._ids = ids
        current = list(self.model.named_parameters())
        self.sharded = distributed.any_sharded(p for _, p in current)  # some parameter is a DTensor
        self._all = [p for _, p in current]
        self._names = tuple(n for n, _ in current)
        # Integer parameters (possible with requires_grad=False) have no norms to speak of.
        self.params = [(n, p) for n, p in current if self._selected(n) and (p.is_floating_point() or p.is_complex())]
        self._tensors = [p for _, p in self.params]
        for c in collectors:
            c.follow(self.params)

    def _current_ids(self) -> list[int]:
        """Every module's own parameters in one C-level pass (no names, no de-duplication): it changes
        whenever named_parameters() could, and costs a pointer per tensor instead of a hashed walk."""
        return list(map(id, itertools.chain.from_iterable(m._parameters.values() for m in self.model.modules())))

    def after_step(self, updates: Any, step: int, logged: bool) -> None:
        """After a step: the update ratio waits for a logged step's update, and the weights' versions are
        kept to tell whether the optimizer we hold made it (`check_optimizer_stepped`)."""
        if updates is not None:
            updates.pending = step if logged else None
        self._versions = list(map(_VERSION, self._tensors)) if logged and updates is not None else None

    def check_optimizer_stepped(self, updates: Any) -> None:
        """The weights moved since the last logged step but the optimizer we hold never stepped: another
        optimizer is training the model (built later without `set_optimizer`). Say so once."""
        versions, self._versions = self._versions, None
        if updates is None or updates.pending is None or versions is None:
            return
        if versions != list(map(_VERSION, self._tensors)):
            self._report("update_ratio", RuntimeError(
                f"the weights changed but the {type(self.optimizer).__name__} given to Diagnostics did not "
                "step: if you built a new optimizer, call diag.set_optimizer(new_optimizer) so that the "
                "update ratio and learning rate follow it"))

    def held(self) -> Optional[set[int]]:
        """ids of the model's parameters the optimizer steps (under ZeRO: those in its partitioned groups)."""
        if self.zero and self.zero_opt is not None:
            groups = getattr(self.zero_opt, "fp16_groups", None) or getattr(self.zero_opt, "bit16_groups", None)
            if groups is not None:
                return {id(p) for g in groups for p in g}
        return optimizer_params(self.optimizer)

    def key(self) -> tuple:
        """What the structure document says that changes during a run: which parameters there are, which
        require gradients and which the optimizer holds, and its parameter groups."""
        if self._current_ids() != self._ids:  # not yet followed by `refresh`: the long way
            held = self.held()
            return id(self.optimizer), None, tuple((n, bool(p.requires_grad), None if held is None else id(p) in held)
                                                   for n, p in self.model.named_parameters())
        groups = None if self.optimizer is None else tuple(
            (id(g["params"]), len(g["params"])) for g in self.optimizer.param_groups)
        if groups != self._held_key[0] or self._ids is not self._held_key[1]:  # rebuilt when either moves
            held = self.held()
            flags = None if held is None else tuple(id(p) in held for p in self._all)
            self._held_key = (groups, self._ids, flags)
        trainable = tuple(map(_REQUIRES_GRAD, self._all))  # C-level: frozen or unfrozen since
        return id(self.optimizer), groups, self._names, trainable, self._held_key[2]

    def structure_if_new(self, sites: Any, capture: Any) -> Optional[dict]:
        """The model's structure, again whenever a step shows an activation site it did not list, or a
        parameter was frozen, unfrozen, added to or left out of the optimizer since the last document."""
        seen = {s.name for s in sites.seen} if sites is not None else set()
        key = self.key()
        if self._structure_sites is not None and seen <= self._structure_sites and key == self._structure_key:
            return None
        self._structure_key = key
        self._structure_sites = seen | (self._structure_sites or set())
        known = [capture.sites[n] for n in capture.order] if capture is not None else []
        return module_tree(self.model, {n for n, _ in self.params}, known, self.optimizer, self.held())

    def set_optimizer(self, collectors: list[Collector], optimizer: Any, zero_opt: Any,
                      fresh: Callable[[Any], tuple[Any, list[Collector]]]) -> Any:
        """Follow another optimizer: the collectors built from the old one (`Collector.from_optimizer`) are
        closed and replaced by `fresh(optimizer)`'s (appended: written last); those that stay are told.
        Returns the new update ratio (or None)."""
        for c in [c for c in collectors if c.from_optimizer]:
            c.close()
            collectors.remove(c)
        self.optimizer, self.zero_opt, self._versions = optimizer, zero_opt, None
        updates, added = fresh(optimizer)
        for c in collectors:
            c.set_optimizer(optimizer, updates)
        collectors += added
        return updates
