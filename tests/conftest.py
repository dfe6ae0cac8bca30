"""Shared pytest fixtures: offline environment and the tiny presets, written once per session.

`make test` runs the suite on two pytest-xdist workers with `--dist loadfile` (a worker runs all the tests of
a module, so module fixtures are built once); session fixtures are built once per worker, except the smoke
demo (tests/demo_fixture.py), which the workers share.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Directory with every tiny preset from `python -m llava.tiny` (LLM + all vision towers)."""
    from llava.tiny import write_tiny_presets

    out = tmp_path_factory.mktemp("tiny")
    write_tiny_presets(out)
    return out
