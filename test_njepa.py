"""
test_njepa.py -- tests for njepa. Run: python -m pytest -q test_njepa.py

No test is timed; each checks a property: shapes and key names, invariants of the masks,
statistics of the noise, losses against hand-computed values, schedule and EMA endpoints,
a real training run whose loss falls, exact resume, 2-process DDP on gloo, bad input.
"""
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import data
import losses
import masks
import model
import noise
import probe
import train
from tools import report

HERE = os.path.dirname(os.path.abspath(__file__))
# a small, fast configuration for training tests: 32 px images, 8 px patches (4x4 grid), 2-block predictors
# (fp32 and no online kNN unless a test asks: the bf16 and kNN paths have tests of their own)
FAST = ["--model", "vit_tiny", "--img", "32", "--patch", "8", "--pred-depth", "2", "--batch", "16",
        "--subset-per-class", "8", "--log-every", "1", "--device", "cpu", "--precision", "fp32", "--eval-every", "0"]


def run_cli(*args, timeout=600, env=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True, timeout=timeout, env=env)


# ---------------------------------------------------------------------------------------------
# model.py
# ---------------------------------------------------------------------------------------------
def test_vit_shapes_and_ijepa_key_names():
    torch.manual_seed(0)
    enc = model.vit_tiny(img_size=32, patch_size=8)
    x = torch.randn(2, 3, 32, 32)
    assert enc(x).shape == (2, 16, 192)
    keep = torch.tensor([[0, 3, 5], [1, 2, 15]])
    assert enc(x, keep=keep).shape == (2, 3, 192)
    # return_layers=4: the normed outputs of blocks depth-4 .. depth-1 (breaks if other blocks are returned)
    seen = {}
    hooks = [enc.blocks[i].register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out)) for i in (7, 8, 11)]
    layers = enc(x, return_layers=4)
    for h in hooks:
        h.remove()
    assert len(layers) == 4 and all(t.shape == (2, 16, 192) for t in layers)
    assert torch.allclose(layers[0], enc.norm(seen[8])) and not torch.allclose(layers[0], enc.norm(seen[7]))
    assert torch.allclose(layers[-1], enc.norm(seen[11])) and torch.allclose(layers[-1], enc(x))
    keys = set(enc.state_dict())
    for k in ["patch_embed.proj.weight", "pos_embed", "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight",
              "blocks.0.attn.proj.weight", "blocks.0.norm2.bias", "blocks.0.mlp.fc1.weight",
              "blocks.11.mlp.fc2.bias", "norm.weight"]:
        assert k in keys, k
    assert enc.pos_embed.shape == (1, 16, 192) and not any(n == "pos_embed" for n, _ in enc.named_parameters())
    for name, (dim, depth, heads) in {"vit_small": (384, 12, 6), "vit_base": (768, 12, 12), "vit_large": (1024, 24, 16),
                                      "vit_huge": (1280, 32, 16), "vit_giant": (1408, 40, 16)}.items():
        assert (model.PRESETS[name]["embed_dim"], model.PRESETS[name]["depth"], model.PRESETS[name]["num_heads"]) == (dim, depth, heads)
    assert model.Block(1408, 16, model.PRESETS["vit_giant"]["mlp_ratio"]).mlp.fc1.out_features == 6144  # I-JEPA ViT-g


def test_init_is_what_official_ijepa_training_runs():
    """trunc_normal(0.02) on every Linear, no sqrt(2 * layer) rescale of attn.proj / mlp.fc2 (SPEC 2,
    "init"). Breaks if fix_init_weight's rescale comes back: the last block's fc2 std would be 0.02 / sqrt(24)."""
    torch.manual_seed(0)
    enc = model.vit_base(img_size=32, patch_size=16)
    for name in ("blocks.0.attn.proj.weight", "blocks.11.mlp.fc2.weight", "blocks.11.attn.qkv.weight"):
        assert enc.state_dict()[name].std().item() == pytest.approx(0.02, rel=0.05), name  # cut at +-2, i.e. 100 std: no cut
    assert all((enc.state_dict()[k] == 0).all() for k in ("blocks.3.attn.proj.bias", "blocks.3.mlp.fc1.bias"))
    assert (enc.norm.weight == 1).all()


def test_encoder_keep_equals_attention_over_kept_tokens_only():
    """Encoding a subset must equal encoding an image whose other patches do not exist (no leakage)."""
    torch.manual_seed(0)
    enc = model.vit_tiny(img_size=32, patch_size=8).eval()
    x = torch.randn(1, 3, 32, 32)
    keep = torch.tensor([[1, 4, 9]])
    y = torch.randn(1, 3, 32, 32)
    y[..., :8, 8:16] = x[..., :8, 8:16]   # patch 1
    y[..., 8:16, 0:8] = x[..., 8:16, 0:8]  # patch 4
    y[..., 16:24, 8:16] = x[..., 16:24, 8:16]  # patch 9
    assert torch.allclose(enc(x, keep=keep), enc(y, keep=keep), atol=1e-5)


def test_sincos_pos_embed():
    """Hand values at a nonzero position, column first as I-JEPA's get_2d_sincos_pos_embed. Breaks if rows
    and columns are swapped or the frequency base (10000) changes."""
    pe = model.sincos_pos_embed_2d(8, 3, 5)
    assert pe.shape == (15, 8)
    r, c = 1, 2  # index r * 5 + c = 7
    w = [1.0, 1 / 100]  # omega_k = 1 / 10000 ** (k / (dim / 4)), k = 0, 1
    expected = [math.sin(c * w[0]), math.sin(c * w[1]), math.cos(c * w[0]), math.cos(c * w[1]),
                math.sin(r * w[0]), math.sin(r * w[1]), math.cos(r * w[0]), math.cos(r * w[1])]
    assert torch.allclose(pe[7], torch.tensor(expected), atol=1e-6)
    assert len({tuple(r.tolist()) for r in pe}) == 15  # all positions distinct


def test_image_size_not_divisible_by_patch():
    with pytest.raises(ValueError, match="not divisible"):
        model.vit_tiny(img_size=30, patch_size=8)
    with pytest.raises(ValueError, match="unknown model"):
        model.vit("vit_gigantic")


