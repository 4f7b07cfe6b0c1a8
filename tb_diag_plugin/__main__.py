"""`python -m tb_diag_plugin` is `tb-diag`."""

import sys

from tb_diag_plugin.cli import main

sys.exit(main())
