"""Tests of torchrl_hippo.metrics."""

import pytest
import torch

from torchrl_hippo.metrics import (
    collapse_score,
    effective_rank,
    key_staleness,
    mean_pairwise_cosine,
    nn_return_consistency,
    retrieval_sharpness,
    reward_alignment,
    temporal_margin,
)


def reference_mean_pairwise_cosine(x):
    """Brute force: the full N x N cosine matrix, diagonal left out."""
    u = torch.nn.functional.normalize(x.double(), dim=-1)
    sims = u @ u.T
    n = x.shape[0]
    return (sims.sum() - sims.diagonal().sum()) / (n * (n - 1))


# ---------------------------------------------------------------------------- effective rank
@pytest.mark.parametrize("dim", [1, 4, 16, 64])
def test_effective_rank_of_identity_is_dim(dim):
    x = torch.eye(dim) if dim > 1 else torch.ones(2, 1)  # N >= 2 rows
    torch.testing.assert_close(effective_rank(x), torch.tensor(float(dim)))


@pytest.mark.parametrize(("n", "dim"), [(64, 8), (300, 32), (128, 128)])
def test_effective_rank_of_orthonormal_columns_is_dim(n, dim):
    q, _ = torch.linalg.qr(torch.randn(n, dim))
    torch.testing.assert_close(effective_rank(q * 3.0), torch.tensor(float(dim)))


@pytest.mark.parametrize(("n", "dim"), [(100, 16), (10, 64), (2, 3)])
def test_effective_rank_of_rank_one_is_one(n, dim):
    x = torch.randn(n, 1) * torch.randn(1, dim)
    assert abs(effective_rank(x).item() - 1.0) < 1e-3


@pytest.mark.parametrize("rank", [2, 5, 10])
def test_effective_rank_of_equal_singular_values_is_rank(rank):
    u, _ = torch.linalg.qr(torch.randn(50, rank))
    v, _ = torch.linalg.qr(torch.randn(20, rank))
    x = u @ v.T  # singular values: `rank` ones, then zeros
    assert abs(effective_rank(x).item() - rank) < 1e-3


def test_effective_rank_follows_the_formula():
    x = torch.randn(40, 12, dtype=torch.float64)
    s = torch.linalg.svdvals(x)
    p = s / s.sum()
    expected = torch.exp(-(p * p.log()).sum())
    torch.testing.assert_close(effective_rank(x), expected)


def test_effective_rank_is_scale_invariant_and_bounded():
    x = torch.randn(200, 24)
    value = effective_rank(x)
    torch.testing.assert_close(effective_rank(x * 1e3), value)
    assert 1.0 <= value.item() <= 24.0


def test_effective_rank_of_zeros_is_zero():
    assert effective_rank(torch.zeros(5, 3)).item() == 0.0


# ---------------------------------------------------------------------------- pairwise cosine
@pytest.mark.parametrize("n", [2, 3, 50])
def test_mean_pairwise_cosine_of_identical_rows_is_one(n):
    row = torch.randn(1, 7)
    x = row * torch.rand(n, 1).add(0.5)  # same direction, different positive lengths
    torch.testing.assert_close(mean_pairwise_cosine(x), torch.tensor(1.0))


@pytest.mark.parametrize("dim", [2, 8, 100])
def test_mean_pairwise_cosine_of_orthogonal_rows_is_zero(dim):
    q, _ = torch.linalg.qr(torch.randn(dim, dim))
    torch.testing.assert_close(mean_pairwise_cosine(q.T * 2.0), torch.tensor(0.0))


def test_mean_pairwise_cosine_of_opposite_rows():
    v = torch.randn(1, 5)
    torch.testing.assert_close(mean_pairwise_cosine(torch.cat([v, -v])), torch.tensor(-1.0))


@pytest.mark.parametrize(("n", "dim"), [(2, 3), (17, 8), (1000, 32), (4500, 8)])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_mean_pairwise_cosine_matches_brute_force(n, dim, offset):
    # 4500 rows is past the size where an N x N matrix is worth avoiding: the closed form that
    # never builds it must agree with the full matrix.
    x = torch.randn(n, dim) + offset
    torch.testing.assert_close(
        mean_pairwise_cosine(x).double(), reference_mean_pairwise_cosine(x), atol=1e-6, rtol=0
    )


def test_mean_pairwise_cosine_treats_zero_rows_as_orthogonal():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    # pairs: (0, 1) -> 1, pairs with the zero row -> 0; 2 of 6 ordered pairs are 1.
    torch.testing.assert_close(mean_pairwise_cosine(x), torch.tensor(1.0 / 3.0))


