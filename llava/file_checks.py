"""Reading files so that every error names the file (issue 15): JSON documents and safetensors headers.

A parser traceback (`JSONDecodeError: Expecting value: line 1 column 1`, safetensors' `Error while
deserializing header: MetadataIncompleteBuffer`) says what is wrong but not where. `read_json` and
`check_safetensors` raise `FileFormatError` (a ValueError) with the path, what the file was read as,
and the parser's reason. `check_safetensors` reads only the header (8-byte length + JSON) and the file
size: a file cut short by an interrupted copy or save is found without loading a tensor.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any


class FileFormatError(ValueError):
    """A file that cannot be read as what it should be."""

    def __init__(self, path: str | Path, what: str, reason: str) -> None:
        self.path = str(path)
        super().__init__(f"{path}: not a readable {what} ({reason}).")


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """The parsed JSON document at `path`; a missing, unreadable or malformed file names itself."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FileFormatError(path, what, f"{type(error).__name__}: {error}") from error


def check_safetensors(path: str | Path) -> None:
    """Raise `FileFormatError` unless `path` has a complete safetensors header and every tensor's bytes."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise FileFormatError(path, "safetensors file", f"{size} bytes, shorter than the header length")
        (length,) = struct.unpack("<Q", prefix)
        if 8 + length > size:
            raise FileFormatError(
                path, "safetensors file", f"header of {length} bytes but the file has {size}"
            )
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise FileFormatError(path, "safetensors file", f"corrupt header: {error}") from error
    try:
        ends = [int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"]
    except (AttributeError, KeyError, TypeError, IndexError, ValueError) as error:
        raise FileFormatError(path, "safetensors file", f"malformed header entry: {error!r}") from error
    needed = 8 + length + max(ends, default=0)
    if needed > size:
        raise FileFormatError(
            path, "safetensors file", f"truncated: its tensors need {needed} bytes, the file has {size}"
        )


def check_safetensors_in(directory: str | Path) -> None:
    """`check_safetensors` on every *.safetensors file of a directory."""
    for file in sorted(Path(directory).glob("*.safetensors")):
        check_safetensors(file)
