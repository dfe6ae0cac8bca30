"""Stage 3 from a checkpoint source: its encoder is exported to a staging folder and moved into place only
once the data has been answered (issue 15, "refuse, don't guess").

`--stage3_source` may be an export (used as it is) or a Stage-2 checkpoint, whose encoder llava.export
`resolve_source` exports to OUTPUT_DIR/stage3_source_export. The data view and the model build read that
export, but a run refused by its data must leave a fresh OUTPUT_DIR as it was (llava.train.preflight). So
each process exports the source into its own staging folder, `OUTPUT_DIR/.stage3_source_export.staging-<rank>`
(the same filesystem, so the move is a rename), the data is answered from it, and then the main process
moves its copy to OUTPUT_DIR/stage3_source_export (replacing one an earlier attempt left) while the other
processes wait (`main_process_first`) and drop theirs. A failure before that removes the staging folder.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llava.export import SOURCE_EXPORT_DIR, resolve_source


def is_export(source: str | Path) -> bool:
    return (Path(source) / "export.json").exists()


def staging_dir(output_dir: str | Path, process_index: int) -> Path:
    """This process's staging folder for the source export (inside OUTPUT_DIR, hidden)."""
    return Path(output_dir) / f".{SOURCE_EXPORT_DIR}.staging-{process_index}"


@contextmanager
def staged_source_export(source: str, output_dir: str | Path, process_index: int) -> Iterator[Path]:
    """The export directory of `source`: the source itself when it is an export, else this process's staged
    export of it (removed when the block is left; `commit_source_export` moves it into place first)."""
    if is_export(source):
        yield Path(source)
        return
    staging = staging_dir(output_dir, process_index)
    shutil.rmtree(staging, ignore_errors=True)  # a killed earlier attempt's copy
    staging.mkdir(parents=True)
    try:
        yield resolve_source(source, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def commit_source_export(source: str, staged: Path, output_dir: str | Path, train_args) -> Path:
    """Move the main process's staged export to OUTPUT_DIR/stage3_source_export; every process returns it.

    An export given as the source is returned unchanged."""
    if is_export(source):
        return Path(source)
    target = Path(output_dir) / SOURCE_EXPORT_DIR
    with train_args.main_process_first(local=False, desc="moving the Stage-3 source export into OUTPUT_DIR"):
        if train_args.process_index == 0:
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staged, target)
    return target
