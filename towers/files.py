"""Files written so that a reader, or a process killed half-way, never sees half of one."""

import json
import os
import warnings
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path):
    """A temporary name beside ``path`` to write to; renamed onto ``path`` only if the block succeeds.

    The name carries the process id, so DDP ranks or parallel sweep runs never share a temporary file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path, data: str | bytes) -> None:
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)


def read_jsonl(path) -> list[dict]:
    """The records of a JSON-lines file that is appended to; a last line cut short by a killed
    process is dropped with a warning, a bad line anywhere else is an error."""
    records = []
    lines = Path(path).read_text().splitlines()
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not JSON") from None
            warnings.warn(f"{path}: dropping the last line, cut short ({len(line)} characters)")
    return records
