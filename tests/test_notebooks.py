"""The analysis notebooks (analysis/notebooks/*.ipynb) run top to bottom on the outputs of a tiny run.

Each notebook is executed with nbclient in a fresh `python3` kernel of this interpreter (jupyter_client
starts the kernel spec's `python` as `sys.executable`), with `PIVOT_RUN_DIR` pointing at the smoke demo
that tests/test_demo.py also checks (one demo per session, tests/demo_fixture.py); any cell error fails
the test with the cell's traceback. The committed notebooks must carry no outputs and no absolute paths.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import demo_fixture
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "analysis" / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = {
    "01_probe_exported_encoder",
    "02_gradcam_sample",
    "03_alignment",
    "04_benchmark_tables",
}
CELL_TIMEOUT_S = 300
# Checked before the demo fixture runs, so a missing package skips at once (pip install nbclient ipykernel).
MISSING = [name for name in ("nbformat", "nbclient", "ipykernel") if importlib.util.find_spec(name) is None]

demo_dir = demo_fixture.demo_dir  # the session fixture, shared with test_demo.py through a module cache


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def test_every_notebook_is_there_without_outputs_or_absolute_paths():
    assert {path.stem for path in NOTEBOOKS} == EXPECTED
    absolute = re.compile(r"""["'](/(?:tmp|home|root|work|Users)/|[A-Za-z]:\\)""")
    for path in NOTEBOOKS:
        code = [cell for cell in _cells(path) if cell["cell_type"] == "code"]
        assert code, path.name
        for cell in code:
            assert cell["outputs"] == [] and cell["execution_count"] is None, f"{path.name}: stored outputs"
            source = "".join(cell["source"])
            assert not absolute.search(source), f"{path.name}: absolute path in\n{source}"
        setup = "".join(code[0]["source"])
        assert 'os.environ.get("PIVOT_RUN_DIR", "runs/demo")' in setup, (
            f"{path.name}: first cell reads PIVOT_RUN_DIR"
        )


@pytest.mark.slow
@pytest.mark.skipif(
    bool(MISSING), reason=f"executing notebooks needs {MISSING}: pip install nbformat nbclient ipykernel"
)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_runs_top_to_bottom_on_the_demo_outputs(path, demo_dir):
    import nbclient
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    # Without MPLBACKEND (conftest sets Agg) the kernel draws with its inline backend, as for a user.
    env = {key: value for key, value in os.environ.items() if key != "MPLBACKEND"}
    env["PIVOT_RUN_DIR"] = str(demo_dir)
    # The smoke data are tiny: threaded BLAS only adds synchronisation (5x slower logistic-regression fits
    # measured on 2 busy cores). Torch keeps its own thread setting.
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    client = nbclient.NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    client.execute(env=env)  # raises CellExecutionError with the failing cell's traceback
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    shown = [o for o in outputs if o.output_type in ("display_data", "execute_result")]
    assert any("image/png" in o.data for o in shown), f"{path.name} showed no figure"
