"""One `metrics.json` for a whole run directory: training curves and every analysis result.

`python -m analysis.summary RUN_DIR --out RUN_DIR/metrics.json` gathers
- `training`: for every sub-directory holding a `trainer_state.json` (written at the end of each
  `llava.train.train` run), its loss type, steps, first/last logged loss and the last logged value of
  every other metric (rewards/*, logps/*, samples/s, tokens/s);
- one section per results kind (docs/CONTRACTS.md §4: linear_probe, seg_probe, alignment, gradcam,
  benchmarks) found anywhere below RUN_DIR, with its rows (alignment matrices dropped for size); each
  row carries its file's top-level run labels (run, loss_type, vision_tower, llm, data_size, seed)
  unless it has its own (analysis/results_rows.py, as analysis.report reads them).
A section that has no input is listed under `missing`, so a consumer can tell "not run" from "empty".
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from analysis.results_rows import rows_with_file_labels
from llava.file_checks import read_json

logger = logging.getLogger(__name__)

RESULT_KINDS = ("linear_probe", "seg_probe", "alignment", "gradcam")


def training_section(run_dir: Path) -> dict[str, dict]:
    runs = {}
    for state_file in sorted(run_dir.rglob("trainer_state.json")):
        if "checkpoint-" in state_file.parent.name:
            continue
        state = read_json(state_file, "trainer state")
        history = [entry for entry in state.get("log_history", []) if "loss" in entry]
        args_file = state_file.parent / "training_args.json"
        loss_type = (
            read_json(args_file, "training arguments").get("loss_type") if args_file.exists() else None
        )
        last = history[-1] if history else {}
        runs[str(state_file.parent.relative_to(run_dir))] = {
            "loss_type": loss_type,
            "global_step": state.get("global_step"),
            "first_loss": history[0]["loss"] if history else None,
            "last_loss": last.get("loss"),
            "last_logged": {k: v for k, v in last.items() if k not in ("loss", "step", "epoch")},
        }
    return runs


def results_sections(run_dir: Path) -> dict[str, list[dict]]:
    sections: dict[str, list[dict]] = {}
    for path in sorted(run_dir.rglob("*.json")):
        try:
            payload = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            logger.warning(
                "%s is not valid JSON (%s): not summarised; if it is a results file, rerun its step",
                path,
                err,
            )
            continue
        if not isinstance(payload, dict) or payload.get("kind") not in RESULT_KINDS + ("benchmarks",):
            continue
        rows = [
            {k: v for k, v in row.items() if k != "matrix"} for row in rows_with_file_labels(path, payload)
        ]
        sections.setdefault(payload["kind"], []).extend(rows)
    return sections


def summarize(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    summary = {"run_dir": str(run_dir), "training": training_section(run_dir)}
    summary.update(results_sections(run_dir))
    expected = ("training",) + RESULT_KINDS
    summary["missing"] = [name for name in expected if not summary.get(name)]
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", help="directory holding training runs and analysis results")
    parser.add_argument("--out", required=True, help="metrics JSON to write")
    args = parser.parse_args(argv)
    summary = summarize(args.run_dir)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    if summary["missing"]:
        raise SystemExit(f"{args.out}: sections without input: {summary['missing']}")


if __name__ == "__main__":
    main()
