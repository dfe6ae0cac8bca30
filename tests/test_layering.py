"""The model layer imports neither the export layer nor the training layer (issue 18: the import circle
llava.export → builder → stage3 → llava.export, and stage3 → llava.train.param_groups → builder).

A fresh interpreter imports every llava/model module in turn and records which export or training
modules each import added to `sys.modules` (a module imported earlier is cached, so whatever pulled an
upper-layer module in is the module named); an AST scan also catches imports inside functions.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_MODULES = sorted(
    f"llava.model.{p.stem}" if p.stem != "__init__" else "llava.model"
    for p in (ROOT / "llava" / "model").glob("*.py")
)
UPPER_LAYERS = ("llava.export", "llava.train")

CHECK = """
import importlib, json, sys
upper = lambda: {m for m in sys.modules if m.startswith(("llava.export", "llava.train"))}
pulled = {}
for name in sys.argv[1:]:
    before = upper()
    importlib.import_module(name)
    pulled[name] = sorted(upper() - before)
print(json.dumps(pulled))
"""


def test_model_modules_import_no_export_or_training_module():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", CHECK, *MODEL_MODULES],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    pulled = json.loads(result.stdout.splitlines()[-1])
    assert set(pulled) == set(MODEL_MODULES)
    assert {name: mods for name, mods in pulled.items() if mods} == {}


def test_model_sources_name_no_export_or_training_module():
    offenders = []
    for path in sorted((ROOT / "llava" / "model").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            offenders += [f"{path.name}:{node.lineno} {n}" for n in names if n.startswith(UPPER_LAYERS)]
    assert offenders == []
