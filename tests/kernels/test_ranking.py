"""Triton ranking vs the PyTorch reference: exact same indices, ties included."""
import pytest
import torch
import torch.nn.functional as F

from emloc_kernels import ranking
from emloc_kernels.ranking import rank_tokens, rank_tokens_reference, smooth_scores_reference


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Make torch.empty return poisoned memory, so that any element the kernels leave
    unwritten (outputs or the internal rank buffer) shows up as a wrong index."""
    real_empty = torch.empty

    def empty(*size, **kwargs):
        return real_empty(*size, **kwargs).fill_(-7)

    monkeypatch.setattr(torch, "empty", empty)


def make_scores(heads, length, kind, generator):
    """Non-zero score patterns: continuous, few distinct values (many ties), all equal."""
    if kind == "random":
        return torch.rand(heads, length, generator=generator) * 3 + 0.01
    if kind == "ties":
        return torch.randint(1, 4, (heads, length), generator=generator).float() * 0.25
    return torch.full((heads, length), 0.7)  # "constant": ties everywhere but at the ends


def check_against_reference(scores, protected, ks, **kwargs):
    expected = rank_tokens_reference(scores, protected, ks, **kwargs)
    got = rank_tokens(scores, protected, ks, backend="triton", **kwargs)
    assert len(got) == len(ks)
    for k, want, have in zip(ks, expected, got):
        assert have.dtype == torch.int64 and have.shape == (scores.shape[0], k)
        assert torch.equal(have, want), f"k={k}"
    return got


@pytest.mark.parametrize("heads,length,ks", [
    (1, 1, [1]),
    (4, 5, [1, 2, 3, 4, 5]),
    (4, 37, [3, 7, 18, 37]),
    (1, 130, [13, 26, 65]),
    (2, 257, [25, 51, 128, 257]),
])
@pytest.mark.parametrize("kind", ["random", "ties", "constant"])
def test_matches_reference(poisoned_empty, heads, length, ks, kind):
    generator = torch.Generator().manual_seed(heads * 1000 + length)
    scores = make_scores(heads, length, kind, generator)
    protected = torch.rand(length, generator=generator) < 0.15
    got = check_against_reference(scores, protected, ks)
    for idx in got:  # position order, no repeats
        assert bool((idx[:, 1:] > idx[:, :-1]).all())


@pytest.mark.parametrize("kind", ["random", "ties"])
def test_selection_over_several_blocks(poisoned_empty, monkeypatch, kind):
    """Chunks longer than one selection block (SELECT_BLOCK_MAX positions, 1024 in use) are
    scanned block by block; shrink the block so that a small chunk takes five."""
    monkeypatch.setattr(ranking, "SELECT_BLOCK_MAX", 16)
    generator = torch.Generator().manual_seed(5)
    scores = make_scores(2, 75, kind, generator)
    protected = torch.rand(75, generator=generator) < 0.1
    check_against_reference(scores, protected, [1, 16, 17, 40, 75])


def test_protected_always_kept_first():
    generator = torch.Generator().manual_seed(1)
    scores = torch.rand(4, 90, generator=generator)
    protected = torch.zeros(90, dtype=torch.bool)
    protected[[0, 1, 44, 45, 46, 89]] = True
    got = check_against_reference(scores, protected, [6, 9, 45])
    assert torch.equal(got[0], protected.nonzero()[:, 0].expand(4, -1))
    for idx in got[1:]:
        assert bool(protected[idx].sum(dim=1).eq(6).all())


@pytest.mark.parametrize("kind", ["ties", "constant"])
def test_all_protected_and_custom_pool(kind):
    generator = torch.Generator().manual_seed(2)
    scores = make_scores(3, 41, kind, generator)
    check_against_reference(scores, torch.ones(41, dtype=torch.bool), [4, 20, 41])
    check_against_reference(scores, torch.rand(41, generator=generator) < 0.3, [4, 20, 41],
                            pool_width=3, bonus=2.5)
    check_against_reference(scores, torch.zeros(41, dtype=torch.bool), [7, 40], pool_width=1)


def test_ties_go_to_lower_position():
    scores = torch.ones(1, 12)  # smoothed: 0.6, 0.8, 1, ..., 1, 0.8, 0.6
    got = rank_tokens(scores, torch.zeros(12, dtype=torch.bool), [3, 9, 10], backend="triton")
    assert got[0].tolist() == [[2, 3, 4]]
    assert got[1].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9]]
    assert got[2].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]


def test_half_precision_scores_and_strided_input():
    generator = torch.Generator().manual_seed(3)
    base = torch.rand(40, 4, generator=generator)  # scores = base.T: [4, 40], stride (1, 4)
    protected = torch.rand(40, generator=generator) < 0.2
    check_against_reference(base.T, protected, [4, 8, 20])
    check_against_reference(base.T.half(), protected, [4, 8, 20])


def test_reference_smoothing_equals_avg_pool1d():
    generator = torch.Generator().manual_seed(4)
    scores = torch.randn(4, 301, generator=generator) * 10
    protected = torch.rand(301, generator=generator) < 0.2
    pooled = F.avg_pool1d(scores[:, None, :], 5, stride=1, padding=2,
                          count_include_pad=True)[:, 0, :]
    expected = pooled + 100.0 * protected.float()
    assert torch.equal(smooth_scores_reference(scores, protected), expected)


def test_empty_ks_or_heads():
    assert rank_tokens(torch.rand(2, 9), torch.zeros(9, dtype=torch.bool), [],
                       backend="triton") == []
    (got,) = rank_tokens(torch.rand(0, 9), torch.zeros(9, dtype=torch.bool), [4],
                         backend="triton")
    assert got.shape == (0, 4) and got.dtype == torch.int64


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", [
    "k_zero", "k_too_big", "k_float", "scores_1d", "scores_int", "protected_float",
    "protected_length", "pool_even", "pool_zero",
])
def test_invalid_input_raises(backend, case):
    scores, protected, ks, pool = torch.rand(2, 10) + 0.1, torch.zeros(10, dtype=torch.bool), [3], 5
    if case == "k_zero":
        ks = [3, 0]
    elif case == "k_too_big":
        ks = [11]
    elif case == "k_float":
        ks = [2.0]
    elif case == "scores_1d":
        scores = scores[0]
    elif case == "scores_int":
        scores = torch.ones(2, 10, dtype=torch.int64)
    elif case == "protected_float":
        protected = protected.float()
    elif case == "protected_length":
        protected = torch.zeros(9, dtype=torch.bool)
    elif case == "pool_even":
        pool = 4
    elif case == "pool_zero":
        pool = 0
    with pytest.raises(ValueError):
        rank_tokens(scores, protected, ks, pool_width=pool, backend=backend)
