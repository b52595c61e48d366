"""Tests of the buffer VAE (torchrl_hippo/modules/compression.py)."""

import math

import pytest
import torch

from torchrl_hippo.modules.compression import BufferVAE, ELBOTerms


@pytest.mark.parametrize("batch", [(), (3,), (2, 5)])
@pytest.mark.parametrize("slots,embed_dim,latent_dim", [(4, 3, 2), (8, 6, 5)])
def test_shapes(batch, slots, embed_dim, latent_dim):
    vae = BufferVAE(slots, embed_dim, latent_dim, hidden_dim=16)
    buffer = torch.randn(*batch, slots, embed_dim)
    mean, log_var = vae.encode(buffer)
    assert mean.shape == log_var.shape == (*batch, latent_dim)
    assert torch.equal(vae(buffer), mean)
    assert vae.decode(mean).shape == buffer.shape


def test_elbo_terms_are_consistent():
    vae = BufferVAE(4, 3, 2, hidden_dim=16, beta=0.5)
    buffer = torch.randn(7, 4, 3)
    terms = vae.elbo(buffer, sample=False)
    assert isinstance(terms, ELBOTerms)
    mean, log_var = vae.encode(buffer)
    sse = (vae.decode(mean) - buffer).pow(2).sum((-2, -1))
    kl = 0.5 * (mean.pow(2) + log_var.exp() - 1 - log_var).sum(-1)
    torch.testing.assert_close(terms.loss, ((sse + 0.5 * kl) / 12).mean())
    torch.testing.assert_close(terms.reconstruction, (sse / 12).mean())
    torch.testing.assert_close(terms.kl, kl.mean())
    spread = (buffer - buffer.mean(0)).pow(2).sum()
    torch.testing.assert_close(terms.relative_error, sse.sum() / spread)
    assert terms.kl >= 0
    single = vae.elbo(buffer[:1], sample=False)
    torch.testing.assert_close(single.relative_error, sse[0] / buffer[0].pow(2).sum())


@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_relative_error_ignores_content_shared_by_all_buffers(offset):
    # A decoder that always outputs the batch mean explains none of what sets buffers apart:
    # its relative error is 1, however large the content that all buffers share.
    vae = BufferVAE(4, 3, 2, hidden_dim=16)
    buffer = torch.randn(6, 4, 3) + offset
    with torch.no_grad():
        vae.decoder[-1].weight.zero_()
        vae.decoder[-1].bias.copy_(buffer.mean(0).flatten())
    assert vae.elbo(buffer, sample=False).relative_error == pytest.approx(1.0, rel=1e-4)


def test_training_lowers_the_reconstruction_error():
    vae = BufferVAE(4, 3, 6, hidden_dim=32, beta=1e-3)
    buffers = torch.randn(32, 4, 3)
    optimizer = torch.optim.Adam(vae.parameters(), lr=3e-3)
    before = vae.elbo(buffers, sample=False).relative_error
    for _ in range(300):
        optimizer.zero_grad()
        vae.elbo(buffers).loss.backward()
        optimizer.step()
    after = vae.elbo(buffers, sample=False).relative_error
    assert after < 0.25 * before


@pytest.mark.parametrize(
    "error,direction", [(0.5, -1), (0.1, 0), (0.001, 1)], ids=["poor", "on-target", "good"]
)
def test_adapt_beta_direction(error, direction):
    vae = BufferVAE(4, 3, 2, beta=1.0, beta_rate=0.1)
    vae.adapt_beta(error)
    expected = math.exp(0.1 * math.log(0.1 / error))
    assert vae.beta == pytest.approx(expected, rel=1e-5)
    assert (vae.beta > 1.0) - (vae.beta < 1.0) == direction


def test_adapt_beta_stays_within_bounds():
    vae = BufferVAE(4, 3, 2, beta=1.0, beta_rate=1.0, beta_bounds=(0.1, 2.0))
    for _ in range(20):
        vae.adapt_beta(100.0)
    assert vae.beta == pytest.approx(0.1)
    for _ in range(20):
        vae.adapt_beta(1e-6)
    assert vae.beta == pytest.approx(2.0)


def test_state_dict_round_trip():
    vae = BufferVAE(4, 3, 2, hidden_dim=8)
    vae.adapt_beta(0.9)
    other = BufferVAE(4, 3, 2, hidden_dim=8)
    other.load_state_dict(vae.state_dict())
    assert other.beta == pytest.approx(vae.beta)
    buffer = torch.randn(5, 4, 3)
    torch.testing.assert_close(other(buffer), vae(buffer))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(slots=0), ValueError, "slots must be a positive int"),
        (dict(embed_dim=2.0), TypeError, "embed_dim must be an int"),
        (dict(latent_dim=-1), ValueError, "latent_dim"),
        (dict(beta=0.0), ValueError, "beta must be a finite number > 0"),
        (dict(beta=20.0), ValueError, "within beta_bounds"),
        (dict(target_error=float("nan")), ValueError, "target_error"),
        (dict(beta_bounds=(1.0,)), TypeError, "beta_bounds"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    args = dict(slots=4, embed_dim=3, latent_dim=2) | kwargs
    with pytest.raises(error, match=match):
        BufferVAE(**args)


@pytest.mark.parametrize(
    "buffer,error,match",
    [
        (torch.randn(2, 4, 5), ValueError, r"expected shape \[\*B, slots=4, embed_dim=3\]"),
        (torch.randn(3), ValueError, "expected shape"),
        (torch.ones(2, 4, 3, dtype=torch.long), TypeError, "floating-point"),
    ],
)
def test_bad_buffers(buffer, error, match):
    vae = BufferVAE(4, 3, 2)
    with pytest.raises(error, match=match):
        vae(buffer)
