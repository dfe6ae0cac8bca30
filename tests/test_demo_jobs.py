"""scripts/demo.sh's job queue: at most DEMO_JOBS stages at once, pwait returns only after every one has
ended, and a failed stage stops the script (the functions are taken from demo.sh itself)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

DEMO = Path(__file__).resolve().parents[1] / "scripts" / "demo.sh"


def _queue_functions() -> str:
    text = DEMO.read_text()
    start = text.index("DEMO_JOBS=${DEMO_JOBS:-2}")
    end = re.search(r"^pwait\(\) \{.*?^\}\n", text[start:], flags=re.S | re.M).end()
    return text[start : start + end]


def _run(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    script = tmp_path / "queue.sh"
    # run_stage NAME SECONDS [STATUS]: note when it runs, sleep, end with STATUS.
    stage = (
        'run_stage() { echo "start $1" >> "$LOG"; sleep "$2"; echo "end $1" >> "$LOG"; return "${3:-0}"; }\n'
    )
    script.write_text("set -euo pipefail\n" + _queue_functions() + stage + body)
    env = {"PATH": "/usr/bin:/bin", "LOG": str(tmp_path / "log"), "DEMO_JOBS": "2"}
    return subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)


def _events(tmp_path: Path) -> list[tuple[str, str]]:
    return [tuple(line.split()) for line in (tmp_path / "log").read_text().splitlines()]


def test_pwait_waits_for_every_job_and_at_most_demo_jobs_run(tmp_path):
    body = "".join(f"pstage j{i} {s}\n" for i, s in enumerate((1.0, 0.2, 0.2, 0.6, 0.8)))
    body += 'pwait\necho "after pwait" >> "$LOG"\n'
    done = _run(tmp_path, body)
    assert done.returncode == 0, done.stderr
    events = _events(tmp_path)
    assert events[-1] == ("after", "pwait")
    running, most = 0, 0
    for kind, _ in events[:-1]:
        running += 1 if kind == "start" else -1
        most = max(most, running)
    assert running == 0 and most == 2
    assert sorted(name for kind, name in events if kind == "end") == [f"j{i}" for i in range(5)]


def test_a_failed_stage_stops_the_queue(tmp_path):
    body = "pstage bad 0.1 3\npstage a 0.5\n" + "".join(f"pstage late{i} 0.1\n" for i in range(3))
    body += 'pwait\necho "after pwait" >> "$LOG"\n'
    done = _run(tmp_path, body)
    assert done.returncode == 1
    assert ("after", "pwait") not in _events(tmp_path)
