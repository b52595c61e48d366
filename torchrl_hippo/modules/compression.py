"""The VAE that compresses a buffer of step embeddings into one summary vector.

:class:`~torchrl_hippo.modules.HierarchicalMemory` hands it its immediate buffer (the last
``slots`` step embeddings, oldest first) each time the buffer has been filled anew; the posterior
mean becomes a short-term summary. The VAE is trained on its evidence lower bound (ELBO); its
``beta`` (the weight of the KL term) adapts to the reconstruction error, so the compression gets
stronger while reconstructions are good and weaker while they are poor.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from torchrl_hippo._checks import check_positive_int

__all__ = ["BufferVAE", "ELBOTerms"]


def _check_positive_float(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}.")
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value}.")
    return value


class ELBOTerms(NamedTuple):
    """The parts of :meth:`BufferVAE.elbo`, each a scalar tensor.

    Attributes:
        loss: ``(sse + beta * kl) / (slots * embed_dim)``, averaged over buffers: the negative
            ELBO per buffer element, to minimise.
        reconstruction: the mean squared reconstruction error per element.
        kl: ``KL(q(z | buffer) || N(0, I))`` summed over latent dims, averaged over buffers.
        relative_error: the fraction of the buffers' variance that the reconstructions miss,
            ``sum((x - x_hat) ** 2) / sum((x - mean(x)) ** 2)``, the mean taken over the batch
            of buffers element-wise (for a single buffer, ``sum(x ** 2)`` is the denominator).
            Content shared by every buffer does not count, so the error measures what sets
            buffers apart. :meth:`BufferVAE.adapt_beta` reads it.
    """

    loss: Tensor
    reconstruction: Tensor
    kl: Tensor
    relative_error: Tensor


class BufferVAE(nn.Module):
    """A VAE of ``[slots, embed_dim]`` buffers with a ``latent_dim`` Gaussian latent.

    The encoder is ``Linear(slots * embed_dim, hidden_dim) -> tanh -> Linear(hidden_dim,
    2 * latent_dim)`` on the flattened buffer (each slot position has its own weights), giving
    the posterior mean and log-variance; the decoder mirrors it. :meth:`forward` returns the
    posterior mean, a deterministic summary. :meth:`elbo` is the training objective, with a unit
    Gaussian likelihood and a standard normal prior.

    Adaptive compression: ``beta`` is a buffer. :meth:`adapt_beta` moves ``log(beta)`` by
    ``beta_rate * log(target_error / relative_error)``, clipped to ``beta_bounds``: while the
    relative reconstruction error is above ``target_error`` the KL weight falls (the summaries
    may carry more information); below it, the weight rises (they are compressed harder).

    Args:
        slots (int): buffer length (the memory's ``immediate_slots``).
        embed_dim (int): size of each buffered embedding.
        latent_dim (int, optional): size of a summary. Defaults to ``32``.

    Keyword Args:
        hidden_dim (int, optional): width of the encoder and decoder. Defaults to ``256``.
        beta (float, optional): initial KL weight. Defaults to ``1.0``.
        target_error (float, optional): the relative reconstruction error (see
            :class:`ELBOTerms`) that ``beta`` steers to. Defaults to ``0.1``.
        beta_rate (float, optional): step size of the ``log(beta)`` update. Defaults to ``0.05``.
        beta_bounds (tuple of float, optional): ``(min, max)`` of ``beta``.
            Defaults to ``(1e-3, 10.0)``.

    Examples:
        >>> import torch
        >>> from torchrl_hippo.modules.compression import BufferVAE
        >>> vae = BufferVAE(slots=8, embed_dim=4, latent_dim=3, hidden_dim=16)
        >>> buffers = torch.randn(5, 8, 4)
        >>> vae(buffers).shape
        torch.Size([5, 3])
        >>> terms = vae.elbo(buffers)
        >>> terms.loss.backward()
        >>> vae.decoder[-1].weight.grad is not None
        True
        >>> vae.adapt_beta(torch.tensor(1.0))  # error far above target_error: beta falls
        >>> vae.beta < 1.0
        True
    """

    def __init__(
        self,
        slots: int,
        embed_dim: int,
        latent_dim: int = 32,
        *,
        hidden_dim: int = 256,
        beta: float = 1.0,
        target_error: float = 0.1,
        beta_rate: float = 0.05,
        beta_bounds: tuple[float, float] = (1e-3, 10.0),
    ) -> None:
        super().__init__()
        self.slots = check_positive_int(slots, "slots")
        self.embed_dim = check_positive_int(embed_dim, "embed_dim")
        self.latent_dim = check_positive_int(latent_dim, "latent_dim")
        self.hidden_dim = check_positive_int(hidden_dim, "hidden_dim")
        beta = _check_positive_float(beta, "beta")
        self.target_error = _check_positive_float(target_error, "target_error")
        self.beta_rate = _check_positive_float(beta_rate, "beta_rate")
        if not isinstance(beta_bounds, (tuple, list)) or len(beta_bounds) != 2:
            raise TypeError(f"beta_bounds must be a (min, max) pair, got {beta_bounds!r}.")
        low = _check_positive_float(beta_bounds[0], "beta_bounds[0]")
        high = _check_positive_float(beta_bounds[1], "beta_bounds[1]")
        if not low <= beta <= high:
            raise ValueError(f"beta={beta} must lie within beta_bounds=({low}, {high}).")
        self.log_beta_bounds = (math.log(low), math.log(high))

        flat = self.slots * self.embed_dim
        self.encoder = nn.Sequential(
            nn.Linear(flat, hidden_dim), nn.Tanh(), nn.Linear(hidden_dim, 2 * latent_dim)
        )
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, hidden_dim), nn.Tanh(), nn.Linear(hidden_dim, flat)
        )
        self.register_buffer("log_beta", torch.tensor(math.log(beta)))

    @property
    def beta(self) -> float:
        """The current KL weight."""
        return float(self.log_beta.exp())

    def _check_buffer(self, buffer: Tensor) -> None:
        if not isinstance(buffer, Tensor) or not buffer.is_floating_point():
            raise TypeError("buffer must be a floating-point tensor [*B, slots, embed_dim].")
        if buffer.ndim < 2 or buffer.shape[-2:] != (self.slots, self.embed_dim):
            raise ValueError(
                f"buffer: expected shape [*B, slots={self.slots}, embed_dim={self.embed_dim}], "
                f"got {list(buffer.shape)}."
            )

    def encode(self, buffer: Tensor) -> tuple[Tensor, Tensor]:
        """Returns the posterior ``(mean, log_var)``, each ``[*B, latent_dim]``."""
        self._check_buffer(buffer)
        stats = self.encoder(buffer.flatten(-2))
        mean, log_var = stats.chunk(2, dim=-1)
        return mean, log_var.clamp(-10.0, 10.0)

    def decode(self, latent: Tensor) -> Tensor:
        """Maps ``[*B, latent_dim]`` latents to ``[*B, slots, embed_dim]`` buffers."""
        out = self.decoder(latent)
        return out.unflatten(-1, (self.slots, self.embed_dim))

    def forward(self, buffer: Tensor) -> Tensor:
        """The summary of ``buffer`` ``[*B, slots, embed_dim]``: its posterior mean."""
        return self.encode(buffer)[0]

    def elbo(self, buffer: Tensor, *, sample: bool = True) -> ELBOTerms:
        """The negative ELBO of a batch of buffers ``[N, slots, embed_dim]`` and its parts.

        Keyword Args:
            sample (bool, optional): decode a reparameterised sample (training); ``False``
                decodes the posterior mean. Defaults to ``True``.
        """
        mean, log_var = self.encode(buffer)
        latent = mean + torch.randn_like(mean) * (0.5 * log_var).exp() if sample else mean
        sse = (self.decode(latent) - buffer).pow(2).flatten(-2).sum(-1)
        kl = 0.5 * (mean.pow(2) + log_var.exp() - 1.0 - log_var).sum(-1)
        elements = self.slots * self.embed_dim
        loss = ((sse + self.log_beta.exp() * kl) / elements).mean()
        with torch.no_grad():
            spread = buffer - buffer.mean(0, keepdim=True) if buffer.shape[0] > 1 else buffer
            relative = sse.sum() / spread.pow(2).sum().clamp_min(1e-12)
        return ELBOTerms(loss, (sse / elements).mean(), kl.mean(), relative)

    @torch.no_grad()
    def adapt_beta(self, relative_error: Tensor | float) -> None:
        """Moves ``beta`` towards the value that keeps the relative error at ``target_error``."""
        error = torch.as_tensor(relative_error, dtype=self.log_beta.dtype).clamp_min(1e-8)
        step = self.beta_rate * torch.log(self.target_error / error)
        self.log_beta.copy_(
            (self.log_beta + step.to(self.log_beta.device)).clamp(*self.log_beta_bounds)
        )

    def extra_repr(self) -> str:
        return (
            f"slots={self.slots}, embed_dim={self.embed_dim}, latent_dim={self.latent_dim}, "
            f"beta={self.beta:.4g}, target_error={self.target_error}"
        )
