"""How the C library's malloc treats the large blocks of a CPU training step.

glibc serves every allocation over 32 MB with a fresh ``mmap`` and hands it back to the kernel when it
is freed, so the next tensor of that size is page-faulted in again: about 12 ms for one of the paper
network's 37 MB conv1-stage activations at batch 32 on our benchmark machine, five times an elementwise
pass over it. Each training step allocates several such tensors afresh (the ReLU's, the LRN's and the
max-pool's outputs and gradients); torchvision's alexnet, with 64 instead of 96 conv1 channels, stays
under the line at batch 32 and pays none of it. Keeping freed memory for reuse is what jemalloc and
tcmalloc do, and what PyTorch's CPU performance guides recommend them for; ``keep_freed_memory`` asks
glibc for the same, the equivalent of ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647`` in the
environment. The process then keeps its peak memory until it exits. ``train.py`` does it for runs on
the CPU (``--keep_freed_memory false`` leaves malloc alone); BENCHMARKS.md has the figures.
"""

import ctypes
import platform

# mallopt parameters, from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to serve large blocks from its heap and never trim it (process-wide).

    Returns whether it took effect: False where the C library is not glibc (macOS, musl, Windows),
    where nothing changes.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    # no mmap per block: every block comes from the heap, so freed ones are reused, already mapped;
    # and the heap is never handed back (the largest value mallopt's int takes: 2 GiB of free top)
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
