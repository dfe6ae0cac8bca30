"""The smoke-scale main job (`scripts/demo.sh`, DEMO_SCALE=smoke), run once per pytest session.

`demo_dir` (session scope) runs the whole miniature pipeline into a temporary directory and returns it.
Test modules import the fixture (`from demo_fixture import demo_dir`); pytest registers an imported
fixture once per module, so the result is kept in a module-level cache and the demo runs only once even
when several modules (tests/test_demo.py, tests/test_notebooks.py) use it. Under pytest-xdist (`make test`
runs two workers) those modules may run on different workers: the first to need the demo runs it into the
session's shared temporary root, holding a file lock, and the other waits for it and reuses its output.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock

REPO = Path(__file__).resolve().parents[1]
DEMO_TIMEOUT_S = 1500

_DEMOS: dict[str, Path] = {}


def run_smoke_demo(out: Path) -> Path:
    """Run scripts/demo.sh at smoke scale into `out` with this interpreter; fail with its output tail."""
    env = dict(os.environ, DEMO_SCALE="smoke", DEMO_DIR=str(out), PYTHON=sys.executable)
    result = subprocess.run(
        ["bash", "scripts/demo.sh"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"Report: {out}/report/report.md" in result.stdout
    return out


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """Output directory of the smoke demo (tiny/, world/, data/, stage*/, results/, report/)."""
    if "smoke" not in _DEMOS:
        shared = tmp_path_factory.getbasetemp()
        if "PYTEST_XDIST_WORKER" in os.environ:
            shared = shared.parent  # this session's root, above every worker's own basetemp
        out, done = shared / "smoke_demo" / "run", shared / "smoke_demo.done"
        with FileLock(str(shared / "smoke_demo.lock")):
            if not done.exists():
                out.parent.mkdir(exist_ok=True)
                run_smoke_demo(out)
                done.touch()
        _DEMOS["smoke"] = out
    return _DEMOS["smoke"]
