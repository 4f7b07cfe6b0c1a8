"""`Diagnostics`: the one object a training loop adds."""

from __future__ import annotations

import fnmatch
import math
import numbers
import os
import warnings
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from tb_diag_logger import distributed, reductions
from tb_diag_logger.activations import ActivationCapture
from tb_diag_logger.summaries import SummarySink

DEFAULT_EVERY = 20

LossLike = Union[torch.Tensor, float, int]


class DiagnosticsWarning(UserWarning):
    """A diagnostic failed; training goes on (reported once per place)."""


def _patterns(value: Union[str, Sequence[str], None], name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not all(isinstance(p, str) for p in value):
        raise TypeError(f"{name} must be a glob pattern or a list of them, got {value!r}")
    return tuple(value)


def _unwrap(model: nn.Module) -> tuple[nn.Module, bool]:
    """The module whose names users know: inside DDP/DataParallel and torch.compile.

    Returns (module, compiled).
    """
    compiled = False
    for _ in range(4):
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model, compiled = model._orig_mod, True
        elif type(model).__name__ in ("DistributedDataParallel", "DataParallel") and isinstance(
            getattr(model, "module", None), nn.Module
        ):
            model = model.module
        else:
            break
    return model, compiled


class Diagnostics:
    """Records why training goes wrong as TensorBoard summaries.

    Call `step(step, loss=..., losses=...)` once per optimizer step, after
    `backward()` and before the next `zero_grad()`. Every `every`-th step
    (``step % every == 0``) is logged: per-parameter gradient and weight
    norms, activation statistics of the forward passes since the previous
    `step()` call, the loss and its components. Other steps cost nothing.

    Args:
        model: the module being trained (DDP, DataParallel and
            `torch.compile` wrappers are unwrapped for names).
        writer: the user's `SummaryWriter`; diagnostics land in its event file.
        logdir: alternatively, a directory for a writer that `Diagnostics`
            creates and closes.
        every: log every `every`-th step.
        optimizer: enables `update_ratio` and `learning_rate`.
        scaler: a `torch.amp.GradScaler`, so that scaled gradients are
            recorded unscaled and skipped steps are recorded as such.
        include, exclude: glob patterns over parameter and activation-site names.
        activations: capture activation statistics (forward hooks).
        update_ratio: keep one copy of the parameters to measure the update
            size on logged steps (costs memory equal to the parameters).
        write_rank: under torch.distributed, the rank that writes (others only
            take part in the reductions).
    """

    def __init__(
        self,
        model: nn.Module,
        writer: Any = None,
        *,
        logdir: Optional[Union[str, os.PathLike]] = None,
        every: int = DEFAULT_EVERY,
        optimizer: Optional[torch.optim.Optimizer] = None,
        scaler: Any = None,
        include: Union[str, Sequence[str], None] = None,
        exclude: Union[str, Sequence[str], None] = None,
        activations: bool = True,
        update_ratio: bool = True,
        write_rank: int = 0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(every, bool) or not isinstance(every, numbers.Integral):
            raise TypeError(f"every must be a positive int, got {every!r}")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if writer is not None and not callable(getattr(writer, "_get_file_writer", None)):
            raise TypeError(
                f"writer must be a torch.utils.tensorboard.SummaryWriter, got {type(writer).__name__}"
            )
        if writer is not None and logdir is not None:
            raise ValueError("pass either writer or logdir, not both")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if scaler is not None and not callable(getattr(scaler, "get_scale", None)):
            raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")

        self.every = int(every)
        self._rank = distributed.rank()
        self._writes = self._rank == write_rank
        self._own_writer = False
        if self._writes and writer is None:
            if logdir is None:
                raise ValueError("pass a SummaryWriter as writer, or a directory as logdir")
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(os.fspath(logdir))
            self._own_writer = True
        self._sink = SummarySink(writer) if (self._writes and writer is not None) else None

        self.model, compiled = _unwrap(model)
        self._include = _patterns(include, "include")
        self._exclude = _patterns(exclude, "exclude")
        self._optimizer = optimizer
        self._scaler = scaler
        self._warned: set[str] = set()
        self._closed = False
        self._last_step: Optional[int] = None
        self._prev_step: Optional[int] = None
        self._structure_sites: Optional[tuple[str, ...]] = None

        self._params = [
            (n, p) for n, p in self.model.named_parameters() if self._selected(n)
        ]
        self._capture: Optional[ActivationCapture] = None
        if activations and compiled:
            warnings.warn(
                "tb-diag: the model is torch.compile'd; activation capture is disabled "
                "(hooks and a TorchFunctionMode would break the compiled graph). Gradient, "
                "weight and loss diagnostics still work. Pass activations=False to silence this.",
                DiagnosticsWarning,
                stacklevel=2,
            )
        elif activations:
            self._capture = ActivationCapture(self.model, self._include, self._exclude, self._report)
            self._capture.armed = True  # the first forward may belong to a logged step

        # update_ratio: parameters copied before a logged optimizer step into
        # buffers allocated once (fresh tensors page-fault: PERF_NOTES.md).
        self._update_ratio = bool(update_ratio and optimizer is not None)
        self._opt_handles = []
        self._update_pending: Optional[int] = None  # step whose optimizer step to measure
        self._update_result: Optional[tuple[int, list[str], torch.Tensor]] = None
        self._snapshot: Optional[list[torch.Tensor]] = None
        self._snapshot_params: list[tuple[str, torch.Tensor]] = []
        if self._update_ratio:
            self._opt_handles.append(optimizer.register_step_pre_hook(self._before_opt_step))
            self._opt_handles.append(optimizer.register_step_post_hook(self._after_opt_step))

    # ------------------------------------------------------------------ api
    def __enter__(self) -> "Diagnostics":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def should_log(self, step: int) -> bool:
        """Whether `step(step)` records anything."""
        return step % self.every == 0

    def step(
        self,
        step: int,
        loss: Optional[LossLike] = None,
        losses: Optional[Mapping[str, LossLike]] = None,
    ) -> None:
        """Record diagnostics for optimizer step `step` if it is a logged step.

        `loss` is the total loss (a scalar); `losses` names its components
        (scalars, or 1-D per-sample tensors from ``reduction="none"``, whose
        spread is recorded too).
        """
        if self._closed:
            raise RuntimeError("Diagnostics.step() called after close()")
        if isinstance(step, torch.Tensor) and step.numel() == 1 and not step.is_floating_point():
            step = int(step.item())
        if isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise TypeError(f"step must be an int, got {type(step).__name__}")
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(f"step must increase: got {step} after {self._last_step}")
        loss_items = self._check_losses(loss, losses)

        self._prev_step, self._last_step = self._last_step, step
        logged = self.should_log(step)
        try:
            self._flush_update_ratio()
            if logged:
                self._log(step, loss_items)
        except Exception as e:
            self._report("step", e)
        finally:
            if self._capture is not None:
                self._capture.clear()
                self._capture.armed = self._predict_next_logged()
            self._update_pending = step if (logged and self._update_ratio) else None

    def close(self) -> None:
        """Write what is pending, remove every hook, close a writer we created. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._flush_update_ratio()
        except Exception as e:
            self._report("close", e)
        if self._capture is not None:
            self._capture.close()
        for h in self._opt_handles:
            h.remove()
        self._opt_handles.clear()
        self._snapshot = None
        self._snapshot_params = []
        if self._sink is not None:
            try:
                if self._own_writer:
                    self._sink.writer.close()
                else:
                    self._sink.flush()
            except Exception as e:
                self._report("close", e)

    # ------------------------------------------------------------- helpers
    def _selected(self, name: str) -> bool:
        if self._include and not any(fnmatch.fnmatchcase(name, p) for p in self._include):
            return False
        return not any(fnmatch.fnmatchcase(name, p) for p in self._exclude)

    def _report(self, where: str, exc: BaseException) -> None:
        key = f"{where}:{type(exc).__name__}"
        if key in self._warned:
            return
        self._warned.add(key)
        warnings.warn(
            f"tb-diag: {where} failed ({type(exc).__name__}: {exc}); training continues, "
            "this diagnostic may be missing. Reported once.",
            DiagnosticsWarning,
            stacklevel=3,
        )

    def _predict_next_logged(self) -> bool:
        """Arm activation capture when the next step() is likely a logged one."""
        if self._last_step is None:
            return True
        delta = 1
        if self._prev_step is not None:
            delta = max(1, self._last_step - self._prev_step)
        return self.should_log(self._last_step + delta)

    @staticmethod
    def _check_losses(loss, losses) -> list[tuple[str, Any]]:
        items: list[tuple[str, Any]] = []
        if loss is not None:
            items.append(("total", _check_scalar("loss", loss)))
        if losses is not None:
            if not isinstance(losses, Mapping):
                raise TypeError(f"losses must be a dict of name -> loss, got {type(losses).__name__}")
            for name, value in losses.items():
                if not isinstance(name, str) or not name:
                    raise TypeError(f"losses keys must be non-empty strings, got {name!r}")
                if name == "total" and loss is not None:
                    raise ValueError('losses may not use the name "total" together with loss=')
                if isinstance(value, torch.Tensor) and value.ndim == 1 and value.numel() != 1:
                    if not value.is_floating_point():
                        raise TypeError(f"losses[{name!r}] must be a float tensor")
                    items.append((name, value))
                else:
                    items.append((name, _check_scalar(f"losses[{name!r}]", value)))
        return items

    # ------------------------------------------------------------- logging
    def _log(self, step: int, loss_items: list[tuple[str, Any]]) -> None:
        device = self._out_device()
        parts: list[torch.Tensor] = []  # everything for the host, concatenated once

        # Gradients and weights.
        with_grad = [(n, p) for n, p in self._params if p.grad is not None]
        grad_names = [n for n, _ in with_grad]
        grads = [reductions._local(p.grad.detach()) for _, p in with_grad]
        weights = [reductions._local(p.detach()) for _, p in self._params]
        g_norm = reductions.grouped_norms(grads, device)
        g_max = reductions.max_abs(grads, device)
        w_norm = reductions.grouped_norms(weights, device)
        sharded = any(hasattr(p, "to_local") for _, p in self._params)
        if sharded:
            g_norm, g_max, w_norm = distributed.reduce_sharded_norms(g_norm, g_max, w_norm)
        # AMP: before `scaler.unscale_(optimizer)` the gradients are scaled.
        scale = float(self._scaler.get_scale()) if self._scaler is not None else 1.0
        if self._scaler is not None and not (
            self._optimizer is not None and _already_unscaled(self._scaler, self._optimizer)
        ):
            g_norm = g_norm / scale
            g_max = g_max / scale
        total = torch.linalg.vector_norm(g_norm).reshape(1) if grads else torch.zeros(0, device=device)
        parts += [g_norm, g_max, w_norm, total]

        # Activations.
        sites = self._capture.take() if self._capture is not None else []
        if sites:
            parts.append(distributed.finish_sites(sites, device))

        # Loss.
        loss_names: list[str] = []
        spread_names: list[str] = []
        scalars, spreads = [], []
        for name, value in loss_items:
            if isinstance(value, torch.Tensor) and value.ndim == 1 and value.numel() != 1:
                spread_names.append(name)
                spreads.append(reductions.spread(value).to(device))
                scalars.append(value.detach().float().mean().reshape(1).to(device))
            elif isinstance(value, torch.Tensor):
                scalars.append(value.detach().float().reshape(1).to(device))
            else:
                scalars.append(torch.tensor([float(value)], device=device))
            loss_names.append(name)
        parts += scalars + spreads

        host = torch.cat([p.reshape(-1).float().to(device) for p in parts]).cpu().numpy() if parts else np.zeros(0)

        if self._sink is None:
            return  # not the writing rank: the collectives above were its share
        P, W = len(grads), len(weights)
        off = 0

        def take(n: int) -> np.ndarray:
            nonlocal off
            out = host[off : off + n]
            off += n
            return out

        gn, gm, wn, tot = take(P), take(P), take(W), take(1 if grads else 0)
        items = []
        if P:
            nonfinite = np.zeros(P, dtype=np.float32)
            bad = [i for i in range(P) if not math.isfinite(gn[i])]
            if bad:
                counts = reductions.nonfinite_counts([grads[i] for i in bad])
                if sharded:
                    counts = distributed.sum_counts(counts)
                nonfinite[bad] = counts
            items += [
                ("grad_norm", grad_names, (), gn),
                ("grad_max_abs", grad_names, (), gm),
                ("grad_nonfinite", grad_names, (), nonfinite),
                ("grad_norm_total", [""], (), tot),
            ]
        elif sharded:
            distributed.sum_counts([])
        if W:
            items.append(("weight_norm", [n for n, _ in self._params], (), wn))
        if self._scaler is not None:
            skipped = 0.0 if (P == 0 or math.isfinite(float(tot[0]))) else 1.0
            items.append(("amp_scale", [""], (), np.array([scale])))
            items.append(("amp_skipped", [""], (), np.array([skipped])))
        if sites:
            block = take(4 * len(sites)).reshape(len(sites), 4)
            names = [s.name for s in sites]
            types = [s.type_name for s in sites]
            relu = [i for i, s in enumerate(sites) if s.kind == "relu"]
            sat = [i for i, s in enumerate(sites) if s.kind in ("sigmoid", "tanh")]
            if relu:
                items.append(("dead_fraction", [names[i] for i in relu], [types[i] for i in relu], block[relu, 0]))
            if sat:
                items.append(("saturation", [names[i] for i in sat], [types[i] for i in sat], block[sat, 1]))
            items.append(("act_mean", names, types, block[:, 2]))
            items.append(("act_std", names, types, block[:, 3]))
        if loss_names:
            items.append(("loss", loss_names, (), take(len(loss_names))))
        if spread_names:
            sp = take(7 * len(spread_names)).reshape(len(spread_names), 7)
            for j, metric in enumerate(("loss_min", "loss_p05", "loss_p25", "loss_p50", "loss_p75", "loss_p95", "loss_max")):
                items.append((metric, spread_names, (), sp[:, j]))
        if self._optimizer is not None:
            groups = self._optimizer.param_groups
            lr_names = [""] if len(groups) == 1 else [f"group{i}" for i in range(len(groups))]
            items.append(("learning_rate", lr_names, (), np.array([_to_float(g.get("lr", float("nan"))) for g in groups])))
        self._sink.write_vectors(step, items)

        site_names = tuple(s.name for s in sites)
        if self._structure_sites is None or not set(site_names) <= set(self._structure_sites):
            self._structure_sites = tuple(sorted(set(site_names) | set(self._structure_sites or ())))
            self._sink.write_structure(step, self._structure_doc(sites))

    def _out_device(self) -> torch.device:
        for _, p in self._params:
            return reductions._local(p).device
        return torch.device("cpu")

    def _structure_doc(self, sites) -> dict:
        """The module tree for the tab's model view."""
        tracked_params = {n for n, _ in self._params}
        site_map: dict[str, list[dict]] = {}
        for s in sites:
            site_map.setdefault(s.module, []).append({"name": s.name, "type": s.type_name, "kind": s.kind})
        modules = []
        for name, m in self.model.named_modules():
            params = [
                {
                    "name": f"{name}.{pn}" if name else pn,
                    "shape": list(p.shape),
                    "numel": int(p.numel()),
                    "tracked": (f"{name}.{pn}" if name else pn) in tracked_params,
                }
                for pn, p in m.named_parameters(recurse=False)
            ]
            modules.append(
                {
                    "name": name,
                    "type": type(m).__name__,
                    "params": params,
                    "num_params": int(sum(p.numel() for p in m.parameters())),
                    "sites": site_map.get(name, []),
                }
            )
        return {"version": 1, "modules": modules}

    # ------------------------------------------------------ update ratio
    def _before_opt_step(self, optimizer, args, kwargs) -> None:
        if self._update_pending is None:
            return None
        try:
            params = [(n, p) for n, p in self._params if p.grad is not None]
            if self._snapshot is None or [n for n, _ in params] != [n for n, _ in self._snapshot_params]:
                self._snapshot = [torch.empty_like(reductions._local(p.detach())) for _, p in params]
                self._snapshot_params = params
            torch._foreach_copy_(self._snapshot, [reductions._local(p.detach()) for _, p in params])
        except Exception as e:
            self._update_pending = None
            self._report("update_ratio", e)
        return None

    def _after_opt_step(self, optimizer, args, kwargs) -> None:
        step, self._update_pending = self._update_pending, None
        if step is None or self._snapshot is None:
            return None
        try:
            current = [reductions._local(p.detach()) for _, p in self._snapshot_params]
            torch._foreach_sub_(self._snapshot, current)  # old - new, in the buffers
            device = self._out_device()
            delta = reductions.grouped_norms(self._snapshot, device)
            torch._foreach_add_(self._snapshot, current)  # back to old weights
            old = reductions.grouped_norms(self._snapshot, device)
            if any(hasattr(p, "to_local") for _, p in self._snapshot_params):
                delta, _, old = distributed.reduce_sharded_norms(delta, delta, old)
            ratio = delta / old.clamp_min(1e-30)
            self._update_result = (step, [n for n, _ in self._snapshot_params], ratio)
        except Exception as e:
            self._report("update_ratio", e)
        return None

    def _flush_update_ratio(self) -> None:
        result, self._update_result = self._update_result, None
        if result is None or self._sink is None:
            return
        step, names, ratio = result
        self._sink.write_vectors(step, [("update_ratio", names, (), ratio.cpu().numpy())])


def _to_float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _check_scalar(name: str, value: Any):
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{name} must be a scalar (one element), got a tensor of shape {tuple(value.shape)}"
            )
        if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must be a float tensor, got dtype {value.dtype}")
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a tensor or a number, got {type(value).__name__}")
    return float(value)


def _already_unscaled(scaler: Any, optimizer: torch.optim.Optimizer) -> bool:
    """Whether `scaler.unscale_(optimizer)` already ran for this step."""
    try:
        state = scaler._per_optimizer_states[id(optimizer)]
        return state["stage"].name == "UNSCALED"
    except Exception:
        return False