def test_predictor_shapes_blocks_independent_and_noise_only_on_mask_tokens():
    torch.manual_seed(0)
    pred = model.Predictor(4, 192, 96, depth=2, num_heads=3).eval()
    ctx = torch.randn(2, 5, 192)
    ctx_idx = torch.tensor([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
    tgt = torch.tensor([[[10, 11], [12, 13], [14, 15]], [[0, 1], [2, 3], [4, 15]]])  # [B=2, L=3, Nt=2]
    out = pred(ctx, ctx_idx, tgt)
    assert out.shape == (2, 3, 2, 192)
    # I-JEPA semantics: each block is its own sequence; changing block 2 leaves blocks 0 and 1 alone
    tgt2 = tgt.clone()
    tgt2[:, 2] = torch.tensor([[6, 7], [8, 9]])
    out2 = pred(ctx, ctx_idx, tgt2)
    assert torch.allclose(out[:, :2], out2[:, :2], atol=1e-6) and not torch.allclose(out[:, 2], out2[:, 2])
    # the input of the first block: context rows (:Nc) untouched by the noise, mask-token rows (Nc:)
    # moved by exactly the noise (breaks if noise reaches the context tokens or is added to the outputs)
    seen = []
    hook = pred.predictor_blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    noise = torch.randn(2, 3, 2, 96)
    pred(ctx, ctx_idx, tgt)
    pred(ctx, ctx_idx, tgt, noise=noise)
    hook.remove()
    clean, noisy = seen
    assert torch.equal(clean[:, :5], noisy[:, :5])
    assert torch.allclose(noisy[:, 5:] - clean[:, 5:], noise.reshape(6, 2, 96), atol=1e-6)
    keys = set(pred.state_dict())
    assert {"predictor_embed.weight", "mask_token", "predictor_pos_embed", "predictor_blocks.0.attn.qkv.weight",
            "predictor_norm.weight", "predictor_proj.weight"} <= keys


def test_shared_mask_token_is_predictor_cs_and_gets_l_nt_gradient():
    """--share-mask-token: predictor N uses predictor C's token without registering it (the optimizer
    and DDP see it once), and L_NT alone sends a gradient into pred_c.mask_token."""
    torch.manual_seed(0)
    pred_c = model.Predictor(4, 192, 96, depth=1, num_heads=3)
    pred_n = model.Predictor(4, 192, 96, depth=1, num_heads=3, shared_mask_token=pred_c.mask_token)
    assert "mask_token" not in pred_n.state_dict() and all(p is not pred_c.mask_token for p in pred_n.parameters())
    ctx, ctx_idx, tgt = torch.randn(2, 3, 192), torch.tensor([[0, 1, 2]] * 2), torch.tensor([[[5, 6]], [[7, 8]]])
    p_n = pred_n(ctx, ctx_idx, tgt, noise=torch.randn(2, 1, 2, 96))
    total, _ = losses.njepa_loss(torch.zeros_like(p_n), p_n, torch.randn_like(p_n), lambda1=1.0, lambda2=0.0)
    total.backward()  # L_CT of a constant is constant: the gradient is L_NT's
    assert pred_c.mask_token.grad is not None and pred_c.mask_token.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# masks.py
# ---------------------------------------------------------------------------------------------
def test_masks_invariants_on_14x14():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        ctx, tgt = masks.sample_masks(8, 14, 14, generator=g)
        B, L, Nt = tgt.shape
        assert ctx.shape[0] == B == 8 and L == 4
        assert ctx.dtype == tgt.dtype == torch.long
        assert ctx.min() >= 0 and ctx.max() < 196 and tgt.min() >= 0 and tgt.max() < 196
        assert ctx.shape[1] >= masks.default_min_keep(14, 14)
        for b in range(B):
            assert len(set(ctx[b].tolist())) == ctx.shape[1]  # no duplicates
            assert not set(ctx[b].tolist()) & set(tgt[b].flatten().tolist())  # disjoint (Sec. 4.3)
            for block in tgt[b]:
                rows, cols = block // 14, block % 14
                h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
                assert h * w == Nt  # a full rectangle
                assert 0.15 * 196 - 6 <= Nt <= 0.2 * 196 + 6  # scale (0.15, 0.2), up to rounding
                assert 0.75 - 0.3 <= h / w <= 1.5 + 0.4  # aspect (0.75, 1.5), up to rounding


def test_min_keep_is_ijepas_ten_patches_of_196():
    """I-JEPA's MaskCollator keeps at least min_keep = 10 context patches on its 14x14 grid (224 / 16);
    njepa scales that share to other grids (SPEC 2, masks): 10 at 14x14, ceil(640 / 196) = 4 at 8x8,
    and at least 1."""
    assert masks.default_min_keep(14, 14) == 10
    assert masks.default_min_keep(8, 8) == 4 and masks.default_min_keep(4, 4) == 1 and masks.default_min_keep(16, 16) == 14

def test_masks_reach_every_cell_including_last_row_and_column():
    g = torch.Generator().manual_seed(1)
    seen_t, seen_c = torch.zeros(196, dtype=torch.bool), torch.zeros(196, dtype=torch.bool)
    for _ in range(60):
        ctx, tgt = masks.sample_masks(16, 14, 14, generator=g)
        seen_t[tgt.flatten()] = True
        seen_c[ctx.flatten()] = True
    assert seen_t.all() and seen_c.all()


def test_masks_are_deterministic_given_a_generator_and_bounded():
    a = masks.sample_masks(4, 8, 8, generator=torch.Generator().manual_seed(3))
    b = masks.sample_masks(4, 8, 8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(RuntimeError, match="could not leave"):
        masks.sample_masks(2, 3, 3, n_targets=4, target_scale=(0.5, 0.5), min_keep=3, max_tries=20,
                           generator=torch.Generator().manual_seed(0))


def test_context_block_never_covers_the_whole_grid():
    """I-JEPA's clamp (`while h >= height: h -= 1`, SPEC 2): the context fits in (grid-1) x (grid-1).
    Breaks without the clamp: on 8x8 the context block is then 8x8 in most batches."""
    g = torch.Generator().manual_seed(0)
    for grid in (8, 14):
        for _ in range(30):
            ctx, tgt = masks.sample_masks(4, grid, grid, generator=g)
            for c in ctx:
                rows, cols = c // grid, c % grid
                assert rows.max() - rows.min() + 1 <= grid - 1 and cols.max() - cols.min() + 1 <= grid - 1
    assert masks.block_size(torch.Generator().manual_seed(0), (1.0, 1.0), (1.0, 1.0), 8, 8) == (7, 7)


def test_context_truncation_keeps_a_random_subset_not_the_first_patches():
    """Contexts are cut to the shortest in the batch. I-JEPA keeps the first indices (the top of the
    image); we keep a random subset, so the kept patches sit as low as they sit high. Breaks with
    prefix truncation: the mean row then moves up by more than a row."""
    g = torch.Generator().manual_seed(0)
    rows, cols = [], []
    for _ in range(40):
        ctx, _ = masks.sample_masks(32, 14, 14, generator=g)
        rows.append((ctx // 14).float().mean())
        cols.append((ctx % 14).float().mean())
    assert abs(torch.stack(rows).mean() - torch.stack(cols).mean()) < 0.3
    assert abs(torch.stack(rows).mean() - 6.5) < 0.4


def test_context_keep_first_keeps_the_first_indices_and_random_does_not():
    """--context-keep first is I-JEPA's cut: every context is the first n_keep of its own sorted
    indices. Breaks if `first` still draws a subset, or if `random` became a prefix cut."""
    cut = {}
    for keep in ("first", "random"):
        g = torch.Generator().manual_seed(0)
        full = []  # each image's context before the cut, from a replay of the same draws
        ctx, _ = masks.sample_masks(32, 8, 8, generator=g, context_keep=keep)
        g2 = torch.Generator().manual_seed(0)
        th, tw = masks.block_size(g2, (0.15, 0.2), (0.75, 1.5), 8, 8)
        ch, cw = masks.block_size(g2, (0.85, 1.0), (1.0, 1.0), 8, 8)
        for _ in range(32):
            while True:
                covered = torch.stack([masks.place_block(g2, th, tw, 8, 8) for _ in range(4)]).any(0)
                c = masks.place_block(g2, ch, cw, 8, 8) & ~covered
                if int(c.sum()) >= masks.default_min_keep(8, 8):
                    break
            full.append(c.flatten().nonzero().squeeze(1))
        cut[keep] = [bool(torch.equal(row, f[:len(row)])) for row, f in zip(ctx, full)]
        assert all(set(row.tolist()) <= set(f.tolist()) for row, f in zip(ctx, full))
    assert all(cut["first"])
    assert sum(cut["random"]) < 32 / 2  # most random cuts are not the prefix
    with pytest.raises(ValueError, match="context_keep"):
        masks.sample_masks(2, 8, 8, context_keep="last")


def test_project_imports_go_one_way():
    """The files import each other without a circle, counting imports inside functions too, in layers a
    reader can take in order: the method files (model, masks, noise, losses) -> data -> probe (all
    evaluation) -> train -> tools/ (bench, report). Evaluation never imports the training script, the
    method files never import tools/, and masks.py imports nothing of the project."""
    import ast
    files = {"model": "model.py", "masks": "masks.py", "noise": "noise.py", "losses": "losses.py", "data": "data.py",
             "probe": "probe.py", "train": "train.py", "bench": "tools/bench.py", "report": "tools/report.py"}
    deps = {}
    for f, path in files.items():
        tree = ast.parse(open(os.path.join(HERE, path)).read())
        names = {a.name.split(".")[-1] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module.split(".")[-1] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "tools" for a in n.names}
        deps[f] = sorted(names & set(files) - {f})
    done, path = set(), []

    def visit(f):
        assert f not in path, f"import circle: {' -> '.join(path[path.index(f):] + [f])}"
        if f not in done:
            path.append(f)
            for d in deps[f]:
                visit(d)
            path.pop()
            done.add(f)
    for f in files:
        visit(f)
    assert deps["masks"] == [] and "masks" in deps["data"]
    assert "train" not in deps["probe"] and "probe" in deps["train"]  # evaluation with evaluation
    layer = {"model": 0, "masks": 0, "noise": 0, "losses": 0, "data": 1, "probe": 2, "train": 3, "bench": 4, "report": 4}
    for f, ds in deps.items():
        assert all(layer[d] < layer[f] or (layer[d] == layer[f] == 0) for d in ds), (f, ds)


def test_masks_picture(tmp_path):
    out = tmp_path / "m.png"
    r = run_cli("data.py", "--show-masks", str(out), "--img", "32", "--patch", "4", "--n", "4")
    assert r.returncode == 0, r.stderr
    im = Image.open(out)
    assert im.size[0] > 100 and im.mode == "RGB"


@pytest.mark.parametrize("args, says", [(["--patch", "0"], "not divisible by patch size 0"),
                                        (["--img", "32", "--patch", "5"], "not divisible by patch size 5"),
                                        (["--img", "32", "--patch", "16"], "2x2 grid; need at least 4x4"),
                                        (["--img", "32", "--patch", "4", "--n", "0"], "--n must be >= 1")])
def test_masks_picture_bad_sizes_are_one_line(tmp_path, args, says):
    out = tmp_path / "m.png"
    r = run_cli("data.py", "--show-masks", str(out), *args)
    assert r.returncode != 0 and not out.exists()
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and says in r.stderr, r.stderr


# ---------------------------------------------------------------------------------------------
# noise.py
# ---------------------------------------------------------------------------------------------
def test_sigma_is_lognormal_with_edm_parameters():
    s = noise.sample_sigma((400_000,), generator=torch.Generator().manual_seed(0))
    assert (s > 0).all()
    log = s.log()
    assert abs(log.mean().item() - (-1.2)) < 0.01 and abs(log.std().item() - 1.2) < 0.01
    assert abs(s.median().item() - math.exp(-1.2)) < 0.005


def test_noise_levels_multi_single_none_fixed():
    g = torch.Generator().manual_seed(0)
    n, sig = noise.sample_noise(64, 4, 50, 96, "multi", generator=g)
    assert n.shape == (64, 4, 50, 96) and sig.shape == (64, 4)
    assert not torch.allclose(n[:, 0], n[:, 1])  # a different draw per block
    emp = n.flatten(2).std(-1)  # per (image, block) std ~ its sigma
    assert torch.allclose(emp, sig, rtol=0.05)
    n, sig = noise.sample_noise(64, 4, 50, 96, "single", generator=g)
    assert torch.equal(n[:, 0], n[:, 3]) and torch.equal(sig[:, 0], sig[:, 2])
    n, sig = noise.sample_noise(8, 4, 50, 96, "none", generator=g)
    assert (n == 0).all()
    n, sig = noise.sample_noise(64, 4, 50, 96, "multi", dist="fixed", generator=g)
    assert (sig == 0.5).all() and abs(n.std().item() - 0.5) < 0.01
    with pytest.raises(ValueError):
        noise.sample_noise(1, 1, 1, 4, "triple")


def test_sigma_max_clips_the_levels_and_the_noise():
    """--sigma-max 2: sigma <= 2, clipped in P(ln sigma > ln 2) = 1 - Phi((ln 2 + 1.2) / 1.2) = 5.7 % of
    draws, and the noise follows the clipped sigma. Breaks if the clip is skipped or applied after the noise."""
    n, sig = noise.sample_noise(20_000, 4, 8, 16, "multi", generator=torch.Generator().manual_seed(0), sigma_max=2.0)
    assert sig.max().item() == 2.0
    expected = 1 - 0.5 * (1 + math.erf((math.log(2) + 1.2) / 1.2 / math.sqrt(2)))
    assert (sig == 2.0).float().mean().item() == pytest.approx(expected, abs=0.004)
    big = sig == 2.0
    assert n.flatten(2).std(-1)[big].mean().item() == pytest.approx(2.0, rel=0.02)


def test_p_mean_and_p_std_reach_the_noise_of_a_run():
    """--p-mean / --p-std shift and scale ln(sigma) of the same draws: sigma' = exp(p_mean' + p_std' xi),
    so with the same step seed sigma' = exp(dp) * sigma when only p_mean moves. Breaks if step_noise
    ignores the options (the default sigmas come back)."""
    base = train.resolve_config(train.parse_args(["--epochs", "1"]))
    moved = train.resolve_config(train.parse_args(["--epochs", "1", "--p-mean", "-1.76"]))
    targets = torch.zeros(4, 4, 3, dtype=torch.long)
    (_, s0), (n1, s1) = [train.step_noise(c, 7, 0, 1, targets, torch.device("cpu")) for c in (base, moved)]
    assert torch.allclose(s1, s0 * math.exp(-1.76 + 1.2), rtol=1e-5)
    wide = train.resolve_config(train.parse_args(["--epochs", "1", "--p-std", "0"]))
    assert torch.allclose(train.step_noise(wide, 7, 0, 1, targets, torch.device("cpu"))[1], torch.tensor(math.exp(-1.2)))
    assert moved.p_mean == -1.76 and base.p_mean == -1.2 and base.p_std == 1.2  # recorded in the checkpoint's config


def test_placed_fraction_limits_and_the_paper_against_vit_tiny():
    """The share of mask tokens whose noisy position embedding stays nearest its own: all of them at
    sigma ~ 0, chance (1 / 64) when the noise drowns the position, and EDM's sigmas place 75 % at
    width 96 on 8x8 (vit_tiny 64/8) against 86 % at the paper's 384 on 14x14 (issue 29, +-2 points)."""
    assert noise.placed_fraction(96, 8, p_mean=-30, p_std=0, draws=4000) == 1.0
    assert noise.placed_fraction(96, 8, p_mean=8, p_std=0, draws=20_000) == pytest.approx(1 / 64, abs=0.005)
    assert noise.placed_fraction(96, 8) == pytest.approx(0.75, abs=0.02)
    assert noise.placed_fraction(384, 14) == pytest.approx(0.86, abs=0.02)
    assert noise.placed_fraction(96, 8, dist="fixed") == pytest.approx(0.70, abs=0.02)
    assert noise.placed_fraction(96, 8, p_mean=-1.76) == pytest.approx(0.86, abs=0.02)  # the paper's share at our width
    assert noise.placed_fraction(96, 8, sigma_max=0.1) > 0.99  # the clip reaches the measurement
    assert noise.placed_fraction(96, 8, seed=3, draws=500) == noise.placed_fraction(96, 8, seed=3, draws=500)
    median, power = noise.sigma_stats()
    assert median == pytest.approx(math.exp(-1.2)) and power == pytest.approx(math.exp(-2.4 + 2.88))
    s = noise.sample_sigma((1_000_000,), generator=torch.Generator().manual_seed(0)).clamp(max=2.0)
    assert noise.sigma_stats(sigma_max=2.0)[1] == pytest.approx(s.pow(2).mean().item(), rel=0.01)
    assert noise.sigma_stats("fixed") == (0.5, 0.25)


# ---------------------------------------------------------------------------------------------
# losses.py
# ---------------------------------------------------------------------------------------------
def test_losses_against_hand_computed_values():
    target = torch.zeros(1, 1, 1, 2)
    pred_c = torch.tensor([[[[0.5, 2.0]]]], requires_grad=True)
    pred_n = torch.tensor([[[[1.0, -1.0]]]], requires_grad=True)
    total, parts = losses.njepa_loss(pred_c, pred_n, target, 0.1, 0.1)
    # smooth-L1 (beta 1): 0.5*0.5^2 = 0.125 and 2.0 - 0.5 = 1.5 -> mean 0.8125
    assert parts["ct"].item() == pytest.approx(0.8125)
    # |1| -> 0.5 each -> mean 0.5
    assert parts["nt"].item() == pytest.approx(0.5)
    # MSE: ((1-0.5)^2 + (-1-2)^2) / 2 = 4.625
    assert parts["cn"].item() == pytest.approx(4.625)
    assert total.item() == pytest.approx(0.8125 + 0.1 * 0.5 + 0.1 * 4.625)
    total.backward()
    assert pred_c.grad.abs().sum() > 0 and pred_n.grad.abs().sum() > 0
    # d total / d pred_c[0] = 0.5 (smooth-L1 slope) + 0.1 * 2 * (0.5 - 1.0) / 2 (MSE, no stop-grad)
    assert pred_c.grad[0, 0, 0, 0].item() == pytest.approx(0.5 / 2 + 0.1 * (0.5 - 1.0))


def test_losses_never_send_gradient_into_the_targets():
    """Alg. 1 line 18 (`.detach()`): the teacher's targets are constants of the loss. In training they
    come from a no_grad forward already; njepa_loss detaches them itself, so a caller whose targets still
    carry a graph (an online teacher, a test) cannot train the teacher through L_CT or L_NT."""
    target = torch.randn(2, 4, 3, 8, requires_grad=True)
    pred_c, pred_n = torch.randn(2, 4, 3, 8, requires_grad=True), torch.randn(2, 4, 3, 8, requires_grad=True)
    total, _ = losses.njepa_loss(pred_c, pred_n, target * 2.0)
    total.backward()
    assert target.grad is None and pred_c.grad is not None and pred_n.grad is not None

def test_ijepa_mode_and_missing_predictor():
    t, p = torch.zeros(2, 3), torch.ones(2, 3)
    total, parts = losses.njepa_loss(p, None, t, 0.0, 0.0)
    assert total.item() == pytest.approx(0.5) and parts["nt"].item() == 0 and parts["cn"].item() == 0
    with pytest.raises(ValueError, match="predictor N"):
        losses.njepa_loss(p, None, t, 0.1, 0.0)


def test_cn_stopgrad_keeps_l_cn_out_of_predictor_c():
    """--cn-stopgrad: d L_CN / d pred_c = 0, d L_CN / d pred_n unchanged. Breaks if the detach is missing
    or lands on pred_n."""
    target = torch.zeros(1, 1, 1, 2)
    grads = {}
    for stop in (False, True):
        pred_c = torch.tensor([[[[0.5, 2.0]]]], requires_grad=True)
        pred_n = torch.tensor([[[[1.0, -1.0]]]], requires_grad=True)
        total, parts = losses.njepa_loss(pred_c, pred_n, target, 0.0, 1.0, cn_stopgrad=stop)
        assert parts["cn"].item() == pytest.approx(4.625)  # the value does not change
        total.backward()
        grads[stop] = (pred_c.grad.clone(), pred_n.grad.clone())
    assert torch.allclose(grads[True][0], torch.tensor([[[[0.25, 0.5]]]]))  # smooth-L1 of L_CT only
    assert torch.allclose(grads[False][0], grads[True][0] + torch.tensor([[[[-0.5, 3.0]]]]))  # + (c - n) from L_CN
    assert torch.equal(grads[False][1], grads[True][1])


# ---------------------------------------------------------------------------------------------
# schedules, EMA, optimizer groups, FLOPs
# ---------------------------------------------------------------------------------------------
def cfg_for(**kw):
    cfg = train.resolve_config(train.parse_args(["--data", "shapes"]))
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def test_schedules_endpoints_and_cosine_shape():
    ipe = 10
    cfg = cfg_for(epochs=100, warmup=40, ipe_scale=1.0, lr=1e-3)
    T = 1000
    assert train.lr_at(0, cfg, ipe) == pytest.approx(1e-4)
    assert train.lr_at(400, cfg, ipe) == pytest.approx(1e-3)
    assert train.lr_at(200, cfg, ipe) == pytest.approx(5.5e-4)
    assert train.lr_at(T, cfg, ipe) == pytest.approx(1e-6)
    # a quarter into the decay: cosine gives 1e-6 + (1e-3 - 1e-6) * (1 + cos(pi / 4)) / 2; linear would give 7.5e-4
    assert train.lr_at(550, cfg, ipe) == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert train.wd_at(250, cfg, ipe) == pytest.approx(0.4 + (0.04 - 0.4) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert train.momentum_at(250, cfg, ipe) == pytest.approx(0.996 + 0.004 * 0.25)  # linear, not cosine
    assert train.wd_at(0, cfg, ipe) == pytest.approx(0.04) and train.wd_at(T, cfg, ipe) == pytest.approx(0.4)
    assert train.momentum_at(0, cfg, ipe) == pytest.approx(0.996) and train.momentum_at(T, cfg, ipe) == pytest.approx(1.0)
    # ipe_scale 1.25 (Sec. 4.1): at the end of the run the schedules are only 80 % through
    cfg.ipe_scale = 1.25
    assert train.momentum_at(T, cfg, ipe) == pytest.approx(0.996 + 0.004 * 0.8)
    assert train.wd_at(T, cfg, ipe) == pytest.approx(0.4 + (0.04 - 0.4) * 0.5 * (1 + math.cos(math.pi * 0.8)))
    cfg.lr_schedule = "constant"
    assert train.lr_at(900, cfg, ipe) == pytest.approx(1e-3)


def test_warmup_default_is_40_epochs_or_40_percent():
    """Sec. 4.4: 40 warmup epochs; SPEC 2: min(40, 0.4 * epochs). Breaks with the old 0.4 * epochs (120 of 300)."""
    for epochs, warmup in ((300, 40), (100, 40), (10, 4)):
        assert train.resolve_config(train.parse_args(["--epochs", str(epochs)])).warmup == pytest.approx(warmup)
    assert train.resolve_config(train.parse_args(["--epochs", "10", "--warmup", "1"])).warmup == 1


def test_help_shows_the_real_default_of_the_chosen_setting():
    small = run_cli("train.py", "--help").stdout
    paper = run_cli("train.py", "--data", "/data/imagenet", "--help").stdout
    flat = lambda t: " ".join(t.split())
    assert "[default: vit_tiny]" in flat(small) and "[default: vit_base]" in flat(paper)
    assert "[default: 224]" in flat(paper) and "(default: None)" not in small


def test_a_folder_gets_the_papers_setting_and_the_builtin_data_keeps_its_method():
    """--data DIR takes the paper's numbers (Sec. 4.2-4.4, Table 2, EDM): ViT-B/16 at 224 px, batch 128,
    100 epochs, lr 1e-3 after a 40-epoch warmup, predictors of depth 6 and width 384, lambdas 0.1, EDM's
    log-normal (-1.2, 1.2) drawn per block, EMA 0.996, wd 0.04, ipe_scale 1.25, unshared predictors. The
    built-in data shrinks the model and the run, not the method (depth-6 predictors, the same noise)."""
    paper = vars(train.resolve_config(train.parse_args(["--data", "/data/imagenet"])))
    want = dict(model="vit_base", img=224, patch=16, batch=128, epochs=100, lr=1e-3, warmup=40.0, pred_depth=6, pred_dim=384,
                lambda1=0.1, lambda2=0.1, noise="multi", noise_dist="lognormal", p_mean=-1.2, p_std=1.2, sigma_max=None,
                ema=0.996, wd=0.04, ipe_scale=1.25, lr_schedule="cosine", share_predictor=False, share_mask_token=False,
                cn_stopgrad=False, context_keep="random")
    assert {k: paper[k] for k in want} == want
    small = vars(train.resolve_config(train.parse_args([])))
    assert {k: small[k] for k in ("pred_depth", "noise", "p_mean", "p_std", "lambda1", "ema", "ipe_scale")} == \
        {"pred_depth": 6, "noise": "multi", "p_mean": -1.2, "p_std": 1.2, "lambda1": 0.1, "ema": 0.996, "ipe_scale": 1.25}

def test_ema_update_and_param_groups():
    torch.manual_seed(0)
    s, t = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    t0, s0 = [p.clone() for p in t.parameters()], [p.clone() for p in s.parameters()]
    train.ema_update(t, s, 0.9)
    for a, b, c in zip(t.parameters(), t0, s0):
        assert torch.allclose(a, 0.9 * b + 0.1 * c)
    t1 = [p.clone() for p in t.parameters()]
    train.ema_update(t, s, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(t.parameters(), t1))
    enc = model.vit_tiny(img_size=32, patch_size=8)
    decay, no_decay = train.param_groups([enc])
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(enc.parameters()))


def test_feature_std_is_zero_on_constant_features():
    assert probe.feature_std(torch.ones(2, 5, 7) * 3.0).item() == 0.0
    h = torch.tensor([[[0.0, 5.0], [2.0, 5.0], [4.0, 5.0]]])  # 3 tokens, 2 features: stds over tokens 2 and 0
    assert probe.feature_std(h).item() == pytest.approx(1.0)  # (a std over features would give 2.12)


def test_analytic_flops_match_flop_counter():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    cfg = cfg_for(model="vit_tiny", img=32, patch=4, pred_depth=2, pred_dim=96)
    enc = model.vit_tiny(img_size=32, patch_size=4)
    pred = model.Predictor(8, 192, 96, depth=2, num_heads=3)
    B, Nc, L, Nt = 4, 20, 4, 9
    x = torch.randn(B, 3, 32, 32)
    ctx = torch.arange(Nc).repeat(B, 1)
    tgt = (torch.arange(L * Nt) + 20).view(1, L, Nt).repeat(B, 1, 1)
    # the counter does not know the fused CPU attention kernel: the math backend shows it as bmm
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as fc:
            enc(x)
        assert fc.get_total_flops() == pytest.approx(2 * 3 * 16 * 192 * B * 64 + model.transformer_flops(B, 64, 192, 12), rel=1e-6)
        with FlopCounterMode(display=False) as fc:
            pred(torch.randn(B, Nc, 192), ctx, tgt)
        analytic = 2 * 192 * 96 * B * Nc + model.transformer_flops(B * L, Nc + Nt, 96, 2) + 2 * 96 * 192 * B * L * Nt
        assert fc.get_total_flops() == pytest.approx(analytic, rel=1e-6)
        # a whole training step (fwd + bwd of student and two predictors, fwd of the teacher) within 5 %
        m = train.build_models(cfg)
        with FlopCounterMode(display=False) as fc:
            loss, _, _ = train.forward_losses(cfg, x, ctx, tgt, torch.randn(B, L, Nt, 96), m.student, m.teacher, m.pred_c, m.pred_n)
            loss.backward()
        assert fc.get_total_flops() == pytest.approx(train.step_flops(cfg, B, Nc, Nt), rel=0.05)


class Spy(torch.nn.Module):
    """Wraps a predictor and records the noise each call gets."""

    def __init__(self, net):
        super().__init__()
        self.net, self.noise = net, []

    def forward(self, *args, noise=None):
        self.noise.append(noise)
        return self.net(*args, noise=noise)


def step_setup(**kw):
    cfg = cfg_for(model="vit_tiny", img=32, patch=8, pred_depth=1, pred_dim=96, **kw)
    torch.manual_seed(0)
    m = train.build_models(cfg)
    ctx, tgt = data.MaskCollator(4, 0).masks(0, 4)
    noise, _ = train.step_noise(cfg, 0, 0, 1, tgt, torch.device("cpu"))
    return cfg, m, torch.randn(4, 3, 32, 32), ctx, tgt, noise


def test_noise_reaches_predictor_n_only():
    """Alg. 1 lines 14-17: predictor C sees clean positions, predictor N the noisy ones. Breaks if the
    noise goes to both, to neither, or to predictor C."""
    cfg, m, x, ctx, tgt, noise = step_setup()
    pred_c, pred_n = Spy(m.pred_c), Spy(m.pred_n)
    train.forward_losses(cfg, x, ctx, tgt, noise, m.student, m.teacher, pred_c, pred_n)
    assert pred_c.noise == [None] and len(pred_n.noise) == 1 and pred_n.noise[0] is noise and noise.abs().sum() > 0


def test_l_cn_trains_both_predictors_and_never_the_teacher():
    """lambda1 0, lambda2 1: predictor N learns only through L_CN, so it has a gradient; L_CN also moves
    predictor C's gradient (no stop-gradient, Alg. 1 line 18) unless --cn-stopgrad; the teacher gets none."""
    grads = {}
    for lam2, stop in ((1.0, False), (1.0, True), (0.0, False)):
        cfg, m, x, ctx, tgt, noise = step_setup(lambda1=0.0, lambda2=lam2, cn_stopgrad=stop, use_n=True)
        loss, _, _ = train.forward_losses(cfg, x, ctx, tgt, noise, m.student, m.teacher, m.pred_c, m.pred_n)
        loss.backward()
        assert all(p.grad is None for p in m.teacher.parameters())
        grads[(lam2, stop)] = (m.pred_c.predictor_proj.weight.grad.clone(), m.pred_n.predictor_proj.weight.grad)
    assert grads[(1.0, False)][1].abs().sum() > 0
    assert not torch.allclose(grads[(1.0, False)][0], grads[(0.0, False)][0])
    assert torch.allclose(grads[(1.0, True)][0], grads[(0.0, False)][0])
    assert grads[(0.0, False)][1] is None or grads[(0.0, False)][1].abs().sum() == 0


def test_shared_predictor_equals_two_calls_with_the_same_weights(monkeypatch):
    """--share-predictor runs predictor C once on [clean ; noisy]: the same predictions as two calls."""
    cfg, m, x, ctx, tgt, noise = step_setup(share_predictor=True)
    m2 = train.build_models(cfg)
    assert m2.pred_n is None
    seen = {}
    real = losses.njepa_loss
    monkeypatch.setattr(losses, "njepa_loss", lambda c, n, t, *a: (seen.update(c=c, n=n), real(c, n, t, *a))[1])
    train.forward_losses(cfg, x, ctx, tgt, noise, m.student, m.teacher, m.pred_c, None)
    z = m.student(x, keep=ctx)
    assert torch.allclose(seen["c"], m.pred_c(z, ctx, tgt), atol=1e-5)
    assert torch.allclose(seen["n"], m.pred_c(z, ctx, tgt, noise=noise), atol=1e-5)


def test_cpu_bf16_attention_runs_in_fp32_and_auto_precision_follows_the_hardware(monkeypatch):
    """Under CPU bf16 autocast the attention kernel gets fp32 q, k, v (its bf16 backward measured 14x
    slower) while the projections stay bf16; --precision auto is bf16 on CUDA and on AMX CPUs only."""
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(model.F, "scaled_dot_product_attention", lambda q, k, v: (seen.append(q.dtype), real(q, k, v))[1])
    attn = model.Attention(48, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = attn(torch.randn(2, 5, 48))
    assert seen == [torch.float32] and y.dtype == torch.bfloat16
    monkeypatch.setattr(model, "cpu_has_amx", lambda: True)
    assert model.resolve_precision("auto", torch.device("cpu")) == "bf16"
    monkeypatch.setattr(model, "cpu_has_amx", lambda: False)
    assert model.resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert model.resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert model.resolve_precision("fp32", torch.device("cuda")) == "fp32"


def test_bf16_training_run_on_cpu_stays_within_tolerance_of_fp32(tmp_path):
    """--precision bf16 on CPU: 12 training steps with finite losses within 5 % of the fp32 run's, fp32
    weights in the checkpoint, and the resolved precision recorded (a resume keeps it)."""
    losses_by = {}
    for p in ("fp32", "bf16"):
        out = str(tmp_path / p)
        assert train.main(FAST + ["--epochs", "3", "--lr", "1e-3", "--out", out, "--precision", p, "--max-steps", "12"]) == 0
        ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
        assert ckpt["config"]["precision"] == p and all(v.dtype == torch.float32 for v in ckpt["student"].values())
        losses_by[p] = [l for _, l in read_losses(out)]
    assert all(math.isfinite(l) for l in losses_by["bf16"]) and len(losses_by["bf16"]) == 12
    assert losses_by["bf16"] == pytest.approx(losses_by["fp32"], rel=0.05)
    assert losses_by["bf16"] != losses_by["fp32"]  # it did run in bf16


def test_bf16_autocast_step_on_cpu_matches_fp32():
    """The mixed-precision step (what CUDA runs): forward_losses + backward + AdamW + EMA under bf16
    autocast gives finite losses, fp32 parameters and gradients, the noise added to fp32 position
    embeddings (the mask-token rows entering predictor N move by exactly the noise: breaks if psi +
    noise is rounded to bf16), and losses within 5 % of the fp32 step (bf16 keeps 8 bits of mantissa)."""
    results = {}
    for amp in (False, True):
        cfg, m, x, ctx, tgt, noise = step_setup()
        opt = torch.optim.AdamW(train.param_groups([m.student, m.pred_c, m.pred_n]), lr=1e-3)
        seen = []
        hook = m.pred_n.predictor_blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss, parts, _ = train.forward_losses(cfg, x, ctx, tgt, noise, m.student, m.teacher, m.pred_c, m.pred_n)
        hook.remove()
        loss.backward()
        assert loss.dtype == torch.float32 and torch.isfinite(loss) and all(torch.isfinite(v) for v in parts.values())
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in m.student.parameters() if p.grad is not None)
        assert seen == [torch.float32]  # noisy position embeddings + mask tokens enter the blocks in fp32
        rows = []
        hook = m.pred_n.predictor_blocks[0].register_forward_pre_hook(lambda mod, args: rows.append(args[0]))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            z = m.student(x, keep=ctx)
            m.pred_n(z, ctx, tgt)
            m.pred_n(z, ctx, tgt, noise=noise)
        hook.remove()
        Nc, (B, L, Nt, P) = ctx.size(1), noise.shape
        assert torch.allclose(rows[1][:, Nc:] - rows[0][:, Nc:], noise.reshape(B * L, Nt, P), atol=1e-6)
        opt.step()
        train.ema_update(m.teacher, m.student, 0.996)
        assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in m.teacher.parameters())
        results[amp] = {k: v.item() for k, v in parts.items()} | {"loss": loss.item()}
    for k in results[False]:
        assert results[True][k] == pytest.approx(results[False][k], rel=0.05), k


# ---------------------------------------------------------------------------------------------
# data.py
# ---------------------------------------------------------------------------------------------
def test_builtin_dataset_is_deterministic_and_balanced():
    a, b = data.Shapes("test", per_class=3), data.Shapes("test", per_class=3)
    assert len(a) == 30 and a.classes == data.SHAPE_CLASSES
    assert np.array_equal(np.asarray(a.load(7)), np.asarray(b.load(7)))
    assert np.bincount(a.labels).tolist() == [3] * 10
    ds = data.Augmented(a, 32, train=True)
    x1, y1, bad = ds[(5, 123)]
    x2, _, _ = ds[(5, 123)]
    assert x1.shape == (3, 32, 32) and x1.dtype == torch.uint8 and torch.equal(x1, x2) and bad == ()
    assert not torch.equal(x1, ds[(5, 124)][0])


def test_random_resized_crop_box_follows_scale_and_ratio():
    """An image whose pixels hold their own coordinates: after the crop, the range of coordinates seen
    is the crop box. Its area must be in scale (0.3, 1.0) of the image and its aspect in (3/4, 4/3)."""
    import random
    W = H = 200
    xs, ys = np.meshgrid(np.arange(W), np.arange(H))
    img = Image.fromarray(np.stack([xs, ys, np.zeros_like(xs)], -1).clip(0, 255).astype(np.uint8))
    areas, ratios = [], []
    for seed in range(200):
        out = np.asarray(data.random_resized_crop(img, 32, random.Random(seed))).astype(float)
        w, h = out[..., 0].max() - out[..., 0].min() + 1, out[..., 1].max() - out[..., 1].min() + 1
        areas.append(w * h / (W * H))
        ratios.append(w / h)
    assert 0.25 < min(areas) and max(areas) <= 1.0 and min(areas) < 0.4 and max(areas) > 0.85
    assert 0.7 < min(ratios) and max(ratios) < 1.4
    a = np.asarray(data.random_resized_crop(img, 32, random.Random(7)))
    assert np.array_equal(a, np.asarray(data.random_resized_crop(img, 32, random.Random(7))))


def test_normalize_uses_imagenet_statistics():
    x = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    y = data.normalize(x).flatten()
    expected = [(v / 255 - m) / s for v, m, s in zip((0, 128, 255), data.IMAGENET_MEAN, data.IMAGENET_STD)]
    assert torch.allclose(y, torch.tensor(expected), atol=1e-5) and y.dtype == torch.float32


def make_folder(root, classes=("a", "b"), per_class=4, size=40, splits=("train",)):
    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes:
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(per_class):
                arr = rng.integers(0, 255, (size, size + 7, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{i}.jpg")
    return root


def test_image_folder_reads_odd_images_and_skips_bad_ones(tmp_path):
    root = make_folder(tmp_path, per_class=2)
    cls = root / "train" / "a"
    Image.new("CMYK", (20, 30), (10, 20, 30, 40)).save(cls / "cmyk.jpg")
    Image.fromarray(np.full((9, 11), 40000, dtype=np.uint16)).save(cls / "deep16.png")
    pal = Image.new("P", (8, 8))
    pal.info["transparency"] = 0
    pal.save(cls / "pal.png", transparency=0)
    Image.new("LA", (5, 5), (100, 128)).save(cls / "la.png")
    frames = [Image.new("RGB", (6, 6), c) for c in ("red", "blue")]
    frames[0].save(cls / "anim.gif", save_all=True, append_images=frames[1:])
    Image.new("RGB", (1, 1), (255, 0, 0)).save(cls / "one.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: a 30x10 file is a 10x30 picture
    Image.new("RGB", (30, 10), "green").save(cls / "rot.jpg", exif=exif)
    (cls / "notes.txt").write_text("not an image, ignored by extension")
    (cls / "fake.jpg").write_text("not an image at all")
    good = open(root / "train" / "b" / "0.jpg", "rb").read()
    (cls / "truncated.jpg").write_bytes(good[: len(good) // 2])
    ds = data.ImageFolder(str(root / "train"))
    assert ds.ignored == 1 and ds.classes == ["a", "b"]
    names = {os.path.basename(p): i for i, p in enumerate(ds.paths)}
    for n in ["cmyk.jpg", "deep16.png", "pal.png", "la.png", "anim.gif", "one.png", "rot.jpg"]:
        img = ds.load(names[n])
        assert img.mode == "RGB", n
    assert ds.load(names["rot.jpg"]).size == (10, 30)
    assert np.asarray(ds.load(names["deep16.png"]))[0, 0, 0] == round(40000 / 65535 * 255)
    for n in ["fake.jpg", "truncated.jpg"]:
        with pytest.raises(data.BadImage):
            ds.load(names[n])
    aug = data.Augmented(ds, 16, train=True)
    x, y, bad = aug[(names["fake.jpg"], 0)]
    assert x.shape == (3, 16, 16) and bad == (ds.paths[names["fake.jpg"]],)


def test_empty_class_folder_warns_and_keeps_labels_and_large_images_load(tmp_path):
    root = make_folder(tmp_path, classes=("a", "c"), per_class=2)
    (root / "train" / "b").mkdir()  # a class with no images
    Image.new("RGB", (4000, 3000), "blue").save(root / "train" / "c" / "big.jpg")
    with pytest.warns(UserWarning, match="hold no images: b"):
        ds = data.ImageFolder(str(root / "train"))
    assert ds.classes == ["a", "b", "c"] and sorted(set(ds.labels)) == [0, 2]
    big = [i for i, p in enumerate(ds.paths) if p.endswith("big.jpg")][0]
    x, y, bad = data.Augmented(ds, 32, train=True)[(big, 1)]
    assert x.shape == (3, 32, 32) and y == 2 and bad == ()


def test_decompression_bomb_is_skipped_not_fatal(tmp_path, monkeypatch):
    Image.new("RGB", (200, 200)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40,000 px is a "bomb" now
    with pytest.raises(data.BadImage, match="Decompression"):
        data.load_image(str(tmp_path / "big.png"))


def test_training_skips_and_reports_corrupt_images(tmp_path, capsys):
    root = make_folder(tmp_path / "ds", classes=("a", "b"), per_class=7, size=32)  # + 2 bad = one batch of 16
    (root / "train" / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (root / "train" / "b" / "empty.png").write_bytes(b"")
    out = str(tmp_path / "o")
    assert train.main(FAST + ["--data", str(root), "--epochs", "2", "--out", out, "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert err.count("skipped 2 unreadable image(s)") == 1 and "broken.jpg" in err and "empty.png" in err
    assert probe.read_log(os.path.join(out, "log.jsonl"))[-1]["step"] == 2


# ---------------------------------------------------------------------------------------------
# --data imagenette: download, cache, resume, bad archives (a local server; no test touches the internet)
# ---------------------------------------------------------------------------------------------
def make_archive(path, top="imagenette2-160", n_train=2, n_val=1, extra=None, layout=("train", "val")):
    """A small .tgz with the fast.ai layout TOP/{train,val}/<10 classes>/*.JPEG (+ extra members)."""
    import io
    import tarfile
    with tarfile.open(path, "w:gz") as tar:
        def add(name, payload):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        for split, n in zip(layout, (n_train, n_val)):
            for c in range(10):
                for i in range(n):
                    buf = io.BytesIO()
                    Image.fromarray(np.full((20, 24, 3), 10 * c + i, dtype=np.uint8)).save(buf, "JPEG")
                    add(f"{top}/{split}/n0{c}/{i}.JPEG", buf.getvalue())
        for name, payload in (extra or {}).items():
            add(name, payload)
    return path


@pytest.fixture
def server(tmp_path):
    """A local HTTP server in a thread: serves the bytes in `srv.body` at any path, honours Range,
    logs requests (with their Range header), and can cut the next response after `srv.cut` bytes."""
    import http.server
    import threading
    srv = type("S", (), {"body": b"", "cut": None, "requests": []})()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            rng = self.headers.get("Range")
            srv.requests.append(rng)
            start = int(rng.split("=")[1].split("-")[0]) if rng else 0
            body = srv.body[start:]
            self.send_response(206 if rng else 200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if srv.cut is not None:
                body, srv.cut = body[:srv.cut], None
            self.wfile.write(body)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    srv.url = f"http://127.0.0.1:{httpd.server_address[1]}/"
    yield srv
    httpd.shutdown()


@pytest.fixture
def small_imagenette(monkeypatch, tmp_path, server):
    monkeypatch.setenv("NJEPA_DATA", str(tmp_path / "cache"))
    monkeypatch.setenv("NJEPA_MIRROR", server.url)
    monkeypatch.setitem(data.DOWNLOADS, "imagenette", ("imagenette2-160.tgz", "imagenette2-160", 20, 10))
    server.body = open(make_archive(tmp_path / "a.tgz"), "rb").read()
    return server


def test_imagenette_downloads_once_then_uses_the_cache(small_imagenette, tmp_path):
    ds = data.build_dataset("imagenette", "train")
    assert len(ds) == 20 and len(ds.classes) == 10 and small_imagenette.requests == [None]
    assert len(data.build_dataset("imagenette", "val")) == 10
    cache = tmp_path / "cache"
    assert sorted(os.listdir(cache)) == ["imagenette2-160"]  # no archive, .part or temp folder left
    assert (cache / "imagenette2-160" / data.READY).exists()
    data.build_dataset("imagenette", "train")
    assert small_imagenette.requests == [None]  # cache hit: no request


def test_probe_reads_the_folder_the_run_trained_on(small_imagenette, tmp_path, monkeypatch):
    """A run on a downloaded dataset records its folder; probe.py reads it from there even when
    $NJEPA_DATA now points elsewhere (no second download). Breaks if probe resolves the cache again."""
    out = str(tmp_path / "run")
    assert train.main(FAST + ["--data", "imagenette", "--batch", "10", "--subset-per-class", "2", "--epochs", "1", "--out", out]) == 0
    cfg = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["config"]
    assert cfg["data_path"] == str(tmp_path / "cache" / "imagenette2-160")
    monkeypatch.setenv("NJEPA_DATA", str(tmp_path / "elsewhere"))
    r = probe.run(probe.parse_args(["--ckpt", os.path.join(out, "ckpt.pt"), "--no-baseline"]))
    assert r["n_test"] == 10 and small_imagenette.requests == [None]  # the one download of the training run
    assert not os.path.exists(tmp_path / "elsewhere")


def test_interrupted_download_resumes_with_a_range_request(small_imagenette, tmp_path):
    small_imagenette.cut = len(small_imagenette.body) // 2
    with pytest.raises(data.DataError, match="run again to resume"):
        data.build_dataset("imagenette", "train")
    part = tmp_path / "cache" / "imagenette2-160.tgz.part"
    assert part.stat().st_size == len(small_imagenette.body) // 2
    assert not (tmp_path / "cache" / "imagenette2-160").exists()
    assert len(data.build_dataset("imagenette", "train")) == 20
    assert small_imagenette.requests == [None, f"bytes={len(small_imagenette.body) // 2}-"]


def test_corrupt_archive_is_deleted_and_nothing_looks_ready(small_imagenette, tmp_path):
    small_imagenette.body = small_imagenette.body[: len(small_imagenette.body) // 3]  # a truncated gzip, served whole
    with pytest.raises(data.DataError, match="corrupt or truncated") as e:
        data.build_dataset("imagenette", "train")
    assert "\n" not in str(e.value)
    assert os.listdir(tmp_path / "cache") == []  # archive deleted, no folder, no temp folder


def test_archive_with_path_traversal_or_wrong_layout_is_refused(small_imagenette, tmp_path):
    small_imagenette.body = open(make_archive(tmp_path / "evil.tgz", extra={"imagenette2-160/../../evil.txt": b"x"}), "rb").read()
    with pytest.raises(data.DataError, match="unsafe or unexpected member"):
        data.build_dataset("imagenette", "train")
    assert not (tmp_path / "evil.txt").exists() and os.listdir(tmp_path / "cache") == []
    small_imagenette.body = open(make_archive(tmp_path / "flat.tgz", layout=("training", "validation")), "rb").read()
    with pytest.raises(data.DataError, match="unexpected layout"):
        data.build_dataset("imagenette", "train")
    assert os.listdir(tmp_path / "cache") == []


def test_no_network_and_full_disk_are_one_line_errors(monkeypatch, tmp_path, small_imagenette):
    monkeypatch.setenv("NJEPA_MIRROR", "http://127.0.0.1:9/")  # nothing listens on the discard port
    with pytest.raises(data.DataError, match="could not download .* by hand") as e:
        data.build_dataset("imagenette", "train")
    assert "\n" not in str(e.value) and "--data ./imagenette2-160" in str(e.value)
    monkeypatch.setenv("NJEPA_MIRROR", small_imagenette.url)
    import errno

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(data.os, "replace", full)
    with pytest.raises(data.DataError, match="disk full"):
        data.build_dataset("imagenette", "train")
    r = run_cli("train.py", "--data", "imagenette", "--out", str(tmp_path / "o"),
                env={"NJEPA_DATA": str(tmp_path / "c2"), "NJEPA_MIRROR": "http://127.0.0.1:9/"})
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "could not download" in r.stderr


def test_missing_and_empty_dataset_folders_fail_with_one_line(tmp_path):
    r = run_cli("train.py", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr
    (tmp_path / "empty").mkdir()
    r = run_cli("train.py", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "no class sub-folders" in r.stderr and r.stderr.strip().count("\n") == 0
    (tmp_path / "empty" / "cls").mkdir()
    (tmp_path / "empty" / "cls" / "x.txt").write_text("x")
    assert train.main(["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2


# ---------------------------------------------------------------------------------------------
# train.py: bad config, a real run, exact resume, NaN, atomic save, signals, DDP
# ---------------------------------------------------------------------------------------------
def test_bad_config_is_rejected_before_work(tmp_path, capsys):
    out = str(tmp_path / "o")
    assert train.main(["--img", "30", "--patch", "8", "--out", out]) == 2
    assert "not divisible" in capsys.readouterr().err
    assert train.main(["--img", "12", "--patch", "4", "--out", out]) == 2
    assert "need at least 4x4" in capsys.readouterr().err
    assert train.main(["--noise", "loud", "--out", out]) == 2
    assert "--noise must be one of" in capsys.readouterr().err
    assert train.main(["--model", "vit_gigantic", "--out", out]) == 2
    assert "unknown model 'vit_gigantic'" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(out, "ckpt.pt"))


def read_losses(out):
    return [(r["step"], r["loss"]) for r in probe.read_log(os.path.join(out, "log.jsonl"))]


def test_training_loss_falls_and_writes_outputs(tmp_path):
    """A real run: the loss falls, the teacher stays away from collapse, and the EMA teacher moved from
    its initial weights towards the student (breaks if the EMA never runs, or if the run collapses)."""
    out = str(tmp_path / "run")
    assert train.main(FAST + ["--epochs", "6", "--out", out, "--lr", "2e-3", "--warmup", "1"]) == 0
    recs = probe.read_log(os.path.join(out, "log.jsonl"))
    assert len(recs) == 30 and recs[-1]["step"] == 30
    first, last = recs[0]["loss"], np.mean([r["loss"] for r in recs[-5:]])
    assert last < 0.8 * first, (first, last)
    assert all(r["nt"] > 0 and r["cn"] > 0 and r["sigma_mean"] > 0 for r in recs)
    assert recs[-1]["teacher_std"] > probe.COLLAPSE_STD
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["step"] == 30 and ckpt["config"]["lambda1"] == 0.1 and ckpt["pred_n"] is not None
    assert Image.open(os.path.join(out, "curves.png")).size[0] > 100
    os.makedirs(tmp_path / "copy")
    open(tmp_path / "copy" / "log.jsonl", "w").write(open(os.path.join(out, "log.jsonl")).read())
    assert report.main(["--plot", out, str(tmp_path / "copy"), "--plot-out", str(tmp_path / "two.png")]) == 0  # overlay
    assert Image.open(tmp_path / "two.png").size[1] > Image.open(os.path.join(out, "curves.png")).size[1]  # + legend
    init = probe.random_encoder("vit_tiny", 32, 8, 0).state_dict()  # the student at step 0 (seed 0)
    dist = lambda a, b: sum((a[k] - b[k]).pow(2).sum() for k in a if a[k].is_floating_point()).sqrt().item()
    s, t = ckpt["student"], ckpt["teacher"]
    assert dist(t, init) > 0 and dist(t, s) < dist(init, s) and dist(t, s) > 0


# Recorded on the code before the lean-core move (commit b3363c0, fp32, CPU): per step (loss, ct, nt, cn)
# of 10 steps (2 epochs of 5) at seed 0. Any change to init, data order, crops, masks, noise, the
# losses, the optimizer, the schedules or the EMA moves them (threads move them by ~1e-7 relative).
TRAJECTORY = {
    "njepa": [
        (0.502041101, 0.449270755, 0.458549887, 0.069153808),
        (0.491905093, 0.439852804, 0.45334053, 0.067182563),
        (0.467556268, 0.4173657, 0.439725637, 0.062180251),
        (0.438658297, 0.391138166, 0.420137912, 0.055063408),
        (0.404049575, 0.358171105, 0.403208405, 0.055576142),
        (0.369833946, 0.327091068, 0.372741789, 0.054686818),
        (0.344125301, 0.304584831, 0.345850229, 0.049554508),
        (0.316384107, 0.280149579, 0.317301661, 0.045043644),
        (0.29484874, 0.257829756, 0.313505203, 0.056684505),
        (0.28463468, 0.249617025, 0.296624333, 0.053552065),
    ],
    "ijepa": [
        (0.449270755, 0.449270755, 0.0, 0.0),
        (0.439843923, 0.439843923, 0.0, 0.0),
        (0.417275667, 0.417275667, 0.0, 0.0),
        (0.391083449, 0.391083449, 0.0, 0.0),
        (0.357822329, 0.357822329, 0.0, 0.0),
        (0.32677421, 0.32677421, 0.0, 0.0),
        (0.304647207, 0.304647207, 0.0, 0.0),
        (0.280170739, 0.280170739, 0.0, 0.0),
        (0.257880539, 0.257880539, 0.0, 0.0),
        (0.249948248, 0.249948248, 0.0, 0.0),
    ],
}


@pytest.mark.parametrize("mode", ["njepa", "ijepa"])
def test_trajectory_matches_the_recorded_losses(tmp_path, mode):
    """Behaviour does not change: the same 10 steps give the same four losses as recorded (rel. 1e-5)."""
    out = str(tmp_path / mode)
    extra = ["--lambda1", "0", "--lambda2", "0"] if mode == "ijepa" else []
    assert train.main(FAST + ["--epochs", "2", "--lr", "1e-3", "--warmup", "1", "--out", out] + extra) == 0
    got = [(r["loss"], r["ct"], r["nt"], r["cn"]) for r in probe.read_log(os.path.join(out, "log.jsonl")) if "loss" in r]
    assert len(got) == len(TRAJECTORY[mode])
    for step, (g, want) in enumerate(zip(got, TRAJECTORY[mode]), 1):
        assert g == pytest.approx(want, rel=1e-5, abs=1e-9), f"step {step}: {g} != {want}"


def test_targets_are_layer_normed_per_token_even_with_a_trained_final_norm():
    """I-JEPA regresses onto F.layer_norm(teacher(x)): mean 0, std 1 over features for every token.
    At initialisation the encoder's own final LayerNorm (unit weight, zero bias) already gives that,
    so the teacher's `norm` gets the affine it drifts to in training (weight ~ 1.5 +- 0.5, bias ~ 0.3);
    without the extra layer norm the targets then keep that scale and offset."""
    cfg = train.resolve_config(train.parse_args(["--img", "32", "--patch", "8", "--pred-depth", "1"]))
    torch.manual_seed(0)
    m = train.build_models(cfg)
    with torch.no_grad():
        m.teacher.norm.weight.copy_(1.5 + 0.5 * torch.randn_like(m.teacher.norm.weight))
        m.teacher.norm.bias.copy_(0.3 + 0.3 * torch.randn_like(m.teacher.norm.bias))
    context, targets = masks.sample_masks(2, 4, 4, generator=torch.Generator().manual_seed(0))
    images = torch.randn(2, 3, 32, 32)
    noise, _ = train.step_noise(cfg, 0, 0, 1, targets, torch.device("cpu"))
    _, _, target = train.forward_losses(cfg, images, context, targets, noise, m.student, m.teacher, m.pred_c, m.pred_n)
    assert target.mean(-1).abs().max() < 1e-5
    assert torch.allclose(target.var(-1, unbiased=False), torch.ones(target.shape[:-1]), atol=1e-3)


def test_loop_steps_the_optimizer_then_updates_the_teacher_with_the_new_student(tmp_path):
    """Alg. 1 lines 20-21: the AdamW step, then theta_bar <- q theta_bar + (1 - q) theta with the
    *updated* student. After one step of the loop, from theta_bar_0 = theta_0, the teacher must be
    q_0 theta_0 + (1 - q_0) theta_1. The EMA before the step would leave the teacher at theta_0."""
    out = str(tmp_path / "one")
    assert train.main(FAST + ["--epochs", "2", "--max-steps", "1", "--lr", "1e-3", "--out", out]) == 0
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    cfg = SimpleNamespace(**ckpt["config"])
    q = train.momentum_at(0, cfg, cfg.ipe)
    init = probe.random_encoder("vit_tiny", 32, 8, 0).state_dict()  # theta_0 = theta_bar_0 (Alg. 1 line 4)
    moved = 0.0
    for k, t in ckpt["teacher"].items():
        if t.is_floating_point() and k != "pos_embed":
            want = q * init[k] + (1 - q) * ckpt["student"][k]
            assert torch.allclose(t, want, atol=1e-7, rtol=1e-6), k
            moved = max(moved, (t - init[k]).abs().max().item())
    assert moved > 0  # the teacher did move off theta_0


def test_probe_evaluates_the_student_of_an_njepa_checkpoint_by_default(tmp_path):
    """Sec. 4.5: "we employ the student encoder" (SPEC 2, eval encoder); --encoder teacher switches.
    The checkpoint's student and teacher differ, so the loaded weights tell which one was taken.
    (An official I-JEPA checkpoint's default, its target encoder, is pinned in the I-JEPA test.)"""
    out = str(tmp_path / "run")
    assert train.main(FAST + ["--epochs", "1", "--max-steps", "2", "--lr", "1e-3", "--out", out]) == 0
    path = os.path.join(out, "ckpt.pt")
    ckpt = torch.load(path, weights_only=True)
    args = probe.parse_args(["--ckpt", path])
    args.ckpt = path
    enc, info = probe.load_encoder(args)
    assert info["name"] == "student"
    same = lambda net, state: all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    assert same(enc, ckpt["student"]) and not same(enc, ckpt["teacher"])
    args.encoder = "teacher"
    enc, info = probe.load_encoder(args)
    assert info["name"] == "teacher" and same(enc, ckpt["teacher"])


def test_loop_uses_scheduled_momentum_and_weight_decay_on_the_decay_group_only(tmp_path, monkeypatch):
    """Breaks if the loop passes a constant momentum to the EMA, or decays biases and norms."""
    seen = []
    real = train.ema_update
    monkeypatch.setattr(train, "ema_update", lambda t, s, m: (seen.append(m), real(t, s, m)))
    out = str(tmp_path / "m")
    assert train.main(FAST + ["--epochs", "2", "--out", out, "--max-steps", "4"]) == 0
    cfg = train.resolve_config(train.parse_args(FAST + ["--epochs", "2"]))
    assert seen == pytest.approx([train.momentum_at(s, cfg, 5) for s in range(4)]) and seen[3] > seen[0]  # ipe 80 / 16
    groups = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["optimizer"]["param_groups"]
    assert groups[0]["apply_wd"] and groups[0]["weight_decay"] == pytest.approx(train.wd_at(3, cfg, 5))
    assert groups[0]["weight_decay"] > 0.04  # the schedule moved (cosine 0.04 -> 0.4)
    assert not groups[1]["apply_wd"] and groups[1]["weight_decay"] == 0.0


def test_collapse_warning_is_printed_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(probe, "COLLAPSE_STD", 10.0)  # every run looks collapsed against this threshold
    assert train.main(FAST + ["--epochs", "1", "--max-steps", "3", "--out", str(tmp_path / "c")]) == 0
    assert capsys.readouterr().err.count("collapsing to a constant") == 1


def test_ijepa_mode_has_no_predictor_n(tmp_path):
    out = str(tmp_path / "ij")
    assert train.main(FAST + ["--epochs", "1", "--out", out, "--lambda1", "0", "--lambda2", "0"]) == 0
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["pred_n"] is None
    recs = probe.read_log(os.path.join(out, "log.jsonl"))
    assert all(r["nt"] == 0 and r["cn"] == 0 and r["loss"] == r["ct"] for r in recs)


@pytest.mark.parametrize("flags", [["--share-predictor"], ["--share-mask-token", "--noise", "single"],
                                   ["--cn-stopgrad", "--sigma-max", "0.5"]])
def test_ablation_switches_smoke(tmp_path, flags):
    """Smoke test of the command-line path of each switch (their effects are tested above)."""
    out = str(tmp_path / "sh")
    assert train.main(FAST + ["--epochs", "1", "--out", out, "--max-steps", "2"] + flags) == 0
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    if "--share-predictor" in flags:
        assert ckpt["pred_n"] is None
    elif "--share-mask-token" in flags:
        assert "mask_token" not in ckpt["pred_n"]
    else:
        recs = probe.read_log(os.path.join(out, "log.jsonl"))
        assert ckpt["config"]["cn_stopgrad"] and all(r["sigma_max"] <= 0.5 and r["sigma_clipped"] > 0 for r in recs)


def test_exact_resume_at_epoch_end_and_mid_epoch(tmp_path):
    base = FAST + ["--epochs", "3"]
    ref = str(tmp_path / "ref")
    assert train.main(base + ["--out", ref]) == 0
    for stop in (5, 7):  # 5 = end of epoch 1 (ipe 5), 7 = mid-epoch
        out = str(tmp_path / f"r{stop}")
        assert train.main(base + ["--out", out, "--max-steps", str(stop)]) == 0
        assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] == stop
        assert train.main(["--resume", "--out", out]) == 0
        assert read_losses(out) == read_losses(ref)
    a = torch.load(os.path.join(ref, "ckpt.pt"), weights_only=True)
    b = torch.load(os.path.join(str(tmp_path / "r7"), "ckpt.pt"), weights_only=True)
    assert all(torch.equal(a["teacher"][k], b["teacher"][k]) for k in a["teacher"])


def test_resume_refuses_another_config_and_fresh_run_refuses_overwrite(tmp_path, capsys):
    out = str(tmp_path / "o")
    assert train.main(FAST + ["--epochs", "2", "--out", out, "--max-steps", "1"]) == 0
    capsys.readouterr()
    assert train.main(FAST + ["--epochs", "1", "--out", out]) == 2
    assert "already exists" in capsys.readouterr().err
    assert train.main(["--resume", "--out", out, "--model", "vit_small"]) == 2
    err = capsys.readouterr().err
    assert "another config" in err and "vit_small" in err and err.count("\n") == 1
    # another --epochs bends every schedule: refused unless asked for
    assert train.main(["--resume", "--out", out, "--epochs", "3"]) == 2
    assert "--reschedule" in capsys.readouterr().err
    assert train.main(["--resume", "--out", out, "--epochs", "3", "--reschedule", "--max-steps", "2"]) == 0
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["config"]["epochs"] == 3
    assert train.main(["--resume", "--out", str(tmp_path / "none")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "nan")
    real, calls = losses.njepa_loss, {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        total, parts = real(*a, **k)
        return (total * float("nan") if calls["n"] == 8 else total), parts

    monkeypatch.setattr(losses, "njepa_loss", poisoned)
    assert train.main(FAST + ["--epochs", "3", "--out", out]) == 3  # ipe 5: NaN in epoch 2
    assert "loss became nan at step 7" in capsys.readouterr().err
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["step"] == 5 and all(torch.isfinite(v).all() for v in ckpt["student"].values())


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    model.save_checkpoint({"format": "njepa-1", "step": 1}, path)

    def crash(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        model.save_checkpoint({"format": "njepa-1", "step": 2}, path)
    monkeypatch.undo()
    assert model.load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_checkpoint_loading_is_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    path = str(tmp_path / "evil.pt")
    torch.save({"format": "njepa-1", "x": Evil()}, path)
    with pytest.raises(model.CheckpointError, match="cannot read checkpoint"):
        model.load_checkpoint(path)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_checkpoint_and_resume_continues(tmp_path, sig):
    """The signal goes to the whole process group, DataLoader worker included (as Ctrl-C does)."""
    out = str(tmp_path / "sig")
    root = make_folder(tmp_path / "ds", classes=("a", "b"), per_class=8, size=32)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "train.py", *FAST, "--data", str(root), "--workers", "1", "--epochs", "50",
                             "--out", out], cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    log = os.path.join(out, "log.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and len(probe.read_log(log) if os.path.exists(log) else []) < 3:
        time.sleep(0.2)
    os.killpg(proc.pid, sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    step = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"]
    assert step >= 3 and "stopped by signal" in stdout
    assert train.main(["--resume", "--out", out, "--max-steps", str(step + 2)]) == 0
    assert probe.read_log(log)[-1]["step"] == step + 2


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_equal_one_process_with_the_whole_batch(tmp_path):
    """DDP equivalence on gloo: 2 processes with 8 images each make the same steps as 1 process with 16
    (the same images, crops, masks and noise: all drawn for the global batch), to 1e-5. Breaks if the
    data shards overlap, the masks or noise depend on the rank, or the gradients are not averaged."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    args = [*FAST, "--epochs", "1", "--max-steps", "2", "--lr", "1e-2", "--warmup", "0", "--eval-every", "1", "--knn-queries", "25"]
    r = run_cli("train.py", *args, "--out", one)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                "train.py", *args, "--out", two)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=True) for d in (one, two))
    for part in ("student", "teacher", "pred_c", "pred_n"):
        for k, v in a[part].items():
            assert torch.allclose(v, b[part][k], atol=1e-5), (part, k)
    # online kNN at step 0: each rank encodes its shard (odd sizes: 80 and 25 over 2 ranks), rank 0 scores
    knn = [[r for r in probe.read_log(os.path.join(d, "log.jsonl")) if "knn_student" in r] for d in (one, two)]
    assert len(knn[0]) == len(knn[1]) == 1 and knn[1][0]["knn_queries"] == 25
    assert (knn[0][0]["knn_student"], knn[0][0]["knn_teacher"]) == (knn[1][0]["knn_student"], knn[1][0]["knn_teacher"])
    init = probe.random_encoder("vit_tiny", 32, 8, 0).state_dict()["blocks.0.attn.qkv.weight"]
    assert not torch.allclose(a["student"]["blocks.0.attn.qkv.weight"], init)  # the step did move the weights
    r = run_cli("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                "train.py", *FAST, "--batch", "3", "--epochs", "1", "--out", str(tmp_path / "bad"))
    assert r.returncode != 0 and "multiple of the 2 processes" in r.stderr


def test_collectives_use_the_loss_device(monkeypatch):
    """The stop flags are all-reduced on the device of the loss: NCCL serves CUDA tensors only, and a
    CPU flags tensor crashed every multi-GPU run at step 0. Checked with a tensor on the 'meta' device
    and a spy all_reduce that rejects tensors on any other device."""
    seen = []

    def all_reduce(t, op=None):
        seen.append(t.device)
        assert t.device.type == "meta", f"collective on {t.device}, loss on meta"

    monkeypatch.setattr(train.dist, "all_reduce", all_reduce)
    flags = train.stop_flags(torch.empty((), device="meta"), True, world=2)
    assert seen == [torch.device("meta")] and flags.shape == (2,)
    assert train.stop_flags(torch.tensor(float("nan")), False, world=1).tolist() == [1.0, 0.0]
    assert train.process_group_backend(torch.device("cuda", 0)) == "cpu:gloo,cuda:nccl"
    assert train.process_group_backend(torch.device("cpu")) == "gloo"


def test_device_comes_from_local_rank_under_torchrun():
    """--device cuda under torchrun: each process takes the GPU of its LOCAL_RANK (it was GPU 0 for all)."""
    assert train.resolve_device("cuda", local_rank=3, world=8, n_gpus=8) == torch.device("cuda", 3)
    assert train.resolve_device("cuda:0", local_rank=1, world=2, n_gpus=2) == torch.device("cuda", 1)
    assert train.resolve_device("auto", local_rank=1, world=2, n_gpus=2) == torch.device("cuda", 1)
    assert train.resolve_device("cuda", local_rank=0, world=1, n_gpus=1) == torch.device("cuda", 0)
    assert train.resolve_device("auto", local_rank=0, world=1, n_gpus=0) == torch.device("cpu")
    with pytest.raises(train.ConfigError, match="LOCAL_RANK 2 needs GPU 2, but this node has 2"):
        train.resolve_device("cuda", local_rank=2, world=4, n_gpus=2)
    with pytest.raises(train.ConfigError, match="no CUDA device"):
        train.resolve_device("cuda", local_rank=0, world=1, n_gpus=0)


def test_requirements_and_ci_agree_with_the_code():
    """AdamW(fused=True) on CPU needs torch >= 2.4: requirements.txt and .ci/run must ask for that."""
    req = open(os.path.join(HERE, "requirements.txt")).read()
    ci = open(os.path.join(HERE, ".ci", "run")).read()
    assert "torch>=2.4" in req.replace(" ", "") and "(2, 4)" in ci
    assert tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 4)


def test_compile_runs_two_steps_on_cpu(tmp_path):
    """--compile (inductor needs a C++ compiler) gives the same first losses as eager, to 1e-3."""
    import shutil
    if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        pytest.skip("torch.compile on CPU needs a C++ compiler (g++, c++ or clang++); none on PATH")
    eager, comp = str(tmp_path / "e"), str(tmp_path / "c")
    args = [*FAST, "--epochs", "1", "--max-steps", "2", "--lambda1", "0", "--lambda2", "0"]
    assert run_cli("train.py", *args, "--out", eager).returncode == 0
    r = run_cli("train.py", *args, "--out", comp, "--compile")
    assert r.returncode == 0, r.stderr[-2000:]
    assert [l for _, l in read_losses(comp)] == pytest.approx([l for _, l in read_losses(eager)], rel=1e-3)


# ---------------------------------------------------------------------------------------------
# probe.py
# ---------------------------------------------------------------------------------------------
def blobs(n_per_class, dim=32, classes=5, spread=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)) * spread
    y = torch.arange(classes).repeat_interleave(n_per_class)
    return centers[y] + torch.randn(len(y), dim, generator=g), y


def test_lbfgs_probe_separates_blobs_is_deterministic_and_sees_through_shuffled_labels():
    """Breaks if the classifier is not fit (a broken closure: ~20 %), or if the probe seed moves top-1."""
    x, y = blobs(60)
    tx, ty = blobs(20, seed=1)
    runs = [probe.linear_probe(x, y, tx, ty, 5, seed=s) for s in (0, 1, 2)]
    assert all(r["top1"] > 0.95 and r["solver"] == "lbfgs" and r["n_train"] == 300 for r in runs)
    again = probe.linear_probe(x, y, tx, ty, 5, seed=0)
    assert {k: v for k, v in again.items() if k != "solve_s"} == {k: v for k, v in runs[0].items() if k != "solve_s"}
    # shuffled training labels: nothing to learn, top-1 within 5 points of chance (20 %) on a large test set
    x2, y2 = blobs(200, classes=5)
    tx2, ty2 = blobs(400, classes=5, seed=1)
    shuffled = y2[torch.randperm(len(y2), generator=torch.Generator().manual_seed(0))]
    assert abs(probe.linear_probe(x2, shuffled, tx2, ty2, 5)["top1"] - 0.2) < 0.05
    low = probe.linear_probe(x, y, tx, ty, 5, label_fraction=0.1)
    assert low["n_train"] == 30 and low["top1"] > 0.8
    sgd = probe.linear_probe(x, y, tx, ty, 5, solver="sgd", epochs=30, batch=64)
    assert sgd["top1"] > 0.9 and sgd["solver"] == "sgd"


def test_lbfgs_converges_to_the_optimum():
    """The returned weights are a stationary point of the regularised objective (gradient ~ 0).
    Breaks with too few iterations (max_iter=5) or a penalty that disagrees with the docstring."""
    x, y = blobs(40, dim=16, spread=0.7)
    x = ((x - x.mean(0)) / x.std(0)).double()
    wide, wy = blobs(4, dim=60, spread=0.7)  # fewer samples (20) than features (60): the SVD path
    wide = ((wide - wide.mean(0)) / wide.std(0)).double()
    for x, y, l2 in ((x, y, 1e-1), (x, y, 1e-4), (wide, wy, 1e-1)):
        w = probe.fit_logreg(x, y, 5, l2).requires_grad_(True)
        xb = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        loss = torch.nn.functional.cross_entropy(xb @ w.T, y) + 0.5 * l2 * w[:, :-1].pow(2).sum()
        loss.backward()
        assert w.grad.abs().max() < 1e-5, (l2, w.grad.abs().max())


def test_chosen_l2_is_the_one_the_folds_prefer():
    """Few noisy samples in many dimensions. The pick must be the argmax of the fold accuracies,
    recomputed here by hand, ties going to the stronger L2 (here 0.1 ties with 1e-6). Breaks if
    choose_l2 picks the first or the last value of the grid, or breaks ties the other way."""
    x, y = blobs(8, dim=60, spread=0.15)
    x = ((x - x.mean(0)) / x.std(0)).double()
    grid = (1.0, 1e-1, 1e-3, 1e-6)
    chosen, scores = probe.choose_l2(x, y, 5, grid, 4, torch.Generator().manual_seed(0), repeats=1)
    fold = probe.stratified_folds(y, 4, torch.Generator().manual_seed(0))
    by_hand = [0.0] * len(grid)
    for f in range(4):
        for j, w in enumerate(probe.logreg_path(x[fold != f], y[fold != f], 5, grid)):
            by_hand[j] += (probe.predict(w, x[fold == f]) == y[fold == f]).double().mean().item() / 4
    assert [round(v, 6) for v in scores.values()] == [round(v, 6) for v in by_hand]
    assert chosen == grid[max(range(len(grid)), key=lambda j: (round(by_hand[j], 12), -j))]
    assert chosen == 1e-1 and len(set(round(v, 6) for v in by_hand)) > 1  # an interior pick: the grid matters


def test_linear_probe_standardises_features_so_their_scale_does_not_matter():
    """SPEC 2 (linear probe): the classifier sees features standardised with the training labels'
    mean and std, so rescaling or shifting any feature changes nothing: the same L2 is chosen and the
    same test images are right. Without the standardisation the L2 penalty weighs features by scale."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 1.5
    y, ty = torch.arange(400) % 4, torch.arange(200) % 4
    x, tx = centres[y] + torch.randn(400, 16, generator=g) * 2, centres[ty] + torch.randn(200, 16, generator=g) * 2
    scale = torch.logspace(-3, 2, 16)  # features from 1e-3 to 1e2 in size
    shift = torch.linspace(-50, 50, 16)
    a = probe.linear_probe(x, y, tx, ty, 4, repeats=1)
    b = probe.linear_probe(x * scale + shift, y, tx * scale + shift, ty, 4, repeats=1)
    assert (a["top1"], a["chosen"]) == (b["top1"], b["chosen"]) and a["top1"] > 0.5


def test_linear_probe_refits_on_all_labels_with_the_chosen_l2():
    """SPEC 2 (linear probe): after the folds choose the L2, the classifier is refit on all the training
    labels with that L2 (warm-started down the grid) and the test split is scored once. The top-1 equals
    that of a refit by hand; a refit with another L2 of the grid gives another top-1 on these features."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 24, generator=g)  # labels = argmax of a linear map: a weak L2 (large weights) fits best
    x, tx = torch.randn(1000, 24, generator=g), torch.randn(500, 24, generator=g)
    y, ty = (x @ w.T).argmax(1), (tx @ w.T).argmax(1)
    res = probe.linear_probe(x, y, tx, ty, 5, repeats=1)
    assert res["chosen"] < 1e-3  # measured: 1e-6
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z, tz = ((x - mean) / std).double(), ((tx - mean) / std).double()
    top1 = lambda l2: (probe.predict(probe.logreg_path(z, y, 5, [v for v in probe.L2_GRID if v >= l2])[-1], tz) == ty).double().mean().item()
    assert res["top1"] == top1(res["chosen"])
    assert any(top1(l2) != res["top1"] for l2 in probe.L2_GRID if l2 != res["chosen"])

def test_stratified_folds_balance_classes():
    y = torch.tensor([0] * 10 + [1] * 7 + [2] * 3)
    fold = probe.stratified_folds(y, 5, torch.Generator().manual_seed(0))
    for c in range(3):
        counts = fold[y == c].bincount(minlength=5)
        assert counts.max() - counts.min() <= 1


def test_stratified_subset_counts():
    labels = torch.tensor([0] * 100 + [1] * 50 + [2] * 7)
    idx = probe.stratified_subset(labels, 0.1, torch.Generator().manual_seed(0))
    assert labels[idx].bincount().tolist() == [10, 5, 1]
    assert len(set(idx.tolist())) == len(idx)
    idx2 = probe.stratified_subset(labels, 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(idx, idx2)


def test_probe_cli_baseline_cache_layers_fractions_and_classes(tmp_path, capsys):
    root = make_folder(tmp_path / "ds", classes=("a", "b", "c"), per_class=6, size=32, splits=("train", "test"))
    out = str(tmp_path / "run")
    assert train.main(FAST + ["--data", str(root), "--batch", "6", "--epochs", "1", "--out", out]) == 0
    ck = os.path.join(out, "ckpt.pt")
    r1 = probe.run(probe.parse_args(["--ckpt", ck]))
    assert not r1["features_cached"] and 0 <= r1["top1"] <= 1 and r1["n_test"] == 18
    assert r1["gain"] == pytest.approx(r1["top1"] - r1["random_init"]["top1"]) and r1["train"]["steps"] == 3
    line = capsys.readouterr().out
    assert "probe | pretrained" in line and "| random init" in line
    r2 = probe.run(probe.parse_args(["--ckpt", ck]))
    assert r2["features_cached"] and r2["top1"] == r1["top1"] and r2["random_init"] == r1["random_init"]
    assert json.load(open(os.path.join(out, "probe.json")))["top1"] == r2["top1"]
    r4 = probe.run(probe.parse_args(["--ckpt", ck, "--last-layers", "4", "--encoder", "teacher", "--no-baseline"]))
    assert not r4["features_cached"] and "random_init" not in r4
    r5 = probe.run(probe.parse_args(["--ckpt", ck, "--label-fraction", "0.5", "--no-baseline"]))
    assert r5["n_train"] == 9
    rnd = probe.run(probe.parse_args(["--random-init", "--model", "vit_tiny", "--img", "32", "--patch", "8",
                                      "--data", str(root), "--out", str(tmp_path / "rnd")]))
    assert rnd["top1"] == r1["random_init"]["top1"]  # the same encoder: the run's student at step 0
    pix = probe.run(probe.parse_args(["--pixels", "--img", "32", "--data", str(root), "--out", str(tmp_path / "pix")]))
    assert 0 <= pix["top1"] <= 1 and pix["encoder"] == "pixels"
    other = make_folder(tmp_path / "other", classes=("x", "y"), per_class=3, size=32, splits=("train", "test"))
    assert probe.main(["--ckpt", ck, "--data", str(other)]) == 2
    assert "other classes" in capsys.readouterr().err
    assert probe.main(["--ckpt", str(tmp_path / "missing.pt")]) == 2


def test_probe_features_are_the_mean_over_patch_tokens_of_the_final_normed_output():
    """Sec. 4.5: "averaging its output": one feature vector per image is the mean over its N patch tokens
    of the encoder's final-normed output [B, N, D] (no class token), on the evaluation crop; with
    --last-layers k the same for each of the last k blocks, concatenated (Table 6b)."""
    ds = data.build_dataset("shapes", "test", 32, subset_per_class=1)
    torch.manual_seed(0)
    enc = model.vit("vit_tiny", img_size=32, patch_size=8).eval()
    x, y = probe.extract_features(enc, ds, 32, 1, torch.device("cpu"))
    images, labels, _ = data.eval_images(ds, list(range(len(ds))), 32)
    with torch.no_grad():
        out = enc(data.normalize(images))  # [B, N, D]
        layers = enc(data.normalize(images), return_layers=4)
    assert out.shape[1] == 16 and torch.allclose(x, out.mean(1), atol=1e-5) and torch.equal(y, labels)
    x4, _ = probe.extract_features(enc, ds, 32, 4, torch.device("cpu"))
    assert torch.allclose(x4, torch.cat([o.mean(1) for o in layers], 1), atol=1e-5) and x4.shape[1] == 4 * 192

def test_random_init_twin_is_the_students_initialisation():
    cfg = cfg_for(model="vit_tiny", img=32, patch=8, seed=3)
    torch.manual_seed(3)  # what train() does before build_models
    student = train.build_models(cfg).student.state_dict()
    twin = probe.random_encoder("vit_tiny", 32, 8, 3).state_dict()
    assert all(torch.equal(student[k], twin[k]) for k in student)


def official_checkpoint(path, seed=0):
    """A checkpoint in I-JEPA's layout (src/train.py save_checkpoint): encoder / predictor /
    target_encoder state dicts of DDP-wrapped modules (keys start with 'module.'), plus epoch, opt,
    loss, batch_size, world_size, lr. Made from a small model; target encoder != encoder."""
    torch.manual_seed(seed)
    enc, tgt = model.vit_tiny(img_size=32, patch_size=8), model.vit_tiny(img_size=32, patch_size=8)
    pred = model.Predictor(4, 192, 96, depth=2, num_heads=3)
    wrap = lambda m: {f"module.{k}": v for k, v in m.state_dict().items()}
    opt = torch.optim.AdamW(enc.parameters()).state_dict()
    torch.save({"encoder": wrap(enc), "predictor": wrap(pred), "target_encoder": wrap(tgt), "opt": opt,
                "scaler": None, "epoch": 300, "loss": 0.1, "batch_size": 128, "world_size": 16, "lr": 1e-3}, path)
    return enc, tgt, pred


def test_probe_reads_an_official_ijepa_checkpoint(tmp_path, capsys):
    """Detected, loaded with weights_only, the architecture read off the weights; the features equal
    those of the njepa model with the same weights; target_encoder by default, as I-JEPA evaluated."""
    path = str(tmp_path / "IN1K-vit.t.8-1e.pth.tar")
    enc, tgt, _ = official_checkpoint(path)
    args = probe.parse_args(["--ckpt", path, "--data", "shapes"])
    args.ckpt = path
    loaded, info = probe.load_encoder(args)
    assert (info["model"], info["img"], info["patch"], info["name"]) == ("vit_tiny", 32, 8, "target_encoder")
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(loaded.eval()(x), tgt.eval()(x), atol=1e-6)
    args.encoder = "encoder"
    assert torch.allclose(probe.load_encoder(args)[0].eval()(x), enc.eval()(x), atol=1e-6)
    assert "vit_tiny, patch 8, 32 px" in capsys.readouterr().out
    res = probe.run(probe.parse_args(["--ckpt", path, "--data", "shapes", "--subset-per-class", "10", "--no-baseline"]))
    assert 0 <= res["top1"] <= 1 and res["encoder"] == "target_encoder"
    assert probe.main(["--ckpt", path, "--data", "shapes", "--img", "64"]) == 2
    assert "trained at 32 px" in capsys.readouterr().err
    bad = tmp_path / "other.pth.tar"
    torch.save({"encoder": {"module.patch_embed.proj.weight": torch.zeros(100, 3, 8, 8), "module.pos_embed": torch.zeros(1, 16, 100),
                            "module.blocks.0.mlp.fc1.weight": torch.zeros(400, 100)}, "predictor": {}, "target_encoder": {}}, bad)
    assert probe.main(["--ckpt", str(bad), "--data", "shapes", "--encoder", "encoder"]) == 2
    assert "fits no preset" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert probe.main(["--ckpt", str(tmp_path / "junk.pt"), "--data", "shapes"]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err


def test_init_from_an_ijepa_checkpoint_starts_from_its_weights(tmp_path, monkeypatch):
    """--init-from: the architecture comes from the weights, the first step's teacher features are the
    checkpoint's target encoder's, predictor C is its predictor and predictor N a copy of it; the
    optimizer starts fresh and the run records where it started."""
    path = str(tmp_path / "ijepa.pth.tar")
    enc, tgt, pred = official_checkpoint(path)
    seen = {}
    real = train.forward_losses

    def spy(cfg, images, context, targets, noise, student, teacher, pred_c, pred_n):
        if not seen:
            seen.update(images=images, teacher=teacher(images).detach(), student=student(images).detach(),
                        c=pred_c.state_dict(), n={k: v.clone() for k, v in pred_n.state_dict().items()})
        return real(cfg, images, context, targets, noise, student, teacher, pred_c, pred_n)

    monkeypatch.setattr(train, "forward_losses", spy)
    out = str(tmp_path / "run")
    args = ["--init-from", path, "--batch", "16", "--subset-per-class", "8", "--epochs", "1", "--max-steps", "2", "--out", out,
            "--precision", "fp32"]
    assert train.main(args) == 0
    with torch.no_grad():
        assert torch.allclose(seen["teacher"], tgt.eval()(seen["images"]), atol=1e-5)
        assert torch.allclose(seen["student"], enc.eval()(seen["images"]), atol=1e-5)
    assert all(torch.equal(seen["n"][k], v) for k, v in pred.state_dict().items() if k in seen["n"])
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["config"]["init_from"] == path and ckpt["config"]["pred_depth"] == 2 and ckpt["config"]["patch"] == 8
    assert ckpt["step"] == 2 and len(ckpt["optimizer"]["state"]) > 0
    assert train.main(args[:2] + ["--img", "64", "--out", str(tmp_path / "r2")]) == 2  # its pos_embed fixes 32 px


def fake_result(seed, top1, base, **cfg):
    config = {"model": "vit_tiny", "lambda1": 0.1, "lambda2": 0.1, "noise": "multi", "seed": seed, "out": f"r{seed}", **cfg}
    return {"top1": top1, "config": config, "encoder": "student", "last_layers": 1, "label_fraction": 1.0, "solver": "lbfgs",
            "random_init": {"top1": base}, "gain": top1 - base, "train": {"final_teacher_std": 0.5, "collapsed": top1 < 0.3}}


def test_knn_separates_blobs_sees_chance_on_shuffled_labels_and_is_deterministic():
    """DINO's weighted kNN: separable blobs -> 100 %, shuffled bank labels -> chance (5 classes: 20 %),
    the same answer twice. Breaks if the votes ignore the labels or the neighbours are the farthest."""
    x, y = blobs(60, classes=5)
    tx, ty = blobs(40, classes=5, seed=1)
    assert probe.knn_top1(x, y, tx, ty, 5) == 1.0
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    accs = [probe.knn_top1(x, shuffled, tx, ty, 5) for _ in range(2)]
    assert accs[0] == accs[1] and abs(accs[0] - 0.2) < 0.12
    # k = 1 on a hand-made case: the query takes its nearest neighbour's class
    bank, labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.1]]), torch.tensor([0, 1, 2])
    assert probe.knn_top1(bank, labels, torch.tensor([[0.9, 0.2], [0.1, 0.9]]), torch.tensor([0, 1]), 3, k=1) == 1.0


def test_knn_votes_are_weighted_by_exp_similarity_over_dinos_temperature():
    """DINO's eval_knn (k = 20, T = 0.07): neighbours vote with exp(cos / T). One close neighbour of class
    0 (cos 0.99) against two farther ones of class 1 (cos 0.80): at T = 0.07 the close one outweighs
    them (e^14.1 against 2 e^11.4); at T = 0.7 the two would win (e^1.41 against 2 e^1.14)."""
    assert (probe.KNN_K, probe.KNN_T) == (20, 0.07)
    q = torch.tensor([[1.0, 0.0]])
    at = lambda c: torch.tensor([[c, math.sqrt(1 - c * c)]])
    bank = torch.cat([at(0.99), at(0.80), torch.tensor([[0.80, -0.6]]), torch.tensor([[-1.0, 0.0]])])
    labels = torch.tensor([0, 1, 1, 0])
    assert probe.knn_top1(bank, labels, q, torch.tensor([0]), 2, k=3, temperature=probe.KNN_T) == 1.0
    assert probe.knn_top1(bank, labels, q, torch.tensor([1]), 2, k=3, temperature=0.7) == 1.0


def test_probe_l2_grid_reaches_down_to_1e_6_strongest_first():
    """SPEC 2 (linear probe): random-init features preferred L2 1e-6 - 1e-5, and a grid that started at
    1e-4 cost them 2-3 points; the grid runs strongest first, so each fit warm-starts the next."""
    grid = probe.L2_GRID
    assert min(grid) <= 1e-6 and max(grid) >= 1e-1 and list(grid) == sorted(grid, reverse=True)

def test_online_knn_leaves_the_run_unchanged_and_logs_student_and_teacher(tmp_path, capsys):
    """A run with the online kNN makes exactly the losses and weights of a run without it, logs student
    and teacher top-1 at step 0 and after each epoch, prints one line each, and draws them. The eval
    draws from no generator of the run (torch's global state is untouched) and gives every module
    back its train/eval mode. Breaks if the eval changes the RNG state or leaves a module in eval mode."""
    runs = {}
    for e in ("0", "1"):
        out = str(tmp_path / f"e{e}")
        assert train.main(FAST + ["--epochs", "2", "--out", out, "--eval-every", e, "--knn-queries", "60"]) == 0
        runs[e] = out
    loss_recs = lambda out: [(r["step"], r["loss"], r["ct"]) for r in probe.read_log(os.path.join(out, "log.jsonl")) if "loss" in r]
    assert loss_recs(runs["0"]) == loss_recs(runs["1"])
    a, b = (torch.load(os.path.join(runs[e], "ckpt.pt"), weights_only=True) for e in ("0", "1"))
    assert all(torch.equal(a["student"][k], b["student"][k]) for k in a["student"])
    knn = [r for r in probe.read_log(os.path.join(runs["1"], "log.jsonl")) if "knn_student" in r]
    assert [r["step"] for r in knn] == [0, 5, 10] and not any("knn_student" in r for r in probe.read_log(os.path.join(runs["0"], "log.jsonl")))
    assert knn[0]["knn_student"] == knn[0]["knn_teacher"]  # step 0: the teacher is the student's copy
    assert all(0 <= r["knn_teacher"] <= 1 and r["knn_bank"] == 80 and r["knn_queries"] == 60 for r in knn)
    assert capsys.readouterr().out.count("knn | epoch") == 3
    # the eval itself: RNG state and modes untouched
    cfg = train.resolve_config(train.parse_args(FAST + ["--epochs", "2", "--eval-every", "1", "--knn-queries", "60"]))
    cfg.precision = "fp32"
    m = train.build_models(cfg)
    m.teacher.eval()  # whatever mode each module is in, it comes back in it
    with torch.no_grad():  # a teacher that differs from the student, so that both are encoded
        m.teacher.blocks[0].mlp.fc1.weight.mul_(1.5)
    ds = data.build_dataset("shapes", "train", 32, 8)
    rng = torch.get_rng_state()
    ev = probe.OnlineKnn(cfg, ds, 0, 1, torch.device("cpu"), True)
    res = ev.evaluate(m, model.autocast_for(torch.device("cpu"), "fp32"))
    assert torch.equal(rng, torch.get_rng_state()) and m.student.training and not m.teacher.training
    assert all(mod.training for mod in m.student.modules())
    assert set(res) >= {"knn_student", "knn_teacher"} and res["knn_s"] >= 0


def test_online_knn_without_a_val_split_is_a_notice_not_a_crash(tmp_path, capsys):
    root = make_folder(tmp_path / "ds", per_class=8, size=32, splits=("train",))
    assert train.main(FAST + ["--data", str(root), "--epochs", "1", "--eval-every", "1", "--out", str(tmp_path / "o")]) == 0
    assert "notice: no online kNN" in capsys.readouterr().out
    assert train.resolve_config(train.parse_args(["--data", str(root)])).eval_every == 0  # a folder: off by default
    cfg = train.resolve_config(train.parse_args(["--epochs", "4"]))  # built-in data: on, as often as <= 10 % allows
    assert cfg.eval_every is None
    probe.OnlineKnn(cfg, data.build_dataset("shapes", "train", 32), 0, 1, torch.device("cpu"), True)
    assert cfg.eval_every == 2  # (0.5 + 2 evals) x 1,000 eval images x 0.77 <= 10 % of 4 x 5,000 training images
    assert probe.default_eval_every(20, 9469, 2000) == 2 and probe.default_eval_every(100, 9469, 2000) == 2
    capsys.readouterr()
    assert probe.default_eval_every(10, 1000, 2000) == 10  # too short for 10 %: start and end only, and a notice
    assert "costs about 23 %" in capsys.readouterr().out


def test_snapshots_are_weights_only_probed_per_epoch_and_off_by_default(tmp_path, capsys):
    """--keep-every E keeps ckpt-eE.pt (weights and config, no optimizer, weights_only loadable); none
    without the flag; a snapshot cannot be resumed; probe.py writes probe-eE.json for each and its
    table orders the points of one run by epoch."""
    root = make_folder(tmp_path / "ds", classes=("a", "b", "c"), per_class=6, size=32, splits=("train", "test"))
    out, plain = str(tmp_path / "run"), str(tmp_path / "plain")
    assert train.main(FAST + ["--data", str(root), "--batch", "6", "--epochs", "3", "--out", out, "--keep-every", "1,3"]) == 0
    assert train.main(FAST + ["--data", str(root), "--batch", "6", "--epochs", "1", "--out", plain]) == 0
    assert sorted(f for f in os.listdir(out) if f.startswith("ckpt")) == ["ckpt-e1.pt", "ckpt-e3.pt", "ckpt.pt"]
    assert sorted(f for f in os.listdir(plain) if f.startswith("ckpt")) == ["ckpt.pt"]
    snap = torch.load(os.path.join(out, "ckpt-e1.pt"), weights_only=True)
    assert snap["epoch"] == 1 and snap["step"] == 3 and "optimizer" not in snap and snap["config"]["keep_every"] == "1,3"
    full = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert not all(torch.equal(snap["student"][k], full["student"][k]) for k in full["student"])
    assert train.main(["--resume", os.path.join(out, "ckpt-e1.pt"), "--out", out]) == 2
    assert "weights-only snapshot" in capsys.readouterr().err
    assert train.snapshot_epochs("25", 100) == {25, 50, 75, 100} and train.snapshot_epochs(None, 10) == set()
    with pytest.raises(train.ConfigError):
        train.snapshot_epochs("x", 10)
    assert probe.main(["--ckpt", os.path.join(out, "ckpt-e3.pt"), os.path.join(out, "ckpt-e1.pt")]) == 0
    assert report.main(["--table", os.path.join(out, "probe-e*.json")]) == 0
    text = capsys.readouterr().out
    assert os.path.exists(os.path.join(out, "probe-e1.json")) and os.path.exists(os.path.join(out, "probe-e3.json"))
    r1 = json.load(open(os.path.join(out, "probe-e1.json")))
    assert r1["epoch"] == 1 and r1["train"]["steps"] == 3  # the snapshot's own point of the log
    rows = [line.split("|")[2].strip() for line in text.splitlines() if line.startswith("| I-JEPA") or line.startswith("| N-JEPA")]
    assert rows == ["1", "3"]  # one row per epoch, in order


def test_learning_curves_average_seeds_per_arm_and_draw(tmp_path):
    """tools/report.py --curves: kNN from log.jsonl and probe top-1 from the snapshot results, per arm the mean
    over seeds and the band between the lowest and highest seed. Breaks if seeds of one arm are drawn as
    separate arms, or if 10 %-label results leak into the probe curve."""
    folders = []
    for arm, lam in (("ij", 0.0), ("nj", 0.1)):
        for seed in (0, 1):
            d = tmp_path / f"{arm}-s{seed}"
            d.mkdir()
            with open(d / "log.jsonl", "w") as f:
                for e, acc in ((0, 0.30), (5, 0.32 + 0.02 * seed), (10, 0.40 + 0.02 * seed)):
                    f.write(json.dumps({"step": 10 * e, "epoch": e, "knn_student": acc, "knn_teacher": acc - 0.01}) + "\n")
                    f.write(json.dumps({"step": 10 * e + 1, "epoch": e + 0.1, "loss": 0.1}) + "\n")
            for e, top1 in ((5, 0.40 + 0.02 * seed), (10, 0.50 + 0.02 * seed)):
                for frac in (1.0, 0.1):
                    r = fake_result(seed, top1 if frac == 1.0 else 0.0, 0.38, lambda1=lam, lambda2=lam, epochs=10)
                    r.update(epoch=e, label_fraction=frac)
                    with open(d / "probe.jsonl", "a") as f:
                        f.write(json.dumps(r) + "\n")
            folders.append(str(d))
    cfg, knn, probes = report.run_points(folders[1])
    assert cfg["seed"] == 1 and knn[1] == (5, pytest.approx(34.0), pytest.approx(33.0))
    assert probes == [(5, pytest.approx(42.0), pytest.approx(38.0)), (10, pytest.approx(52.0), pytest.approx(38.0))]
    bands = report.curve_bands([report.run_points(f)[2] for f in folders[:2]], 1)
    assert bands[10] == (pytest.approx(51.0), pytest.approx(50.0), pytest.approx(52.0), 2)
    out = str(tmp_path / "lc.png")
    assert report.main(["--curves", *folders, "--curves-out", out]) == 0
    img = Image.open(out)
    assert img.size == (920, 300 + 18 * 2 + 8)  # two panels, a legend line per arm (2 arms, not 4 runs)


def test_knn_curve_table_pairs_seeds_not_positions(tmp_path):
    """tools/report.py --curves prints the kNN panel's numbers: per epoch, each arm's mean ± std over seeds and
    N-JEPA minus I-JEPA paired by seed. The N-JEPA folders come in another seed order than I-JEPA's, so
    pairing by position gives another spread; an epoch one seed lacks is averaged over the others."""
    knn = {("ij", 0): {0: 30, 5: 30}, ("ij", 1): {0: 30, 5: 32}, ("ij", 2): {0: 30, 5: 34},
           ("nj", 2): {0: 30, 5: 37}, ("nj", 0): {0: 30, 5: 31}, ("nj", 1): {0: 30}}
    folders = []
    for (arm, seed), points in knn.items():
        d = tmp_path / f"{arm}-s{seed}"
        d.mkdir()
        lam = 0.0 if arm == "ij" else 0.1
        (d / "config.json").write_text(json.dumps(fake_result(seed, 0, 0, lambda1=lam, lambda2=lam, epochs=10)["config"]))
        (d / "log.jsonl").write_text("".join(json.dumps({"step": 10 * e, "epoch": e, "knn_student": v / 100, "knn_teacher": 0.2}) + "\n"
                                             for e, v in points.items()))
        folders.append(str(d))
    lines = report.knn_curve_table([report.run_points(f) for f in folders]).splitlines()
    assert lines[0] == "| epoch | I-JEPA kNN % | N-JEPA kNN % | N-JEPA - I-JEPA (paired) |"
    assert lines[3] == "| 5 | 32.0 ± 2.0 (3) | 34.0 ± 4.2 (2) | 2.0 ± 1.4 (2) |"  # diffs +1 (seed 0), +3 (seed 2)


def test_table_groups_by_config_and_pairs_seeds(tmp_path, capsys):
    """Mean ± std over seeds per arm, and the paired difference to I-JEPA with the same seed. Breaks if
    runs are grouped by seed or out folder, or if the difference is taken between unpaired means."""
    results = [fake_result(s, t, b, lambda1=0.0, lambda2=0.0) for s, t, b in ((0, 0.50, 0.40), (1, 0.60, 0.41), (2, 0.55, 0.42))]
    results[0]["config"].update(n_targets=4, start_lr=1e-4, pred_dim=None)  # a run of older code: same arm
    results += [fake_result(s, t, b) for s, t, b in ((0, 0.51, 0.40), (1, 0.62, 0.41), (2, 0.56, 0.42))]
    results += [fake_result(s, t, b, noise="none") for s, t, b in ((0, 0.20, 0.40), (1, 0.50, 0.41))]
    rows, text = report.table(results)
    by = {r["arm"]: r for r in rows}
    assert set(by) == {"I-JEPA", "N-JEPA", "N-JEPA noise=none"}
    assert by["N-JEPA"]["top1"] == pytest.approx((56.333333, 5.507571), rel=1e-5)
    assert by["N-JEPA"]["vs_ijepa"] == pytest.approx((1.333333, 0.577350), rel=1e-5)  # diffs 1, 2, 1
    assert by["N-JEPA noise=none"]["vs_ijepa"] == pytest.approx((-20.0, 14.142136), rel=1e-5)  # seeds 0, 1 only
    assert by["I-JEPA"]["vs_ijepa"] is None and by["N-JEPA noise=none"]["collapsed"] == 1 and by["I-JEPA"]["seeds"] == [0, 1, 2]
    assert by["I-JEPA"]["gain"] == pytest.approx((14.0, 4.582576), rel=1e-5)  # gains 10, 19, 13
    paths = []
    for i, r in enumerate(results):
        paths.append(str(tmp_path / f"{i}.json"))
        json.dump(r, open(paths[-1], "w"))
    assert report.main(["--table", str(tmp_path / "*.json"), "--table-json", str(tmp_path / "t.out")]) == 0
    out = capsys.readouterr().out
    assert "N-JEPA noise=none" in out and " 1.33 ± 0.58 (3 pairs)" in out and len(json.load(open(tmp_path / "t.out"))) == 3
    rows, text = report.table(results, vs_njepa=True)  # noise=none against N-JEPA: seeds 0, 1: 0.20 - 0.51, 0.50 - 0.62
    by = {r["arm"]: r for r in rows}
    assert by["N-JEPA noise=none"]["vs_njepa"] == pytest.approx((-21.5, 13.435029), rel=1e-5)
    assert by["N-JEPA"]["vs_njepa"] is None and by["I-JEPA"]["vs_njepa"] is None and "vs N-JEPA (paired)" in text
    _, text = report.table(results[:1] + results[3:4])  # one seed: no spread is printed, not a fake 0.00
    assert " 50.00 |" in text and " 1.00 (1 pair) |" in text and "± 0.00" not in text


def test_table_vs_pairs_each_arm_with_the_arm_of_the_changed_options(capsys):
    """--vs lr_schedule=cosine: each arm against its twin with that option changed, paired by seed (the
    noise-cost study's const-* arms against the cosine references); lambda1=0,lambda2=0,...: against
    I-JEPA. Breaks if the change is ignored (every arm its own twin), if other options may differ too,
    or if a misspelt option passes silently."""
    const = dict(lr_schedule="constant")
    results = [fake_result(s, t, 0.4, lambda1=0.0, lambda2=0.0) for s, t in ((0, 0.60), (1, 0.62), (2, 0.61))]   # I-JEPA
    results += [fake_result(s, t, 0.4) for s, t in ((0, 0.55), (1, 0.58), (2, 0.56))]                           # N-JEPA
    results += [fake_result(s, t, 0.4, lambda1=0.0, lambda2=0.0, **const) for s, t in ((0, 0.58), (1, 0.60), (2, 0.63))]
    results += [fake_result(s, t, 0.4, **const) for s, t in ((2, 0.60), (0, 0.59), (1, 0.57))]                  # another order
    results += [fake_result(0, 0.50, 0.4, lr=3e-4, **const)]  # differs in lr as well: no cosine twin
    vs = [("cos", report.parse_vs("lr_schedule=cosine")), ("ij", report.parse_vs("lambda1=0,lambda2=0,lr_schedule=cosine"))]
    rows, text = report.table(results, vs=vs)
    by = {r["arm"].replace(" lr=0.0001", ""): r["vs"] for r in rows}  # lr is in the names: one arm has another
    assert by["N-JEPA lr_schedule=constant"]["cos"]["diff"] == pytest.approx((2.333333, 2.886751), rel=1e-5)  # 4, -1, 4 points
    assert by["I-JEPA lr_schedule=constant"]["cos"]["diff"] == pytest.approx((-0.666667, 2.309401), rel=1e-5)  # -2, -2, 2
    assert by["N-JEPA lr_schedule=constant"]["ij"]["diff"] == pytest.approx((-2.333333, 2.309401), rel=1e-5)  # -1, -5, -1
    assert by["N-JEPA lr_schedule=cosine"]["cos"]["diff"] is None and by["N-JEPA lr_schedule=cosine"]["ij"]["diff"] == pytest.approx((-4.666667, 0.577350), rel=1e-5)
    assert by["N-JEPA lr=0.0003 lr_schedule=constant"]["cos"]["diff"] is None
    assert "vs cos (paired)" in text and " 2.33 ± 2.89 (3) |" in text
    assert report.parse_vs("cn_stopgrad=False,sigma_max=None,p_mean=-1.76") == {"cn_stopgrad": False, "sigma_max": None, "p_mean": -1.76}
    for bad in ("lr_schedul=cosine", "lr=abc", "lr_schedule", "seed=1"):
        with pytest.raises(ValueError, match="--vs"):
            report.parse_vs(bad)


def test_compare_logs_finds_the_shared_steps_and_the_largest_difference(tmp_path, capsys):
    """tools/report.py --compare: a run against its thinned committed copy (a restarted run against the lost
    one) is bit-identical at the steps both logged; a step's loss line and kNN line count together. Breaks if
    the kNN line replaces the loss line of its step, if steps only one log has are compared, or if a
    difference in one number is hidden."""
    def line(step, **kv):
        return json.dumps({"step": step, "epoch": step / 10, **kv}) + "\n"
    full = [line(s, loss=1.0 / s, ct=0.5 / s, nt=0.6 / s, cn=0.1 / s, lr=1e-4 * s, wall_s=s) for s in range(10, 70, 10)]
    full.insert(2, line(20, knn_student=0.25, knn_teacher=0.3, wall_s=99))  # kNN line after the loss line of step 20
    (tmp_path / "a.jsonl").write_text("".join(full))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "log.jsonl").write_text("".join(full[i] for i in (0, 2, 1, 4, 6)))  # steps 10, 20 (kNN first), 40, 60
    steps, worst = report.compare_logs(str(tmp_path / "a.jsonl"), str(tmp_path / "b"))
    assert steps == [10, 20, 40, 60] and set(worst) == {"loss", "ct", "nt", "cn", "lr", "knn_student", "knn_teacher"}
    assert not any(worst.values())
    assert report.main(["--compare", str(tmp_path / "a.jsonl"), str(tmp_path / "b")]) == 0
    assert capsys.readouterr().out.startswith("4 steps in both logs (10 .. 60); largest relative difference: loss 0.0e+00")
    full[4] = line(40, loss=1.001 / 40, ct=0.5 / 40, nt=0.6 / 40, cn=0.1 / 40, lr=4e-3, wall_s=1)  # one number off at one step
    (tmp_path / "c.jsonl").write_text("".join(full))
    steps, worst = report.compare_logs(str(tmp_path / "c.jsonl"), str(tmp_path / "b"))
    assert worst["loss"] == pytest.approx(1e-3) and worst["ct"] == 0.0 and worst["knn_student"] == 0.0
    assert report.main(["--compare", str(tmp_path / "c.jsonl"), str(tmp_path / "b")]) == 0
    assert "loss 1.0e-03" in capsys.readouterr().out
    (tmp_path / "d.jsonl").write_text(line(15, loss=1.0))
    assert report.main(["--compare", str(tmp_path / "d.jsonl"), str(tmp_path / "b")]) == 2  # no shared step: an error
    assert "share no logged step" in capsys.readouterr().err
    assert report.main(["--compare", str(tmp_path / "b"), str(tmp_path / "missing")]) == 2  # a mistyped path: not "no shared step"
    assert "no log at" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# the docs: every command they print still runs
# ---------------------------------------------------------------------------------------------
def doc_commands(text):
    """(file, flags) of every `python FILE ...`, `torchrun ... FILE ...` and `bash FILE ...` in the code
    blocks and inline code of a markdown text; a command ends at &&, ;, |, a comment or the code's end
    (a line ending in a backslash goes on on the next one)."""
    import re
    spans = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    spans = [line for block in spans for line in block.replace("\\\n", " ").splitlines()]  # a trailing \ continues a line
    spans += re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    found = []
    for span in spans:
        for piece in re.split(r"&&|;|\|(?=\s)|\s#", span):
            m = re.search(r"(?:^|\s|\()(python3?|torchrun|bash)\s+(.*)", piece)
            if not m:
                continue
            tokens = m.group(2).split()
            files = [i for i, t in enumerate(tokens) if t.endswith((".py", ".sh"))]
            if not files or (m.group(1) != "torchrun" and files[0] != 0):
                continue  # python -m ..., python -c ...
            found.append((tokens[files[0]], re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", " ".join(tokens[files[0] + 1:]))))
    return found


def test_every_command_in_the_docs_names_a_file_and_flags_that_exist():
    """README.md and docs/*.md: each command's file exists, and each flag it passes is in that file's
    --help. A move of code (or a renamed flag) cannot leave a dead command behind."""
    import glob
    import re
    pages = [os.path.join(HERE, "README.md")] + sorted(glob.glob(os.path.join(HERE, "docs", "*.md")))
    commands = [(page, f, flags) for page in pages for f, flags in doc_commands(open(page).read())]
    assert len(commands) > 50 and any(f == "tools/report.py" for _, f, _ in commands)
    helps, dead = {}, []
    for page, f, flags in commands:
        path = os.path.join(HERE, f)
        if f.startswith("../shared") or f.startswith("/"):
            continue
        if not os.path.exists(path):
            dead.append(f"{os.path.basename(page)}: no file {f}")
            continue
        if not flags:
            continue
        if f not in helps:
            assert "argparse" in open(path).read(), f"{f} takes flags in {page} but has no --help"
            out = run_cli(f, "--help", timeout=120)
            assert out.returncode == 0, out.stderr[-500:]
            helps[f] = re.sub(r"\s*\n\s*", " ", re.sub(r"-\n\s*", "-", out.stdout))
        dead += [f"{os.path.basename(page)}: {f} {flag}" for flag in flags if not re.search(re.escape(flag) + r"(?![\w-])", helps[f])]
    assert not dead, dead


# ---------------------------------------------------------------------------------------------
# benchmark mode (runs, reports consistent fields; no assertion on speed)
# ---------------------------------------------------------------------------------------------
def test_bench_smoke():
    """Smoke test: tools/bench.py and its --data-only run and print their lines (speed is never asserted)."""
    out = run_cli("tools/bench.py", "--steps", "2", "--model", "vit_tiny", "--img", "32", "--patch", "8",
                  "--batch", "4", "--pred-depth", "1", "--device", "cpu")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "bench | vit_tiny 32px/8 batch 4 | N-JEPA" in out.stdout and "MFU" in out.stdout
    assert "projected: 4 epochs x 1250 steps (5,000 images, shapes)" in out.stdout
    out = run_cli("tools/bench.py", "--data-only", "--img", "32", "--batch", "8")
    assert out.returncode == 0 and "bench-data | builtin:shapes/train" in out.stdout
