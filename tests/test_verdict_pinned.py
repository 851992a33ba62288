"""towers.verdict gives, bit for bit, what it gave before its permutation loop was made faster: the
fields below were computed by the code of commit 85339ba on these inputs (tests/fixtures/verdict_pinned.json)
and are compared with ==, floats included."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from towers.reference import paper_kernels
from towers.verdict import verdict

PINNED = json.loads((Path(__file__).parent / "fixtures" / "verdict_pinned.json").read_text())


def cases() -> dict:
    k = paper_kernels().astype(np.float64)
    g = np.random.default_rng(7)
    four = g.standard_normal((4, 24, 3, 11, 11))  # tower 1 grey, 2 greyish, 3 colour, 4 random
    four[0] = g.standard_normal((24, 1, 11, 11)) * np.ones((1, 3, 1, 1)) + 0.2 * four[0]
    four[1] = g.standard_normal((24, 1, 11, 11)) * np.ones((1, 3, 1, 1)) + 0.5 * four[1]
    four[2] = four[2] * np.array([1, -1, 0.3]).reshape(1, 3, 1, 1)
    initial = g.standard_normal(four.shape) * 0.5
    return {
        "paper": dict(kernels=k, seed=0),  # Figure 3, 9,999 permutations, margin by majority
        "paper_seed3": dict(kernels=k, seed=3, permutations=999),
        "four": dict(kernels=four, seed=1),  # not specialised: the margin's upper-bound path
        "four_init": dict(kernels=four, initial=initial, seed=2, permutations=1999),
        "control": dict(kernels=four[2:3], seed=0, control_groups=3, permutations=999),
        "paper_control": dict(kernels=k[1:2], seed=5, permutations=999),
        "paper_flat": dict(
            kernels=k.reshape(-1, 3, 11, 11), towers=np.repeat(["b", "a"], 48), seed=4, permutations=999
        ),
    }


@pytest.mark.parametrize("name", sorted(cases()))
def test_verdict_fields_are_the_pinned_ones(name):
    result = verdict(**cases()[name]).to_dict()
    pinned = PINNED[name]
    assert set(pinned) >= {"verdict", "p_delta_f", "p_eta2", "margin", "kernel_class"}
    for field, expected in pinned.items():
        assert result[field] == expected, field


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_count_is_restored_and_does_not_matter(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result = verdict(paper_kernels().astype(np.float64), permutations=999, seed=3).to_dict()
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    assert {f: result[f] for f in PINNED["paper_seed3"]} == PINNED["paper_seed3"]
