"""Which collectors a run gets, from its model, optimizer and `Diagnostics` arguments: chosen here once.

The list's order is the order of writing; a collector another reads (the AMP
state that unscales the gradient norms, the update ratio that reuses the
weight norms) comes before its reader. The ZeRO switch (a DeepSpeed engine's
partitioned parameters) is made here: gradients, weights and updates then come
from the engine's partitions (`zero.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from torch import nn

from tb_diag_logger.activations import ActivationCapture
from tb_diag_logger.collectors import Collector, Selection, StepContext, zero
from tb_diag_logger.collectors.amp import AmpState
from tb_diag_logger.collectors.between import BetweenSteps
from tb_diag_logger.collectors.inputs import InputScale
from tb_diag_logger.collectors.learning_rate import LearningRate
from tb_diag_logger.collectors.logits import LogitCapture
from tb_diag_logger.collectors.losses import Losses
from tb_diag_logger.collectors.optim_state import AdamState
from tb_diag_logger.collectors.params import ParameterNorms
from tb_diag_logger.collectors.preclip import PreclipNorm
from tb_diag_logger.collectors.sites import ActivationSites
from tb_diag_logger.collectors.updates import UpdateRatio
from tb_diag_logger.collectors.validation import Validation
from tb_diag_logger.collectors.wiring import WiringChecks, managed_by_engine
from tb_diag_logger.compiled import CompiledCapture

Params = list  # [(name, parameter)], the tensors diagnostics cover
Report = Callable[[str, BaseException], None]


@dataclass
class Built:
    """The collectors, in writing order, and the few the orchestrator asks for by role."""

    collectors: list[Collector]
    norms: Any  # ParameterNorms or zero.ZeroGradients: `device()`, where a step's values live
    capture: Any = None  # the activation capture (eager or compiled), None with activations=False
    sites: Optional[ActivationSites] = None
    updates: Any = None  # UpdateRatio or zero.ZeroUpdates, None without one
    validation: Validation = field(default_factory=Validation)


def recurrent(model: nn.Module) -> bool:
    """An `nn.RNNBase` inside: gradient spikes fall between logged steps, and its steps make a norm cheap."""
    return any(isinstance(m, nn.RNNBase) for m in model.modules())


def build(outer: nn.Module, model: nn.Module, compiled: bool, params: Params, optimizer: Any, *,
          scaler: Any, selected: Selection, activations: bool, update_ratio: bool,
          grad_norm_every_step: Optional[bool], impl: Optional[str], engine: bool, report: Report,
          ctx: StepContext) -> Built:
    """Every collector of a run, each reading the orchestrator's step context `ctx`. `outer` is the model
    as given (a compiled wrapper's hooks run outside the graph), `model` the module whose names users
    know; `engine`: an engine owns the gradients."""
    sharded = zero.any_zero(params)
    reads = from_optimizer(optimizer, params, update_ratio, sharded, impl, report)
    updates = reads.updates
    out: list[Collector] = [updates] if updates is not None else []
    amp = AmpState(scaler, optimizer) if scaler is not None else None
    out += [amp] if amp is not None else []
    norms = zero.ZeroGradients(params) if sharded else ParameterNorms(params, impl=impl, amp=amp, updates=updates)
    out.append(norms)
    root = outer if compiled and isinstance(getattr(outer, "_orig_mod", None), nn.Module) else model
    capture = sites = None
    if activations:
        # A compiled graph cannot hold the eager capture's TorchFunctionMode: traced module hooks instead.
        capture = (CompiledCapture if compiled else ActivationCapture)(model, selected, report)
        sites = ActivationSites(capture)
        out.append(sites)
    out.append(Losses())
    if capture is not None:  # logits ride on the capture's arming (logged training forwards only)
        out.append(LogitCapture(model, lambda: capture.armed, report, hook_on=root))
        out.append(InputScale(model, lambda: capture.armed, report, hook_on=root))
    out += [reads.state] if reads.state is not None else []
    out.append(PreclipNorm())
    out += [reads.lr] if reads.lr is not None else []
    validation = Validation()
    out.append(validation)
    # The loop's wiring (logged steps only) and what happens between logged steps (every step, no sync).
    out.append(WiringChecks(model, params, optimizer, report, hook_on=root,
                            engine=engine or managed_by_engine(params=params)))
    measure = recurrent(model) if grad_norm_every_step is None else grad_norm_every_step
    out.append(BetweenSteps(params, measure_grad_norm=measure, amp=amp, on_error=report))
    for c in out:
        c.ctx = ctx
    return Built(out, norms, capture, sites, updates, validation)


def updates_collector(optimizer: Any, params: Params, update_ratio: bool, sharded: bool, impl: Optional[str],
                      report: Report) -> Any:
    """The update ratio through `optimizer`'s step hooks (if asked and there is one), or None."""
    if not update_ratio or optimizer is None:
        return None
    try:
        if sharded:  # the fp32 master fragments, across every parameter group's step
            return zero.ZeroUpdates(optimizer, params, report)
        return UpdateRatio(optimizer, params, report, impl)
    except Exception as e:  # an optimizer that refuses hooks costs only this diagnostic
        report("update_ratio", e)
        return None


@dataclass
class FromOptimizer:
    """The collectors built from the optimizer, each None without one; `Diagnostics.set_optimizer` replaces
    them (they are tagged `from_optimizer`)."""

    updates: Any = None  # UpdateRatio or zero.ZeroUpdates
    state: Optional[AdamState] = None
    lr: Optional[LearningRate] = None

    def collectors(self) -> list[Collector]:
        return [c for c in (self.updates, self.state, self.lr) if c is not None]


def from_optimizer(optimizer: Any, params: Params, update_ratio: bool, sharded: bool, impl: Optional[str],
                   report: Report) -> FromOptimizer:
    """What reads `optimizer` and is built again for another one: the one place that says which."""
    out = FromOptimizer(updates_collector(optimizer, params, update_ratio, sharded, impl, report))
    if optimizer is not None:
        out.state, out.lr = AdamState(params, optimizer), LearningRate(optimizer)
    for c in out.collectors():
        c.from_optimizer = True
    return out


def optimizer_collectors(optimizer: Any, params: Params, update_ratio: bool, sharded: bool, impl: Optional[str],
                         report: Report, ctx: StepContext) -> tuple[Any, list[Collector]]:
    """What reads the optimizer (`Diagnostics.set_optimizer`): (the update ratio or None, the collectors)."""
    reads = from_optimizer(optimizer, params, update_ratio, sharded, impl, report)
    out = reads.collectors()
    for c in out:
        c.ctx = ctx
    return reads.updates, out
