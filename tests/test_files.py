"""towers/files.py: appends to a history file are whole lines, and a reader skips (and reports) a cut one."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from towers.files import append_jsonl, read_jsonl, scan_jsonl


def test_an_append_after_a_cut_line_starts_a_line_of_its_own_and_the_reader_skips_only_the_cut_one(tmp_path):
    path = tmp_path / "bisection_history.jsonl"
    append_jsonl(path, {"step": 1})
    append_jsonl(path, {"step": 2})
    whole = path.read_bytes()
    assert whole == b'{"step": 1}\n{"step": 2}\n'
    with open(path, "ab") as f:  # what a process killed half-way through an append leaves
        f.write(b'{"step": 3, "statis')
    with pytest.warns(UserWarning, match=r"skipped 1 broken line: line 3 \(cut short\)"):
        assert [r["step"] for r in read_jsonl(path)] == [1, 2]
    append_jsonl(path, {"step": 4})  # the resumed run appends after it
    assert path.read_bytes() == whole + b'{"step": 3, "statis\n{"step": 4}\n'
    with pytest.warns(UserWarning, match=r"skipped 1 broken line: line 3 \(not a JSON object\)"):
        assert [r["step"] for r in read_jsonl(path)] == [1, 2, 4]
    # damage of other kinds: bytes that are not UTF-8, a JSON value that is not a record; counted
    with open(path, "ab") as f:
        f.write(b"\xff\xfe\n[1, 2]\n")
    records, broken = scan_jsonl(path)
    assert [r["step"] for r in records] == [1, 2, 4] and len(broken) == 3
    with pytest.raises(ValueError):  # NaN is not JSON: refused before anything is written
        append_jsonl(path, {"step": float("nan")})
    assert scan_jsonl(path) == (records, broken)


def test_a_killed_appender_never_costs_more_than_its_own_line(tmp_path):
    # a real kill: a child appends big records in a loop and is SIGKILLed at some point
    path = tmp_path / "history.jsonl"
    code = (
        "import sys; from towers.files import append_jsonl\n"
        "for i in range(100000): append_jsonl(sys.argv[1], {'step': i, 'pad': 'x' * 200000})\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code, str(path)], env=dict(os.environ))
    while not path.exists() or path.stat().st_size < 2_000_000:
        assert child.poll() is None
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    append_jsonl(path, {"step": -1})
    records, broken = scan_jsonl(path)
    steps = [r["step"] for r in records]
    assert steps[:-1] == list(range(len(steps) - 1)) and steps[-1] == -1  # every whole line, in order
    assert len(broken) <= 1  # at most the line being written when it was killed
    assert json.loads(path.read_bytes().splitlines()[-1]) == {"step": -1}
