"""Evaluate several checkpoints with lmms-eval's own CLI in one process (imports paid once).

``python -m llava.eval.run_many --output_root DIR NAME=CHECKPOINT... -- LMMS_EVAL_ARGS...`` runs, for
each checkpoint, exactly what ``python -m lmms_eval --model pivot --model_args pretrained=CHECKPOINT,...
LMMS_EVAL_ARGS --output_path DIR/NAME --log_samples`` runs (lmms-eval's ``cli_evaluate`` with that
command line, the pivot adapter found through its entry point), one after the other in this process.
Importing lmms-eval and torch costs more CPU than evaluating a tiny model on the miniature's world
benchmark, so the demo (scripts/demo.sh) evaluates its checkpoints this way. As the CLI exits 0
even when an evaluation fails, each run must leave ``DIR/NAME/<model>/*_results.json`` or this fails
naming the checkpoint.

``--local_tasks_only`` indexes only the ``--include_path`` tasks: lmms-eval's CLI builds a ``TaskManager``
over its ~1,900 built-in task YAMLs for every run (about 10 CPU s each: two smoke-demo checkpoints took 41.4
CPU s without the flag and 22.2 with it, on an idle machine, results identical) and has no switch for the
manager's ``include_defaults=False``, so this sets it for the runs of this process. A task not under ``--include_path`` is then not found and the
run fails, as lmms-eval fails on any unknown task name.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

from llava.eval import LMMS_EVAL_MODEL_ID


def _named(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=CHECKPOINT")
    if "," in path:
        raise argparse.ArgumentTypeError(f"{path}: lmms-eval's --model_args cannot carry a comma")
    return name, Path(path)


@contextmanager
def local_tasks_only() -> Iterator[None]:
    """lmms-eval's CLI, while this is open, indexes only the tasks under --include_path."""
    import lmms_eval.__main__ as cli
    from lmms_eval.tasks import TaskManager

    def without_defaults(*args, **kwargs) -> TaskManager:
        return TaskManager(*args, **{**kwargs, "include_defaults": False})

    cli.TaskManager = without_defaults
    try:
        yield
    finally:
        cli.TaskManager = TaskManager


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
    parser.add_argument(
        "--local_tasks_only",
        action="store_true",
        help="index only the --include_path tasks, not lmms-eval's built-in ones (saves ~10 CPU s per run)",
    )
    args = parser.parse_args(own)
    names = [name for name, _ in args.checkpoints]
    if len(set(names)) != len(names):
        parser.error(f"names must be unique, got {names}")
    for _, path in args.checkpoints:
        if not (path / "config.json").is_file():
            parser.error(f"{path}: not a checkpoint directory (no config.json)")
    if args.local_tasks_only and not any(a.partition("=")[0] == "--include_path" for a in extra):
        parser.error("--local_tasks_only needs lmms-eval's --include_path after --: it would find no tasks")

    from lmms_eval.__main__ import cli_evaluate

    with local_tasks_only() if args.local_tasks_only else nullcontext():
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
