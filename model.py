"""
model.py -- the Vision Transformer encoder and the narrow ViT predictor of N-JEPA.

Paper: "Improving Joint Embedding Predictive Architecture with Diffusion Noise" (Qiu, Zhu, Chen,
arXiv 2507.15216), Sec. 3.2 and 4.2. Everything here follows I-JEPA (Assran et al. 2023,
facebookresearch/ijepa), which the paper builds on, and keeps its parameter names
(`patch_embed.proj`, `pos_embed`, `blocks.{i}.attn.qkv`, ..., `predictor_embed`, `mask_token`,
`predictor_blocks`, `predictor_norm`, `predictor_proj`) so that I-JEPA checkpoints load.

Also what train.py, probe.py and tools/ all need of a model and not of each other: the FLOPs of a
training step (for MFU), checkpoints (atomic write, weights-only read, njepa's and official I-JEPA's)
and the precision a model runs in (bf16 autocast or fp32).

Shapes: B images, N patches per image, D encoder width, P predictor width,
L target blocks per image, Nc context patches, Nt patches per target block.
"""
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# Encoder presets (width, depth, heads), as in I-JEPA's vision_transformer.py / ViT (Dosovitskiy 2021).
PRESETS = {
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
    "vit_huge": dict(embed_dim=1280, depth=32, num_heads=16),  # released by I-JEPA with patch 14 (224 px) and 16 (448 px)
    "vit_giant": dict(embed_dim=1408, depth=40, num_heads=16, mlp_ratio=48 / 11),  # I-JEPA's ViT-g/16
}


def sincos_pos_embed_2d(dim, grid_h, grid_w):
    """Fixed 2D sine-cosine position embedding (MAE / I-JEPA `get_2d_sincos_pos_embed`).

    Half of the channels encode the row, half the column; each half is the 1D embedding
    [sin(pos * w_k), cos(pos * w_k)] with w_k = 1 / 10000^(k / (dim/4)) (Vaswani et al. 2017).
    Returns a float32 tensor [grid_h * grid_w, dim], row-major (index = row * grid_w + col).
    """
    if dim % 4 != 0:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))  # [dim/4]
    rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64), indexing="ij")

    def embed_1d(pos):  # pos [M] -> [M, dim/2]
        angles = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    # I-JEPA puts the width (column) coordinate first, then the height (row) coordinate.
    emb = np.concatenate([embed_1d(cols), embed_1d(rows)], axis=1)  # [N, dim]
    return torch.from_numpy(emb).float()


class PatchEmbed(nn.Module):
    """Image -> sequence of patch tokens with one strided convolution (ViT Sec. 3.1)."""

    def __init__(self, patch_size, embed_dim, in_chans=3):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):  # x [B, 3, H, W]
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, N, D]


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection and PyTorch's SDPA kernel."""

    def __init__(self, dim, num_heads):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # x [B, T, C]
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, T, C/heads]
        if q.device.type == "cpu" and q.dtype == torch.bfloat16:
            # CPU bf16 autocast: attention in fp32. torch 2.13's bf16 flash-attention backward on CPU took
            # 14x the fp32 time (666 vs 46 ms for 3 steps, vit_tiny 64/8, measured); the matmuls stay bf16.
            with torch.autocast("cpu", enabled=False):
                x = F.scaled_dot_product_attention(q.float(), k.float(), v.float())  # softmax(q k^T / sqrt(d)) v
        else:
            x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
        return self.proj(x.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def init_weights(module, std=0.02):
    """What official I-JEPA training runs (SPEC section 2, "init"): truncated normal (std 0.02) for
    linear and conv weights, zero biases, unit LayerNorms. I-JEPA's model also divides the output
    projections of block i by sqrt(2 i) (`fix_init_weight`, GPT-2), but its `helper.init_model`
    re-initialises every Linear afterwards, which erases that rescale; so official runs start
    without it, and so do we."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def gather_tokens(x, idx):
    """x [B, N, C], idx [B, K] (patch indices) -> [B, K, C]."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.size(-1)))


class VisionTransformer(nn.Module):
    """The encoder (student = context encoder, teacher = its EMA copy).

    forward(images, keep=None): `keep` [B, K] holds the indices of the patches to encode (the
    context, Sec. 4.3); None encodes all N patches (the teacher, and evaluation).
    Returns the final-normed tokens [B, K or N, D].
    """

    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0):
        super().__init__()
        if img_size % patch_size != 0:
            raise ValueError(f"image size {img_size} is not divisible by patch size {patch_size}")
        self.img_size, self.patch_size = img_size, patch_size
        self.grid = img_size // patch_size
        self.embed_dim, self.num_heads, self.depth = embed_dim, num_heads, depth
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        # Fixed (not learned) sin-cos position embedding, as I-JEPA. A buffer keeps the I-JEPA
        # state_dict key `pos_embed` [1, N, D] while staying out of the optimizer.
        self.register_buffer("pos_embed", sincos_pos_embed_2d(embed_dim, self.grid, self.grid).unsqueeze(0))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        init_weights(self)

    def forward(self, images, keep=None, return_layers=1):
        """return_layers=k > 1 returns a list of the last k block outputs, each passed through
        the final norm (used by the linear probe, Table 6b "last 4 layers")."""
        if images.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"expected {self.img_size}x{self.img_size} images, got {tuple(images.shape[-2:])}")
        x = self.patch_embed(images) + self.pos_embed  # [B, N, D]
        if keep is not None:
            x = gather_tokens(x, keep)  # [B, K, D]
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i >= self.depth - return_layers:
                outputs.append(self.norm(x))
        return outputs[-1] if return_layers == 1 else outputs


