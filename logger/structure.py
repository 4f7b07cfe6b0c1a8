"""The module tree, written once per run (and again when new activation sites appear) for the tab's model view."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from tb_diag_logger.collectors.optim_state import optimizer_doc, optimizer_params
from tb_diag_plugin import metadata


def module_tree(
    model: nn.Module,
    tracked_params: set[str],
    sites: Sequence[Any],
    optimizer: Optional[torch.optim.Optimizer] = None,
) -> dict:
    """Qualified names, types, parameter shapes and counts, and the activation sites of each module;
    the optimizer's class and per-group hyper-parameters (``"optimizer"``, None without one).

    `tracked_params` are the parameter names that diagnostics cover (after
    include/exclude); `sites` are activation sites (with `name`, `type_name`,
    `kind` and the `module` that ran them). Each parameter says whether it
    `requires_grad` and whether it is `in_optimizer` (None without an
    optimizer), so that frozen-on-purpose parameters can be told apart.
    """
    held = optimizer_params(optimizer)
    site_map: dict[str, list[dict]] = {}
    for s in sites:
        site_map.setdefault(s.module, []).append({"name": s.name, "type": s.type_name, "kind": s.kind})
    modules = []
    for name, m in model.named_modules():
        params = []
        for pn, p in m.named_parameters(recurse=False):
            full = f"{name}.{pn}" if name else pn
            params.append(
                {
                    "name": full, "shape": list(p.shape), "numel": int(p.numel()), "tracked": full in tracked_params,
                    "requires_grad": bool(p.requires_grad), "in_optimizer": None if held is None else id(p) in held,
                }
            )
        modules.append(
            {
                "name": name,
                "type": type(m).__name__,
                "params": params,
                "num_params": int(sum(p.numel() for p in m.parameters())),
                "sites": site_map.get(name, []),
            }
        )
    return {"version": metadata.STRUCTURE_VERSION, "modules": modules, "optimizer": optimizer_doc(optimizer, model)}
