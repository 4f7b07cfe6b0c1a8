"""The module tree, written once per run (and again when new activation sites appear) for the tab's model view."""

from __future__ import annotations

from typing import Any, Sequence

from torch import nn


def module_tree(model: nn.Module, tracked_params: set[str], sites: Sequence[Any]) -> dict:
    """Qualified names, types, parameter shapes and counts, and the activation sites of each module.

    `tracked_params` are the parameter names that diagnostics cover (after
    include/exclude); `sites` are activation sites (with `name`, `type_name`,
    `kind` and the `module` that ran them).
    """
    site_map: dict[str, list[dict]] = {}
    for s in sites:
        site_map.setdefault(s.module, []).append({"name": s.name, "type": s.type_name, "kind": s.kind})
    modules = []
    for name, m in model.named_modules():
        params = []
        for pn, p in m.named_parameters(recurse=False):
            full = f"{name}.{pn}" if name else pn
            params.append(
                {"name": full, "shape": list(p.shape), "numel": int(p.numel()), "tracked": full in tracked_params}
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
    return {"version": 1, "modules": modules}