def vit(name, **kwargs):
    """Build an encoder preset by name: vit("vit_base", img_size=224, patch_size=16)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(PRESETS)}")
    return VisionTransformer(**PRESETS[name], **kwargs)


def vit_tiny(**kw):
    return vit("vit_tiny", **kw)


def vit_small(**kw):
    return vit("vit_small", **kw)


def vit_base(**kw):
    return vit("vit_base", **kw)


def vit_large(**kw):
    return vit("vit_large", **kw)


def vit_huge(**kw):
    return vit("vit_huge", **kw)


def default_predictor_dim(embed_dim):
    """Predictor width: 384 for ViT-B and larger (paper Sec. 4.2, I-JEPA), half the encoder width
    for the small presets (SPEC: "smaller presets scale down")."""
    return min(384, embed_dim // 2)


class Predictor(nn.Module):
    """Narrow ViT predictor g_phi (paper Sec. 3.2, Fig. 2; I-JEPA `VisionTransformerPredictor`).

    Inputs: the student's context tokens z_x [B, Nc, D] with their patch indices [B, Nc], and the
    target patch indices [B, L, Nt]. Each of the L target blocks is predicted in its own sequence
    [context tokens ; Nt mask tokens] (I-JEPA semantics), so the L blocks become a batch of B*L.

    A mask token = learned `mask_token` + fixed position embedding psi of its target patch. Predictor
    N adds `noise` [B, L, Nt, P] to psi (Alg. 1 line 14: psi_sN = psi_sc + n_j); SPEC section 2: the
    noise is added after projection to the predictor width, context tokens untouched.

    Returns predictions [B, L, Nt, D] in the encoder's feature space.
    """

    def __init__(self, num_patches_side, embed_dim, predictor_dim=384, depth=6, num_heads=12,
                 mlp_ratio=4.0, shared_mask_token=None):
        super().__init__()
        self.predictor_dim = predictor_dim
        self.predictor_embed = nn.Linear(embed_dim, predictor_dim)
        # shared_mask_token: another predictor's token, used as is (ablation Table 5b, --share-mask-token).
        # It is kept in a list, so it is not registered here: the optimizer and DDP see it once, via its owner.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, predictor_dim)) if shared_mask_token is None else None
        self.shared_mask_token = [shared_mask_token] if shared_mask_token is not None else []
        side = num_patches_side
        self.register_buffer("predictor_pos_embed", sincos_pos_embed_2d(predictor_dim, side, side).unsqueeze(0))
        self.predictor_blocks = nn.ModuleList([Block(predictor_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.predictor_norm = nn.LayerNorm(predictor_dim, eps=1e-6)
        self.predictor_proj = nn.Linear(predictor_dim, embed_dim)
        init_weights(self)
        if self.mask_token is not None:
            nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, context, context_idx, target_idx, noise=None):
        B, L, Nt = target_idx.shape
        Nc = context.size(1)
        pos = self.predictor_pos_embed.expand(B, -1, -1)  # [B, N, P]
        # context tokens: project to predictor width, add their position embedding
        ctx = self.predictor_embed(context) + gather_tokens(pos, context_idx)  # [B, Nc, P]
        ctx = ctx.unsqueeze(1).expand(B, L, Nc, self.predictor_dim)  # [B, L, Nc, P]
        # mask tokens: psi (position embedding of each target patch) + optional noise + mask token
        psi = gather_tokens(pos, target_idx.reshape(B, L * Nt)).view(B, L, Nt, self.predictor_dim)
        if noise is not None:
            psi = psi + noise  # Alg. 1 line 14
        token = self.mask_token if self.mask_token is not None else self.shared_mask_token[0]
        tgt = psi + token.to(psi.dtype)  # [B, L, Nt, P]
        x = torch.cat([ctx, tgt], dim=2).reshape(B * L, Nc + Nt, self.predictor_dim)
        for block in self.predictor_blocks:
            x = block(x)
        x = self.predictor_norm(x[:, Nc:])  # only the mask-token outputs are predictions
        return self.predictor_proj(x).view(B, L, Nt, -1)  # [B, L, Nt, D]


# ---------------------------------------------------------------------------------------------
# FLOPs of a training step, for MFU (as nanoGPT's estimate_mfu; checked against torch's FlopCounterMode
# in the tests). A multiply-add is 2 FLOPs; elementwise ops are not counted.
# ---------------------------------------------------------------------------------------------
def transformer_flops(n_seq, n_tok, dim, depth, mlp_ratio=4.0):
    """Forward FLOPs of `depth` blocks on n_seq sequences of n_tok tokens: per token 2*(3D^2 + D^2 +
    2*r*D^2) for qkv, proj and the MLP; per sequence 2*2*T^2*D for q k^T and attn @ v."""
    per_token = 2 * dim * dim * (4 + 2 * mlp_ratio)
    return depth * n_seq * (n_tok * per_token + 4 * n_tok * n_tok * dim)


def train_step_flops(name, img, patch, pred_dim, pred_depth, two_predictors, batch, n_ctx, n_tgt, n_targets=4):
    """One N-JEPA step: forward x1 for the no-grad teacher, x3 (forward + backward) for the student and
    the predictors (nanoGPT/PaLM convention)."""
    p = PRESETS[name]
    D, depth, N, r = p["embed_dim"], p["depth"], (img // patch) ** 2, p.get("mlp_ratio", 4.0)
    patch_embed = 2 * 3 * patch ** 2 * D * batch * N  # conv patch embedding on all N patches
    teacher = patch_embed + transformer_flops(batch, N, D, depth, r)
    student = patch_embed + transformer_flops(batch, n_ctx, D, depth, r)
    predictor = (2 * D * pred_dim * batch * n_ctx  # predictor_embed (once per image, before the L copies)
                 + transformer_flops(batch * n_targets, n_ctx + n_tgt, pred_dim, pred_depth)
                 + 2 * pred_dim * D * batch * n_targets * n_tgt)  # predictor_proj on the mask tokens
    return teacher + 3 * student + 3 * (2 if two_predictors else 1) * predictor


# ---------------------------------------------------------------------------------------------
# Official I-JEPA checkpoints (facebookresearch/ijepa `save_checkpoint`): the same parameter names,
# inside DDP wrappers, so they load into these modules once the 'module.' prefix is gone.
# ---------------------------------------------------------------------------------------------
def is_ijepa_checkpoint(ckpt):
    return isinstance(ckpt, dict) and all(isinstance(ckpt.get(k), dict) for k in ("encoder", "predictor", "target_encoder"))


def ijepa_state(ckpt, key):
    """One module ('encoder', 'predictor', 'target_encoder') with the 'module.' prefix removed."""
    return {k.removeprefix("module."): v for k, v in ckpt[key].items()}


def infer_architecture(state):
    """(preset, img, patch) of an encoder from its weights: width and patch size from
    patch_embed.proj.weight [D, 3, p, p], depth from the block count, MLP width from fc1, image size
    from pos_embed [1, (img / p)^2, D]. ValueError when no preset fits."""
    try:
        w, n_pos = state["patch_embed.proj.weight"], state["pos_embed"].shape[1]
        D, p = w.shape[0], w.shape[-1]
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    except (KeyError, ValueError, AttributeError, IndexError) as e:
        raise ValueError(f"not a ViT encoder state dict ({type(e).__name__}: {e})") from None
    side = int(round(math.sqrt(n_pos)))
    for name, pr in PRESETS.items():
        if pr["embed_dim"] == D and pr["depth"] == depth and int(D * pr.get("mlp_ratio", 4.0)) == hidden and side * side == n_pos:
            return name, side * p, p
    raise ValueError(f"an encoder of width {D}, depth {depth}, MLP {hidden}, {n_pos} positions fits no preset "
                     f"({', '.join(PRESETS)})")


# ---------------------------------------------------------------------------------------------
# Checkpoints: atomic write, weights_only read. Here, below train.py (which writes them), probe.py and
# tools/ (which read them), so that none of those has to import another to open a run.
# ---------------------------------------------------------------------------------------------
class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or of the wrong kind; printed as one line."""


