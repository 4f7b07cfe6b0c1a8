"""tb_diag_logger: the training side of tb-diag.

    from tb_diag_logger import Diagnostics
    diag = Diagnostics(model, writer, every=20, optimizer=opt)
    ...
    diag.step(step, loss=loss, losses={"ce": ce, "l2": l2})
"""

from tb_diag_logger.cost import DiagnosticsCostWarning
from tb_diag_logger.diagnostics import DEFAULT_EVERY, Diagnostics, DiagnosticsWarning

__all__ = ["DEFAULT_EVERY", "Diagnostics", "DiagnosticsCostWarning", "DiagnosticsWarning"]
__version__ = "0.1.0"
