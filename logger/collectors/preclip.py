"""`grad_norm_preclip`: the global gradient norm before clipping, as given to `step(grad_norm=)`."""

from __future__ import annotations

import torch

from tb_diag_logger import reductions
from tb_diag_logger.collectors import Collector, Part
from tb_diag_plugin import metadata


class PreclipNorm(Collector):
    """The `grad_norm=` of the current `step()` call (checked there, in `ctx.grad_norm`), as given."""

    def parts(self, step: int) -> list[Part]:
        v = self.ctx.grad_norm
        if v is None:
            return []
        # As given: it is the global norm already (no reduction over ranks).
        t = torch.as_tensor(reductions._local(v) if torch.is_tensor(v) else v)
        return [Part(metadata.GRAD_NORM_PRECLIP, [""], t.reshape(1).to(self.ctx.device, torch.float32))]
