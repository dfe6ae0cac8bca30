"""One flag spelling across the analysis CLIs (issue 15): every option has its underscore spelling
(transformers' style: --out_dir, --num_samples, --train_data), and the older hyphen spellings still parse
to the same values."""

from __future__ import annotations

import argparse
import importlib

import pytest

CLIS = (
    "alignment",
    "benchmarks",
    "features",
    "gradcam",
    "gradcam_metrics",
    "linear_probe",
    "report",
    "seg_probe",
    "summary",
)


class Parsed(Exception):
    """Raised instead of running the CLI: carries its parser, or the parsed namespace."""


def _parser(module: str, monkeypatch) -> argparse.ArgumentParser:
    monkeypatch.setattr(
        argparse.ArgumentParser, "parse_args", lambda self, *a, **k: (_ for _ in ()).throw(Parsed(self))
    )
    with pytest.raises(Parsed) as caught:
        importlib.import_module(f"analysis.{module}").main([])
    return caught.value.args[0]


@pytest.mark.parametrize("module", CLIS)
def test_every_option_has_an_underscore_spelling(module, monkeypatch):
    parser = _parser(module, monkeypatch)
    for action in parser._actions:
        longs = [s[2:] for s in action.option_strings if s.startswith("--")]
        if longs and longs != ["help"]:
            assert "-" not in longs[0], (
                f"analysis.{module}: {action.option_strings} leads with a hyphen spelling"
            )


@pytest.mark.parametrize(
    ("module", "pairs"),
    [
        (
            "linear_probe",
            {"--train_data": "--train-data", "--run_names": "--run-names", "--cache_dir": "--cache-dir"},
        ),
        ("seg_probe", {"--num_qualitative": "--n-qualitative", "--png_dir": "--png-dir"}),
        ("features", {"--batch_size": "--batch-size", "--feature_points": "--feature-points"}),
        ("alignment", {"--out_dir": "--output_dir"}),
        ("benchmarks", {"--out_dir": "--out-dir"}),
        ("report", {"--lmms_eval": "--lmms-eval", "--caveat_file": "--caveat-file"}),
    ],
)
def test_old_spellings_are_aliases(module, pairs, monkeypatch):
    options = _parser(module, monkeypatch)._option_string_actions
    for new, old in pairs.items():
        assert options[new] is options[old], (new, old)
