"""What each side imports: the writer without torch, TensorBoard's start-up without torch or the rules.

Each check runs in a fresh interpreter (a subprocess), so that what this test process has
imported already does not hide an import.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np

from tb_diag_plugin import metadata


def _python(code: str) -> str:
    """Run `code` in a fresh interpreter; its stdout (fails with its stderr)."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_a_run_is_written_without_importing_torch(tmp_path):
    """`tb_diag_plugin.summary` writes a whole run (vectors, structure, a user's scalar) in a process that
    never imports torch; what it wrote reads back, through TensorBoard's own loader, as given."""
    out = _python(f"""
        import json, sys
        import numpy as np
        from tb_diag_plugin.summary import EventWriter
        with EventWriter({str(tmp_path / "run")!r}) as w:
            for step in range(3):
                w.write_vectors(step, [("loss", ["total", "ce"], (), np.array([step, -step], np.float32)),
                                       ("grad_norm", ["a.weight"], (), np.array([step / 4], np.float32))])
            w.write_structure(0, {{"version": 1, "modules": [{{"name": "a", "type": "Linear", "params": [],
                                                              "sites": []}}]}})
            w.add_scalar("user/loss", 0.5, 2)
        print(json.dumps(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))))
    """)
    assert json.loads(out.splitlines()[-1]) == []

    from tb_diag_plugin.reading import LocalReader

    reader = LocalReader(str(tmp_path))
    series = reader.series("run")
    assert series["loss"].layers == ["total", "ce"] and series["loss"].steps.tolist() == [0, 1, 2]
    np.testing.assert_array_equal(series["loss"].values, [[0, 0], [1, -1], [2, -2]])
    np.testing.assert_array_equal(series["grad_norm"].values[:, 0], [0, 0.25, 0.5])
    assert reader.structure("run")["modules"][0]["type"] == "Linear"


def test_tensorboard_start_up_loads_neither_torch_nor_the_rules(tmp_path):
    """What TensorBoard imports for the tab when it starts: the `tensorboard_plugins` entry point's
    loader, its flags and the plugin it makes, inside a real TensorBoard app; then the modules loaded."""
    out = _python(f"""
        import json, sys
        from importlib.metadata import entry_points
        from tensorboard import program
        from tensorboard.plugins.core import core_plugin

        (ep,) = [e for e in entry_points(group="tensorboard_plugins") if e.name == "diagnostics"]
        loader = ep.load()()
        tb = program.TensorBoard(plugins=[core_plugin.CorePluginLoader(), loader])
        tb.configure(argv=["", "--logdir", {str(tmp_path)!r}, "--port", "0", "--host", "127.0.0.1",
                           "--load_fast", "false"])
        server = tb._make_server()
        server.server_close()
        print(json.dumps(sorted(sys.modules)))
    """)
    loaded = json.loads(out.splitlines()[-1])
    assert "tb_diag_plugin.diagnostics_plugin" in loaded  # the test looked where the plugin was made
    assert not [m for m in loaded if m == "torch" or m.startswith("torch.")]
    assert not [m for m in loaded if m.startswith("tb_diag_plugin.findings") or m.startswith("tb_diag_logger")]
    assert "plotly" not in loaded


def test_reading_does_not_import_the_findings():
    out = _python("""
        import json, sys
        import tb_diag_plugin.reading
        print(json.dumps(sorted(m for m in sys.modules if m.startswith("tb_diag_plugin"))))
    """)
    assert not [m for m in json.loads(out.splitlines()[-1]) if m.startswith("tb_diag_plugin.findings")]


def test_the_logger_writes_what_the_contract_encodes(tmp_path):
    """The logger's sink (through a SummaryWriter) and the torch-free writer encode the same step into the
    same tags, metadata and values."""
    from tensorboard.backend.event_processing import event_file_loader
    from torch.utils.tensorboard import SummaryWriter

    from tb_diag_logger.summaries import SummarySink
    from tb_diag_plugin.summary import EventWriter

    items = [("loss", [metadata.TOTAL_LOSS], (), np.array([1.5], np.float32)),
             ("act_mean", ["a.relu()"], ["F.relu"], np.array([0.25], np.float32))]
    sw = SummaryWriter(str(tmp_path / "torch"))
    SummarySink(sw).write_vectors(3, items)
    sw.close()
    with EventWriter(str(tmp_path / "plain")) as w:
        w.write_vectors(3, items)

    def values(run):
        import glob

        (path,) = glob.glob(str(tmp_path / run / "events.out.tfevents.*"))
        out = []
        for ev in event_file_loader.EventFileLoader(path).Load():
            for v in ev.summary.value:
                out.append((ev.step, v.tag, v.metadata.SerializeToString(), v.tensor.SerializeToString()))
        return out

    assert values("torch") == values("plain") and len(values("plain")) == 2