def save_checkpoint(state, path):
    """Write to a temp file in the same folder, fsync, then rename over `path`: a crash or a full disk
    mid-write leaves the previous checkpoint intact."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_checkpoint(path):
    """torch.load with weights_only=True (tensors and plain containers, never code from the file),
    memory-mapped, so that the optimizer state inside a released multi-GB checkpoint is never read."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # a file in the legacy (not zip) format cannot be mapped
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}") from None
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None


def load_checkpoint(path):
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != "njepa-1":
        raise CheckpointError(f"{path} is not an njepa checkpoint")
    return ckpt


def checkpoint_states(path):
    """(encoder, target encoder, predictor) state dicts of an I-JEPA or njepa checkpoint."""
    ckpt = read_checkpoint(path)
    if is_ijepa_checkpoint(ckpt):
        return [ijepa_state(ckpt, k) for k in ("encoder", "target_encoder", "predictor")]
    if isinstance(ckpt, dict) and ckpt.get("format") == "njepa-1":
        return [ckpt["student"], ckpt["teacher"], ckpt["pred_c"]]
    raise CheckpointError(f"{path} is neither an I-JEPA checkpoint (encoder / predictor / target_encoder) nor an njepa one")


def architecture_of(path):
    """--init-from without --model/--img/--patch/--pred-depth/--pred-dim: read them off the weights."""
    student, _, pred = checkpoint_states(path)
    try:
        model, img, patch = infer_architecture(student)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    pred_depth = 1 + max((int(k.split(".")[1]) for k in pred if k.startswith("predictor_blocks.")), default=-1)
    return dict(model=model, img=img, patch=patch, pred_depth=pred_depth, pred_dim=pred["predictor_embed.weight"].shape[0])


