"""scripts/demo.sh deletes only a directory it made: any other non-empty DEMO_DIR is refused untouched."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_refuses_a_non_empty_directory_it_did_not_make(tmp_path):
    precious = tmp_path / "my_runs"
    precious.mkdir()
    (precious / "results.json").write_text("{}")
    env = dict(os.environ, DEMO_SCALE="smoke", DEMO_DIR=str(precious), PYTHON=sys.executable)
    done = subprocess.run(["bash", "scripts/demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 2
    assert "refusing to delete it" in done.stderr and str(precious) in done.stderr
    assert sorted(p.name for p in precious.iterdir()) == ["results.json"]
