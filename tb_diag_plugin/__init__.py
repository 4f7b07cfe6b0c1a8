"""tb_diag_plugin: the TensorBoard side of tb-diag (kept import-light: no torch)."""
