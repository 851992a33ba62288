"""Files written so that a reader, or a process killed half-way, never sees half of one."""

import errno
import json
import os
import warnings
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path):
    """A temporary name beside ``path`` to write to; renamed onto ``path`` only if the block succeeds.

    The name carries the process id, so DDP ranks or parallel sweep runs never share a temporary file.
    A write error without a file name (a ``write`` on a full disk) is raised again naming ``path``,
    so the one line a user sees says which file could not be written.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as error:
        if error.filename is None and error.errno is not None:
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path, data: str | bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data if isinstance(data, bytes) else data.encode())
            f.flush()
            os.fsync(f.fileno())  # the rename below must not reach the disk before the data


def allocate(path, shown=None) -> None:
    """Reserve the disk blocks of the whole file ``path`` (as long as it now is), so that a full disk
    is an OSError naming it (or ``shown``, the name it will have) now rather than a SIGBUS when a memory map of it is written later.
    Where the system has no ``posix_fallocate`` (macOS, Windows) this does nothing."""
    if not hasattr(os, "posix_fallocate"):
        return
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as error:
            if error.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # a file system that cannot (some network ones)
                return
            raise OSError(error.errno, error.strerror, str(shown or path)) from None


def shown_path(path) -> str:
    """``path`` as one printable line: bytes that are not UTF-8 as ``\\xff``, tabs and newlines as ``\\t``, ``\\n``
    (a name on a disk may hold any byte but ``/`` and NUL)."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return text.replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


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
            warnings.warn(f"{path}: dropping the last line, cut short ({len(line)} characters)", stacklevel=2)
    return records
