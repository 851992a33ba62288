import platform
import subprocess
import sys
from pathlib import Path

from towers.allocator import keep_freed_memory

ROOT = Path(__file__).resolve().parents[1]

# Eight "steps" that each allocate, write and free three 64 MB tensors, as a training step does with
# its largest activations; prints the page faults of each step.
STEPS = """
import resource, sys, torch
from towers.allocator import keep_freed_memory
if sys.argv[1] == "kept":
    assert keep_freed_memory()
def step():
    a = torch.empty(2**24).fill_(1.0); b = torch.empty(2**24).fill_(2.0); c = a + b
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults_per_step(mode: str) -> list[int]:
    result = subprocess.run(
        [sys.executable, "-c", STEPS, mode], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    return [int(line) for line in result.stdout.split()]


def test_kept_memory_is_reused_instead_of_page_faulted_in_again():
    if platform.libc_ver()[0] != "glibc":  # macOS, musl, Windows: nothing to change, and it says so
        assert not keep_freed_memory()
        return
    pages = 3 * 2**26 // 4096  # the three tensors' 4 KiB pages
    default, kept = faults_per_step("default"), faults_per_step("kept")
    assert all(f >= 0.9 * pages for f in default[-3:]), default  # every step maps its tensors afresh
    assert sum(kept[-3:]) < 0.01 * pages, kept  # once the heap has grown, steps reuse it
