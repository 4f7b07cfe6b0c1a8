"""`Series`, what the rules read (defined beside the contract: `reading` builds it without loading the rules)."""

from tb_diag_plugin.series import Series

__all__ = ["Series"]