# ---------------------------------------------------------------------------------------------
# Precision: what a model runs in (train.py's --precision, probe.py's features, tools/bench.py)
# ---------------------------------------------------------------------------------------------
def cpu_has_amx():
    """Intel AMX (bf16 tile matmuls): torch's own check, else the kernel's CPU flags."""
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except AttributeError:
        try:
            return " amx_bf16" in open("/proc/cpuinfo").read()
        except OSError:
            return False


def resolve_precision(precision, device):
    """--precision auto: bf16 autocast on CUDA, and on a CPU with AMX (measured with --bench on a Xeon
    with AMX, vit_tiny 64/8 batch 64: 1.59x I-JEPA, 1.49x N-JEPA, docs/performance.md); fp32 elsewhere (an
    EPYC with avx512_bf16 and no AMX measured 0.96-1.42x, and CPU bf16 attention is slow, see model.py)."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" or cpu_has_amx() else "fp32"


def autocast_for(device, precision=None):
    """bf16 autocast (losses in fp32, see losses.py) or plain fp32; precision None: bf16 on CUDA, fp32
    on CPU (probe.py's features). On CUDA also turns off cuDNN's attention: it builds a new plan for
    every new sequence length (1-2 ms of CPU per call, measured on an H200), and the context length
    changes every step; flash attention does not."""
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)
    bf16 = precision == "bf16" if precision is not None else device.type == "cuda"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
