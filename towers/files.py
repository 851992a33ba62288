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


def append_jsonl(path, record: dict) -> None:
    """Append ``record`` to a JSON-lines file as one whole line, in one write, flushed to the disk.

    A line left cut short by a process killed while appending (no newline at the end of the file)
    is ended first, so the new record starts a line of its own and the reader skips only the cut one
    (:func:`read_jsonl`) instead of reading the two run together as one broken line.
    """
    line = (json.dumps(record, allow_nan=False) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        view = memoryview(line)
        while view:  # one write for a regular file; the loop only if the system splits it
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def scan_jsonl(path) -> tuple[list[dict], list[str]]:
    """The records of a JSON-lines file, and what was skipped: one ``line N (why)`` per line that is
    not a whole JSON object (cut short by a killed process, or damaged). Empty lines are ignored."""
    records, broken = [], []
    lines = Path(path).read_bytes().split(b"\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:  # the last piece has no newline after it: a write that did not finish
            broken.append(f"line {i + 1} ({'cut short' if i == len(lines) - 1 else 'not a JSON object'})")
    return records, broken


def read_jsonl(path) -> list[dict]:
    """The records of a JSON-lines file that is appended to (:func:`append_jsonl`). A line that is not
    a whole record is skipped, and the lines skipped are counted and named in one warning, so one
    line cut by a killed process costs that line, not the file."""
    records, broken = scan_jsonl(path)
    if broken:
        warnings.warn(
            f"{shown_path(path)}: skipped {len(broken)} broken line{'s' * (len(broken) > 1)}: {', '.join(broken)}",
            stacklevel=2,
        )
    return records
