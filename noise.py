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
import math

import torch

P_MEAN, P_STD, SIGMA_DATA = -1.2, 1.2, 0.5  # EDM defaults, paper Sec. 4.2


def sample_sigma(shape, p_mean=P_MEAN, p_std=P_STD, generator=None, device=None):
    """Log-normal noise levels: sigma = exp(p_mean + p_std * xi), xi ~ N(0, 1) (EDM Table 1).
    Median exp(-1.2) = 0.30; mean exp(p_mean + p_std^2 / 2) = 0.62."""
    xi = torch.randn(shape, generator=generator, device=device)
    return torch.exp(p_mean + p_std * xi)


def sample_noise(batch_size, n_targets, n_tokens, dim, level="multi", dist="lognormal",
                 generator=None, device=None, sigma_max=None, p_mean=P_MEAN, p_std=P_STD):
    """Noise for the mask tokens' position embeddings: returns (noise [B, L, Nt, P], sigma [B, L]).

    level: "multi" (per block), "single" (per image, shared by its blocks), "none" (zeros).
    dist:  "lognormal" (EDM training sigmas) or "fixed" (sigma = sigma_data = 0.5, Alg. 1 line 12).
    p_mean, p_std: the log-normal's parameters (Sec. 4.2: EDM's -1.2 / 1.2; `--p-mean --p-std`).
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
        sigma = sample_sigma((B, draws), p_mean, p_std, generator=generator, device=device)  # [B, draws]
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


# ---------------------------------------------------------------------------------------------
# How much of the position the noise hides (SPEC 2, "noise scale vs width")
# ---------------------------------------------------------------------------------------------
# The same sigma hides more at a narrow predictor. A noisy psi_i + sigma * eps lands nearer psi_j than
# psi_i when eps's component along psi_j - psi_i (an N(0, 1) whatever the width) exceeds
# |psi_j - psi_i| / (2 sigma), and that distance grows with sqrt(width) (each frequency adds its share).
# So what the noise does is measured at the run's own width and grid, not read off sigma alone.
def sigma_stats(dist="lognormal", p_mean=P_MEAN, p_std=P_STD, sigma_max=None):
    """(median sigma, E[sigma^2]) of the noise levels, exact. Log-normal: median exp(p_mean), E[sigma^2]
    = exp(2 p_mean + 2 p_std^2) (EDM's -1.2 / 1.2: 0.30 and 1.6); clipped at c = sigma_max:
    E[min(sigma, c)^2] = exp(2 m + 2 s^2) Phi((ln c - m - 2 s^2) / s) + c^2 (1 - Phi((ln c - m) / s))."""
    if dist == "fixed":
        s = SIGMA_DATA if sigma_max is None else min(SIGMA_DATA, sigma_max)
        return s, s * s
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))
    power = math.exp(2 * p_mean + 2 * p_std ** 2)
    if sigma_max is None:
        return math.exp(p_mean), power
    if p_std == 0:
        s = min(math.exp(p_mean), sigma_max)
        return s, s * s
    lc = math.log(sigma_max)
    power = power * phi((lc - p_mean - 2 * p_std ** 2) / p_std) + sigma_max ** 2 * (1 - phi((lc - p_mean) / p_std))
    return min(math.exp(p_mean), sigma_max), power


@torch.no_grad()
def placed_fraction(dim, grid, dist="lognormal", p_mean=P_MEAN, p_std=P_STD, sigma_max=None, draws=40_000, seed=0):
    """The share of mask tokens whose noisy position embedding psi_i + sigma * eps (Eq. 3) is still
    nearest (L2) to its own clean embedding psi_i among all grid x grid positions of the predictor's
    sin-cos table (model.sincos_pos_embed_2d at width `dim`): 1.0 at sigma = 0, about 1 / grid^2 when
    the noise drowns the position. Each draw: a uniform position, a sigma from the run's distribution
    and eps ~ N(0, I). Its own generator: no training stream is touched. EDM's sigmas (Sec. 4.2):
    0.75 at width 96 on 8x8 (vit_tiny 64/8), 0.86 at width 384 on 14x14 (the paper's ViT-B/16)."""
    from model import sincos_pos_embed_2d
    g = torch.Generator().manual_seed(seed)
    pos = sincos_pos_embed_2d(dim, grid, grid)  # [N, P]
    idx = torch.randint(0, len(pos), (draws,), generator=g)  # [M]
    placed = 0
    for i in range(0, draws, 4096):
        j = idx[i:i + 4096]
        # the run's own noise: one block of one token per draw, sigma from `dist` (clipped at sigma_max)
        n, _ = sample_noise(len(j), 1, 1, dim, "multi", dist, generator=g, sigma_max=sigma_max, p_mean=p_mean, p_std=p_std)
        noisy = pos[j] + n[:, 0, 0]  # [m, P]
        placed += (torch.cdist(noisy, pos).argmin(1) == j).sum().item()  # nearest clean position is its own
    return placed / draws


def describe(dim, grid, dist="lognormal", p_mean=P_MEAN, p_std=P_STD, sigma_max=None):
    """The one line train.py prints at the start of an N-JEPA run."""
    median, power = sigma_stats(dist, p_mean, p_std, sigma_max)
    placed = placed_fraction(dim, grid, dist, p_mean, p_std, sigma_max)
    return (f"noise: sigma median {median:.2f}, E[sigma^2] {power:.2g} against position-embedding power 0.5; "
            f"{100 * placed:.0f} % of mask tokens still placed (width {dim}, {grid}x{grid} grid)")


# ---------------------------------------------------------------------------------------------
# Picture: python noise.py --show docs/noise.png -- what Eq. 3 does to a position embedding
# ---------------------------------------------------------------------------------------------
def position_similarity(sigma, dim=384, grid=14, row=7, col=4, seed=0):
    """Cosine similarity [grid, grid] between the noisy position embedding psi + sigma * eps of the
    patch at (row, col) and the clean embedding of every position (sin-cos, as the predictor's)."""
    from model import sincos_pos_embed_2d
    pos = sincos_pos_embed_2d(dim, grid, grid)  # [N, P]
    eps = torch.randn(dim, generator=torch.Generator().manual_seed(seed))
    noisy = pos[row * grid + col] + sigma * eps  # Eq. 3: x_sigma = x_0 + n
    return torch.nn.functional.cosine_similarity(noisy[None], pos, dim=1).view(grid, grid)


def draw_noise(path, sigmas=(0.0, 0.1, 0.3, 1.0, 3.0), dim=384, grid=14, row=7, col=4):
    """One heat map per sigma (each from its lowest similarity, white, to its highest, dark; the true
    position boxed, the most similar one ringed) and the histogram of the log-normal sigmas, with the
    fixed sigma_data and the median."""
    from PIL import Image, ImageDraw
    cell, pad, top = 12, 14, 34
    side = grid * cell
    W = len(sigmas) * (side + pad) + pad + 330
    img = Image.new("RGB", (W, side + top + 44), "white")
    d = ImageDraw.Draw(img)
    colour = lambda t: (int(255 - 75 * t), int(255 - 235 * t), int(255 - 215 * t))  # t in [0, 1]: white -> dark red
    d.text((pad, 6), f"cos(psi + sigma * eps, psi_k) for the patch at row {row}, col {col} ({grid}x{grid} grid, width {dim}); "
           "each map from its lowest (white) to its highest (dark) value", fill="black")
    for k, sigma in enumerate(sigmas):
        sim = position_similarity(sigma, dim, grid, row, col)
        lo, hi = float(sim.min()), float(sim.max())
        x0 = pad + k * (side + pad)
        for r in range(grid):
            for c in range(grid):
                d.rectangle([x0 + c * cell, top + r * cell, x0 + (c + 1) * cell - 1, top + (r + 1) * cell - 1],
                            fill=colour((float(sim[r, c]) - lo) / (hi - lo)))
        d.rectangle([x0 + col * cell, top + row * cell, x0 + (col + 1) * cell - 1, top + (row + 1) * cell - 1], outline="black", width=2)
        br, bc = divmod(int(sim.argmax()), grid)
        d.ellipse([x0 + bc * cell + 2, top + br * cell + 2, x0 + (bc + 1) * cell - 3, top + (br + 1) * cell - 3], outline=(0, 150, 0), width=2)
        d.text((x0, top + side + 4), f"sigma = {sigma:g}", fill="black")
        d.text((x0, top + side + 18), f"own {float(sim[row, col]):.2f}, range {lo:.2f}..{hi:.2f}", fill=(60, 60, 60))
    # histogram of EDM log-normal sigmas, log10 axis from 1e-3 to 1e2
    s = sample_sigma((200_000,), generator=torch.Generator().manual_seed(0)).log10()
    bins = torch.histc(s, bins=50, min=-3, max=2)
    hx0, hy0, hw, hh = W - 320, top, 300, side
    d.rectangle([hx0, hy0, hx0 + hw, hy0 + hh], outline=(160, 160, 160))
    for i, b in enumerate(bins.tolist()):
        h = b / bins.max().item() * (hh - 4)
        d.rectangle([hx0 + i * hw / 50, hy0 + hh - h, hx0 + (i + 1) * hw / 50 - 1, hy0 + hh], fill=(120, 140, 200))
    to_x = lambda v: hx0 + (math.log10(v) + 3) / 5 * hw
    for v, label, c in ((math.exp(P_MEAN), "median 0.30", (0, 120, 0)), (SIGMA_DATA, "fixed 0.5", (200, 0, 0)), (2.0, "2", (0, 0, 0))):
        d.line([to_x(v), hy0, to_x(v), hy0 + hh], fill=c, width=2)
    d.text((hx0, 6 + 14), "sigma ~ exp(-1.2 + 1.2 xi) (EDM); axis 1e-3 .. 1e2, log", fill="black")
    for v in (1e-3, 1e-2, 1e-1, 1, 10, 100):
        d.text((to_x(v) - 8, hy0 + hh + 4), f"{v:g}", fill=(60, 60, 60))
    frac = (s > math.log10(2)).float().mean().item()
    d.text((hx0, hy0 + hh + 18), f"green: median 0.30 | red: fixed sigma_data 0.5 | sigma > 2: {100 * frac:.1f} %", fill=(60, 60, 60))
    img.save(path)
    return img


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description="What EDM noise does to a position embedding (Eq. 3): a picture, or the share of "
                                            "mask tokens still placed at a predictor width and grid.")
    p.add_argument("--show", help="draw the picture into this PNG")
    p.add_argument("--placed", action="store_true", help="print the share of mask tokens still nearest their own position")
    p.add_argument("--dim", type=int, default=96, help="--placed: predictor width (vit_tiny 96, the paper's ViT-B 384)")
    p.add_argument("--grid", type=int, default=8, help="--placed: patches per side (64 px / 8 = 8, the paper's 224 / 16 = 14)")
    p.add_argument("--noise-dist", default="lognormal", choices=["lognormal", "fixed"])
    p.add_argument("--p-mean", type=float, default=P_MEAN)
    p.add_argument("--p-std", type=float, default=P_STD)
    p.add_argument("--sigma-max", type=float)
    a = p.parse_args()
    if not a.show and not a.placed:
        p.error("give --show PNG or --placed")
    if a.placed:
        print(describe(a.dim, a.grid, a.noise_dist, a.p_mean, a.p_std, a.sigma_max))
    if a.show:
        draw_noise(a.show)
        print(f"wrote {a.show}: " + ", ".join(f"sigma {s:g}: cos to own position {float(position_similarity(s)[7, 4]):.2f}"
                                               for s in (0.0, 0.1, 0.3, 1.0, 3.0)))
