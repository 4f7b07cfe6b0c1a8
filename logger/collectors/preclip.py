"""`grad_norm_preclip`: the global gradient norm before clipping, as given to `step(grad_norm=)`."""

from __future__ import annotations

from typing import Optional

import torch

from tb_diag_logger import reductions
from tb_diag_logger.collectors import Collector, Part
from tb_diag_logger.collectors.losses import LossLike
from tb_diag_plugin import metadata


class PreclipNorm(Collector):
    """Holds the value of the current `step()` call (checked there) until the logged step gathers it."""

    def __init__(self) -> None:
        self.value: Optional[LossLike] = None

    def parts(self, step: int) -> list[Part]:
        v = self.value
        if v is None:
            return []
        # As given: it is the global norm already (no reduction over ranks).
        t = torch.as_tensor(reductions._local(v) if torch.is_tensor(v) else v)
        return [Part(metadata.GRAD_NORM_PRECLIP, [""], t.reshape(1).to(self.ctx.device, torch.float32))]

    def clear(self) -> None:
        self.value = None  # nothing of a step outlives it