# ---------------------------------------------------------------------------- dtypes, inputs
@pytest.mark.parametrize("metric", [effective_rank, mean_pairwise_cosine])
@pytest.mark.parametrize(
    ("dtype", "out_dtype"),
    [
        (torch.float64, torch.float64),
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
    ],
)
def test_dtypes(metric, dtype, out_dtype):
    x = torch.randn(20, 6)
    out = metric(x.to(dtype))
    assert out.shape == ()
    assert out.dtype == out_dtype
    torch.testing.assert_close(out.double(), metric(x.double()), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("metric", [effective_rank, mean_pairwise_cosine])
def test_results_carry_no_gradient(metric):
    x = torch.randn(10, 4, requires_grad=True)
    assert not metric(x).requires_grad


@pytest.mark.parametrize("metric", [effective_rank, mean_pairwise_cosine])
@pytest.mark.parametrize(
    ("x", "error", "match"),
    [
        (torch.randn(5), ValueError, r"x must be 2-D"),
        (torch.randn(2, 3, 4), ValueError, r"x must be 2-D"),
        (torch.ones(4, 3, dtype=torch.long), ValueError, r"x must be a floating-point"),
        (torch.randn(1, 3), ValueError, r"x must hold at least 2 rows"),
        (torch.randn(3, 0), ValueError, r"x must hold at least 1 column"),
        ([[1.0, 0.0], [0.0, 1.0]], TypeError, r"x must be a torch.Tensor"),
    ],
    ids=["1d", "3d", "integer", "one_row", "no_column", "list"],
)
def test_bad_inputs(metric, x, error, match):
    with pytest.raises(error, match=match):
        metric(x)


# ---------------------------------------------------------------------------- key quality
def cosine_matrix(x):
    u = torch.nn.functional.normalize(x.double(), dim=-1)
    return u @ u.T


@pytest.mark.parametrize(("n", "dim"), [(2, 3), (30, 8), (8, 30)])
def test_collapse_score_follows_the_formula(n, dim):
    x = torch.randn(n, dim, dtype=torch.float64)
    r = min(n, dim)
    expected = (1 - (effective_rank(x) - 1) / (r - 1)).clamp(0, 1)
    torch.testing.assert_close(collapse_score(x), expected)


@pytest.mark.parametrize(
    ("x", "expected"),
    [
        (torch.eye(6), 0.0),
        (torch.ones(5, 3), 1.0),
        (torch.zeros(4, 3), 1.0),
        (torch.randn(7, 1), 1.0),  # one column: always a line
    ],
    ids=["identity", "one_direction", "zeros", "one_column"],
)
def test_collapse_score_extremes(x, expected):
    assert abs(collapse_score(x).item() - expected) < 1e-5


def brute_sharpness(x, k):
    sim = cosine_matrix(x)
    n = x.shape[0]
    sim.fill_diagonal_(-float("inf"))
    top = sim.topk(k, dim=1).values.mean(1)
    sim.fill_diagonal_(0.0)
    return (top - sim.sum(1) / (n - 1)).mean()


@pytest.mark.parametrize(("n", "dim", "k"), [(3, 4, 1), (50, 8, 5), (200, 16, 10)])
def test_retrieval_sharpness_matches_brute_force(n, dim, k):
    x = torch.randn(n, dim) + 0.3
    torch.testing.assert_close(
        retrieval_sharpness(x, k).double(), brute_sharpness(x, k), atol=1e-5, rtol=0
    )


def test_retrieval_sharpness_is_zero_for_collapsed_and_high_for_clusters():
    assert abs(retrieval_sharpness(torch.ones(20, 4), 3).item()) < 1e-6
    clusters = torch.eye(4).repeat_interleave(10, 0) + 0.01 * torch.randn(40, 4)
    assert retrieval_sharpness(clusters, 3).item() > 0.7


def test_retrieval_sharpness_with_duplicate_rows_keeps_k_neighbours():
    x = torch.cat([torch.eye(3), torch.eye(3)])  # each row has an exact duplicate
    torch.testing.assert_close(retrieval_sharpness(x, 2).double(), brute_sharpness(x, 2))


def brute_alignment(x, returns):
    sim = cosine_matrix(x)
    gap = -(returns.double()[:, None] - returns.double()[None, :]).abs()
    i, j = torch.triu_indices(x.shape[0], x.shape[0], 1)
    return torch.corrcoef(torch.stack([sim[i, j], gap[i, j]]))[0, 1]


@pytest.mark.parametrize("n", [3, 40])
def test_reward_alignment_matches_brute_force(n):
    x, returns = torch.randn(n, 6), torch.randn(n) * 3
    torch.testing.assert_close(reward_alignment(x, returns).double(), brute_alignment(x, returns))


def test_reward_alignment_signs():
    returns = torch.linspace(0, 1, 30)
    angle = returns * torch.pi / 2
    aligned = torch.stack([angle.cos(), angle.sin()], 1)  # keys rotate with the return
    assert reward_alignment(aligned, returns).item() > 0.9
    shuffled = returns[torch.randperm(30)]  # keys unrelated to the returns
    assert abs(reward_alignment(aligned, shuffled).item()) < 0.3
    assert torch.isnan(reward_alignment(aligned, torch.ones(30)))  # constant returns


def brute_consistency(x, returns, episodes, num_bins):
    sim = cosine_matrix(x)
    sim[episodes[:, None] == episodes[None, :]] = -float("inf")
    nearest = sim.argmax(1)
    edges = torch.quantile(returns.double(), torch.arange(1, num_bins).double() / num_bins)
    bins = torch.bucketize(returns.double(), edges)
    return (bins[nearest] == bins).float().mean()


@pytest.mark.parametrize("num_bins", [1, 2, 4])
@pytest.mark.parametrize("rows_per_episode", [1, 3, 10])
def test_nn_return_consistency_matches_brute_force(num_bins, rows_per_episode):
    n = 60
    x = torch.randn(n, 8)
    episodes = torch.arange(n) // rows_per_episode
    returns = torch.randn(n // rows_per_episode).repeat_interleave(rows_per_episode)
    torch.testing.assert_close(
        nn_return_consistency(x, returns, episodes, num_bins=num_bins),
        brute_consistency(x, returns, episodes, num_bins),
    )


def test_nn_return_consistency_ignores_same_episode_neighbours():
    # Two episodes of near-identical keys (same return inside each), far from each other.
    x = torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.01, 1.0]])
    episodes = torch.tensor([0, 0, 1, 1])
    returns = torch.tensor([0.0, 0.0, 1.0, 1.0])
    # Every nearest key of *another* episode has the other return.
    assert nn_return_consistency(x, returns, episodes, num_bins=2).item() == 0.0
    assert torch.isnan(nn_return_consistency(x, returns, torch.zeros(4, dtype=torch.long)))


