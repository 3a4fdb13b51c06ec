"""
noise.py -- EDM noise for the mask tokens' position embeddings of predictor N.

Paper Sec. 3.1 (Eq. 3): x_sigma = x_0 + n, n ~ N(0, sigma^2 I) ("variance exploding", EDM, Karras et
al. 2022). Sec. 4.2: "we follow the default parameters of EDM (P_mean = -1.2, P_std = 1.2,
sigma_data = 0.5)". EDM's training distribution of noise levels is log-normal:
    ln(sigma) ~ N(P_mean, P_std^2)        (EDM Table 1, "training": sigma = exp(P_mean + P_std * xi))
Alg. 1 line 12 instead writes n ~ N(0, sigma_data^2 I). SPEC section 2 settles it: the default is the
log-normal sigma (`--noise-dist lognormal`); `--noise-dist fixed` is the literal Alg. 1 reading,
sigma = sigma_data = 0.5.

Noise levels (Sec. 4.5 "Multi-level noise schedule", Table 3, Table 5a):
  multi : an independent sigma and noise draw for each of the L target blocks (paper default)
  single: one sigma and one noise vector per image, shared by its L blocks
  none  : no noise (predictor N then sees the same input as predictor C)
"""
import torch

P_MEAN, P_STD, SIGMA_DATA = -1.2, 1.2, 0.5  # EDM defaults, paper Sec. 4.2


def sample_sigma(shape, p_mean=P_MEAN, p_std=P_STD, generator=None, device=None):
    """Log-normal noise levels: sigma = exp(p_mean + p_std * xi), xi ~ N(0, 1) (EDM Table 1).
    Median exp(-1.2) = 0.30; mean exp(p_mean + p_std^2 / 2) = 0.62."""
    xi = torch.randn(shape, generator=generator, device=device)
    return torch.exp(p_mean + p_std * xi)


def sample_noise(batch_size, n_targets, n_tokens, dim, level="multi", dist="lognormal",
                 generator=None, device=None, sigma_max=None):
    """Noise for the mask tokens' position embeddings: returns (noise [B, L, Nt, P], sigma [B, L]).

    level: "multi" (per block), "single" (per image, shared by its blocks), "none" (zeros).
    dist:  "lognormal" (EDM training sigmas) or "fixed" (sigma = sigma_data = 0.5, Alg. 1 line 12).
    sigma_max: clip sigma to at most this (None: no bound, the paper). An ablation (SPEC section 2,
        `--sigma-max`): the sin-cos position embedding has RMS 1/sqrt(2) = 0.71, and about 6 % of
        log-normal draws exceed sigma = 2, where the noise drowns the position entirely.
    All draws use `generator`, which must live on `device` (train.py seeds one per step).
    """
    B, L = batch_size, n_targets
    if level == "none":
        return torch.zeros(B, L, n_tokens, dim, device=device), torch.zeros(B, L, device=device)
    if level not in ("multi", "single"):
        raise ValueError(f"unknown noise level {level!r}; choose multi, single or none")
    draws = L if level == "multi" else 1
    if dist == "lognormal":
        sigma = sample_sigma((B, draws), generator=generator, device=device)  # [B, draws]
    elif dist == "fixed":
        sigma = torch.full((B, draws), SIGMA_DATA, device=device)
    else:
        raise ValueError(f"unknown noise distribution {dist!r}; choose lognormal or fixed")
    if sigma_max is not None:
        sigma = sigma.clamp(max=sigma_max)
    eps = torch.randn(B, draws, n_tokens, dim, generator=generator, device=device)  # eps ~ N(0, I)
    noise = sigma[:, :, None, None] * eps  # n = sigma * eps ~ N(0, sigma^2 I)  (Eq. 3)
    noise, sigma = noise.expand(B, L, n_tokens, dim), sigma.expand(B, L)  # single: shared by blocks
    return noise, sigma
