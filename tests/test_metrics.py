"""Tests of torchrl_hippo.metrics."""

import pytest
import torch

from torchrl_hippo.metrics import effective_rank, mean_pairwise_cosine


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