def brute_margin(x, episodes, steps, radius):
    sim = cosine_matrix(x)
    out = []
    for i in range(x.shape[0]):
        same = episodes == episodes[i]
        near = same & ((steps - steps[i]).abs() <= radius)
        near[i] = False
        if near.any() and (~same).any():
            out.append(sim[i, near].mean() - sim[i, ~same].mean())
    return torch.stack(out).mean()


@pytest.mark.parametrize("radius", [1, 3])
def test_temporal_margin_matches_brute_force(radius):
    x = torch.randn(40, 5)
    episodes = torch.arange(40) // 8
    steps = torch.arange(40) % 8
    torch.testing.assert_close(
        temporal_margin(x, episodes, steps, radius=radius).double(),
        brute_margin(x, episodes, steps, radius),
    )


def test_temporal_margin_without_neighbours_is_nan():
    x = torch.randn(4, 3)
    assert torch.isnan(
        temporal_margin(x, torch.arange(4), torch.zeros(4, dtype=torch.long), radius=2)
    )


@pytest.mark.parametrize(
    ("versions", "version", "expected"), [([5, 5], 5, 0.0), ([0, 2, 4], 4, 2.0), ([-1, 3], 3, 2.0)]
)
def test_key_staleness(versions, version, expected):
    assert key_staleness(torch.tensor(versions), version).item() == expected
    assert key_staleness(torch.tensor(versions), torch.tensor(version)).item() == expected


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda: retrieval_sharpness(torch.randn(4, 3), 4),
            ValueError,
            r"k must be an int in \[1, N - 1\]",
        ),
        (
            lambda: reward_alignment(torch.randn(4, 3), torch.randn(3)),
            ValueError,
            r"returns must have shape",
        ),
        (
            lambda: reward_alignment(torch.randn(3, 3), torch.tensor([0.0, float("nan"), 1.0])),
            ValueError,
            r"returns holds NaN",
        ),
        (
            lambda: nn_return_consistency(torch.randn(3, 2), torch.randn(3), torch.rand(3)),
            TypeError,
            r"episodes must be an integer tensor",
        ),
        (
            lambda: nn_return_consistency(
                torch.randn(3, 2), torch.randn(3), torch.arange(3), num_bins=0
            ),
            ValueError,
            r"num_bins must be a positive int",
        ),
        (
            lambda: temporal_margin(torch.randn(3, 2), torch.arange(3), torch.arange(3), radius=0),
            ValueError,
            r"radius must be a positive int",
        ),
        (
            lambda: key_staleness(torch.tensor([]), 0),
            ValueError,
            r"key_version must be a non-empty",
        ),
        (lambda: collapse_score(torch.randn(1, 3)), ValueError, r"at least 2 rows"),
    ],
    ids=[
        "k_too_big",
        "returns_shape",
        "nan_return",
        "float_episodes",
        "bins",
        "radius",
        "empty_versions",
        "one_row",
    ],
)
def test_quality_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()
