"""requirements.lock agrees with what the requirement files and setup.py ask for.

`make install` installs requirements.lock exactly (--no-deps), so a package that a requirement file or
setup.py needs but the lock lacks would be missing on a fresh machine, and a locked version outside a
requirement's range would install something the project never claimed to support.
"""

from __future__ import annotations

import runpy
from pathlib import Path
from unittest import mock

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENT_FILES = ["requirements.txt", "requirements-dev.txt", "requirements-eval.txt"]
# GPU-only packages: no CPU wheel exists, so they cannot be part of the CPU lock.
GPU_ONLY = {"flash-attn"}
NEVER_LOCKED = {"torchvision"}


def parse_lock(text: str) -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#")[0].strip()
        if not line:
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        if len(specs) != 1 or specs[0].operator != "==":
            raise ValueError(f"requirements.lock:{number}: {raw!r} is not an exact pin")
        name = canonicalize_name(req.name)
        if name in pins:
            raise ValueError(f"requirements.lock:{number}: {req.name} is locked twice")
        pins[name] = Version(specs[0].version)
    return pins


def requirement_lines(path: Path) -> list[str]:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def setup_requirements() -> list[str]:
    with mock.patch("setuptools.setup") as setup:
        runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    kwargs = setup.call_args.kwargs
    reqs = list(kwargs["install_requires"])
    for extra, extra_reqs in kwargs["extras_require"].items():
        reqs += [
            r for r in extra_reqs if extra != "gpu" or canonicalize_name(Requirement(r).name) not in GPU_ONLY
        ]
    return reqs


def disagreements(pins: dict[str, Version], requirements: list[tuple[str, str]]) -> list[str]:
    problems = []
    for source, line in requirements:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{source}: {line!r} is required but not in requirements.lock")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{source}: {line!r} excludes the locked {name}=={pins[name]}")
    return problems


def all_requirements() -> list[tuple[str, str]]:
    reqs = [(name, line) for name in REQUIREMENT_FILES for line in requirement_lines(ROOT / name)]
    return reqs + [("setup.py", line) for line in setup_requirements()]


def test_lock_covers_every_requirement_within_its_range():
    pins = parse_lock((ROOT / "requirements.lock").read_text())
    assert disagreements(pins, all_requirements()) == []


def test_lock_keeps_the_reasoned_pins():
    pins = parse_lock((ROOT / "requirements.lock").read_text())
    assert pins["torch"] == Version("2.13.0")
    assert not NEVER_LOCKED & set(pins)


def test_disagreements_are_found():
    pins = parse_lock("torch==2.13.0\nnumpy==2.4.6\n")
    problems = disagreements(
        pins, [("r.txt", "numpy==2.4.5"), ("r.txt", "scipy>=1"), ("r.txt", "torch>=2.13,<2.14")]
    )
    assert len(problems) == 2
    assert "excludes the locked numpy==2.4.6" in problems[0]
    assert "scipy>=1" in problems[1] and "not in requirements.lock" in problems[1]


def test_lock_refuses_ranges_and_duplicates():
    with pytest.raises(ValueError, match="not an exact pin"):
        parse_lock("numpy>=2\n")
    with pytest.raises(ValueError, match="locked twice"):
        parse_lock("numpy==2.4.6\nNumPy==2.4.6\n")
