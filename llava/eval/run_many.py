"""Evaluate several checkpoints with lmms-eval's own CLI in one process (imports paid once).

``python -m llava.eval.run_many --output_root DIR NAME=CHECKPOINT... -- LMMS_EVAL_ARGS...`` runs, for
each checkpoint, exactly what ``python -m lmms_eval --model pivot --model_args pretrained=CHECKPOINT,...
LMMS_EVAL_ARGS --output_path DIR/NAME --log_samples`` runs (lmms-eval's ``cli_evaluate`` with that
command line, the pivot adapter found through its entry point), one after the other in this process.
Importing lmms-eval and torch costs more CPU than evaluating a tiny model on the miniature's world
benchmark, so the demo (scripts/demo.sh) evaluates its checkpoints this way. As the CLI exits 0
even when an evaluation fails, each run must leave ``DIR/NAME/<model>/*_results.json`` or this fails
naming the checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from llava.eval import LMMS_EVAL_MODEL_ID


def _named(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=CHECKPOINT")
    if "," in path:
        raise argparse.ArgumentTypeError(f"{path}: lmms-eval's --model_args cannot carry a comma")
    return name, Path(path)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(
        prog="python -m llava.eval.run_many", description=__doc__.splitlines()[0]
    )
    parser.add_argument("checkpoints", nargs="+", type=_named, help="NAME=CHECKPOINT pairs")
    parser.add_argument("--output_root", required=True, type=Path, help="results go to OUTPUT_ROOT/NAME")
    parser.add_argument("--model_args", default="device=cpu", help="extra --model_args after pretrained=")
    args = parser.parse_args(own)
    names = [name for name, _ in args.checkpoints]
    if len(set(names)) != len(names):
        parser.error(f"names must be unique, got {names}")
    for _, path in args.checkpoints:
        if not (path / "config.json").is_file():
            parser.error(f"{path}: not a checkpoint directory (no config.json)")

    from lmms_eval.__main__ import cli_evaluate

    for name, path in args.checkpoints:
        out = args.output_root / name
        command = ["lmms_eval", "--model", LMMS_EVAL_MODEL_ID]
        command += ["--model_args", f"pretrained={path.resolve()},{args.model_args}".rstrip(",")]
        command += [*extra, "--output_path", str(out), "--log_samples"]
        print(f"[run_many] {' '.join(command)}", flush=True)
        saved, sys.argv = sys.argv, command
        try:
            cli_evaluate()
        finally:
            sys.argv = saved
        if not any(out.glob("*/*_results.json")):
            raise SystemExit(f"{path}: lmms-eval wrote no results under {out} (see the log above)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
