"""
train.py -- N-JEPA pretraining: a plain loop, an EMA teacher and schedules that are pure functions
of the step (paper Sec. 3.2, 4.1-4.4, Alg. 1; I-JEPA `train.py` where the paper is silent).

  python train.py                                   # reduced default: vit_tiny, 32 px, built-in shapes
  python train.py --data ~/imagenet --epochs 100 --batch 128        # the paper's ViT-B/16 setting
  torchrun --nproc_per_node 8 train.py --data ~/imagenet            # DDP; --batch is the global batch
  python train.py --lambda1 0 --lambda2 0                           # plain I-JEPA (no predictor N)
  python train.py --bench                                           # speed: img/s, step time, MFU

Writes OUT/ckpt.pt (every epoch, atomically), OUT/log.jsonl (one JSON line per log step) and
OUT/curves.png. `--resume` continues a run exactly (same losses as an uninterrupted run).
"""
import argparse
import json
import math
import os
import signal
import sys
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import data
import losses
import masks
import noise as edm_noise
from model import PRESETS, Predictor, default_predictor_dim, gather_tokens, vit


class ConfigError(ValueError):
    """A bad option or checkpoint; printed as one line before any work starts."""


# ---------------------------------------------------------------------------------------------
# Configuration: every option is on the command line; these are the defaults.
# ---------------------------------------------------------------------------------------------
# The paper's setting (Sec. 4.2, 4.4): ViT-B/16 at 224 px, batch 128, 100 epochs. Used with --data DIR.
PAPER_DEFAULTS = dict(model="vit_base", img=224, patch=16, epochs=100, batch=128)
# The reduced default on the built-in synthetic dataset (about 5 minutes on 2 CPU cores).
BUILTIN_DEFAULTS = dict(model="vit_tiny", img=32, patch=4, epochs=4, batch=64)
COMMON_DEFAULTS = dict(
    data="shapes", out="out", seed=0, device="auto", compile=False, workers=-1, log_every=10,
    lr=1e-3, start_lr=1e-4, final_lr=1e-6, lr_schedule="cosine", warmup=None,  # Sec. 4.4, SPEC
    wd=0.04, final_wd=0.4,  # Sec. 4.4: cosine weight decay 0.04 -> 0.4
    ema=0.996, final_ema=1.0,  # Sec. 4.2: momentum 0.996 -> 1.0
    ipe_scale=1.25,  # Sec. 4.1: schedules stretched 25% past the run
    lambda1=0.1, lambda2=0.1,  # Table 2
    noise="multi", noise_dist="lognormal",  # Table 3 / 5a, SPEC section 2
    cn_stopgrad=False, sigma_max=None,  # SPEC section 2: ablations, off by default (Alg. 1 line 18)
    pred_depth=6, pred_dim=None,  # Sec. 4.2: depth 6, width 384 (ViT-B)
    n_targets=4, share_predictor=False, share_mask_token=False,  # Sec. 4.3, Tables 5b, 6a
    subset_per_class=None, max_steps=None,
)
# Collapse alarm: teacher_std (std over tokens of the layer-normed teacher features, averaged over
# features) starts near 0.4-0.5 and stays there in a healthy run; a collapsed run falls towards 0.
# Measured: N-JEPA, vit_tiny, CIFAR-10 subset, lr 1e-3: 0.43 -> 0.04 (README, "Quality").
COLLAPSE_STD = 0.1
# Options that may differ between a checkpoint and the run that resumes it.
RESUME_MAY_CHANGE = {"out", "device", "compile", "workers", "log_every", "max_steps"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="N-JEPA pretraining", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--data", help="built-in dataset name ('shapes', synthetic) or an ImageFolder root (ROOT/train/<class>/*)")
    a("--out", help="output folder for ckpt.pt, log.jsonl, curves.png (default: out)")
    a("--resume", nargs="?", const="auto", help="continue OUT/ckpt.pt (or the given checkpoint)")
    a("--epochs", type=int)
    a("--batch", type=int, help="global batch size (split over DDP processes)")
    a("--model", help=f"encoder preset: {', '.join(PRESETS)}")
    a("--img", type=int, help="image size (pixels)")
    a("--patch", type=int, help="patch size (pixels)")
    a("--lr", type=float, help="peak learning rate (default 1e-3)")
    a("--start-lr", type=float)
    a("--final-lr", type=float)
    a("--lr-schedule", choices=["cosine", "constant"], help="after warmup (default cosine)")
    a("--warmup", type=float, help="warmup epochs (default 40%% of --epochs, i.e. 40 of 100)")
    a("--wd", type=float)
    a("--final-wd", type=float)
    a("--ema", type=float)
    a("--final-ema", type=float)
    a("--ipe-scale", type=float)
    a("--lambda1", type=float, help="weight of L_NT (Eq. 10); 0 with --lambda2 0 is I-JEPA")
    a("--lambda2", type=float, help="weight of L_CN (Eq. 10)")
    a("--noise", choices=["multi", "single", "none"])
    a("--noise-dist", choices=["lognormal", "fixed"])
    a("--cn-stopgrad", action="store_const", const=True, help="detach the clean prediction in L_CN (ablation)")
    a("--sigma-max", type=float, help="clip the noise level sigma (ablation; default: no bound)")
    a("--pred-depth", type=int)
    a("--pred-dim", type=int)
    a("--n-targets", type=int)
    a("--share-predictor", action="store_const", const=True)
    a("--share-mask-token", action="store_const", const=True)
    a("--subset-per-class", type=int, help="use only the first N images of each class")
    a("--seed", type=int)
    a("--device", help="auto, cpu, cuda, cuda:1 ...")
    a("--compile", action="store_const", const=True, help="torch.compile the encoder and predictors")
    a("--workers", type=int, help="DataLoader workers (-1: auto)")
    a("--log-every", type=int)
    a("--max-steps", type=int, help="stop (with a checkpoint) after this step; schedules still span --epochs")
    a("--reschedule", action="store_const", const=True, help="with --resume: allow another --epochs (bends every schedule)")
    a("--bench", action="store_true", help="benchmark: timed steps on synthetic images, one result line")
    a("--bench-steps", type=int, default=10)
    a("--bench-data", action="store_true", help="benchmark the data pipeline (decode + crop) alone: images/s")
    return p.parse_args(argv)


def resolve_config(args, ckpt_config=None):
    """Options given on the command line win; a resumed run takes the others from its checkpoint;
    the rest come from the defaults (paper setting with --data DIR, reduced setting otherwise)."""
    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("resume", "bench", "bench_steps", "bench_data")}
    reschedule = given.pop("reschedule", False)
    if ckpt_config is not None:
        if "epochs" in given and given["epochs"] != ckpt_config.get("epochs") and not reschedule:
            raise ConfigError(f"--epochs {given['epochs']} differs from the checkpoint's {ckpt_config.get('epochs')}: the lr, wd and "
                              f"momentum schedules would bend mid-run; add --reschedule to do it anyway")
        ckpt_config = dict(COMMON_DEFAULTS, **ckpt_config)  # options added since the checkpoint was written
        clash = {k: (ckpt_config.get(k), v) for k, v in given.items()
                 if k not in RESUME_MAY_CHANGE | {"epochs"} and ckpt_config.get(k) != v}
        if clash:
            what = ", ".join(f"--{k.replace('_', '-')} {new} (checkpoint: {old})" for k, (old, new) in clash.items())
            raise ConfigError(f"checkpoint was trained with another config: {what}")
        cfg = dict(ckpt_config, max_steps=None)  # --max-steps belongs to one invocation, not to the run
        cfg.update(given)
    else:
        cfg = dict(COMMON_DEFAULTS)
        cfg["data"] = given.get("data", cfg["data"])
        cfg.update(BUILTIN_DEFAULTS if cfg["data"] in data.BUILTIN else PAPER_DEFAULTS)
        cfg.update(given)
    cfg = SimpleNamespace(**cfg)
    if cfg.warmup is None:
        cfg.warmup = min(40.0, 0.4 * cfg.epochs)  # Sec. 4.4: 40 epochs; SPEC: at most 40 % of a shorter run
    check_config(cfg)
    return cfg


def check_config(cfg):
    if cfg.model not in PRESETS:
        raise ConfigError(f"unknown model {cfg.model!r}; choose one of {', '.join(PRESETS)}")
    if cfg.img <= 0 or cfg.patch <= 0 or cfg.img % cfg.patch:
        raise ConfigError(f"image size {cfg.img} is not divisible by patch size {cfg.patch}")
    grid = cfg.img // cfg.patch
    if grid < 2:
        raise ConfigError(f"image size {cfg.img} with patch {cfg.patch} leaves a {grid}x{grid} grid; need at least 2x2")
    # each target block covers >= 15 % of the grid (Sec. 4.3); the context must keep some patches
    if cfg.n_targets < 1 or cfg.n_targets * 0.15 * grid * grid > grid * grid - masks.default_min_keep(grid, grid):
        raise ConfigError(f"{cfg.n_targets} target blocks of >= 15% each do not fit a {grid}x{grid} grid "
                          f"and leave context patches; use --n-targets <= {int((1 - 1 / grid) / 0.15)}")
    for name in ("epochs", "batch", "pred_depth", "log_every"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.lambda1 < 0 or cfg.lambda2 < 0:
        raise ConfigError("--lambda1 and --lambda2 must be >= 0")
    pred_dim = cfg.pred_dim or default_predictor_dim(PRESETS[cfg.model]["embed_dim"])
    if pred_dim % PRESETS[cfg.model]["num_heads"] or pred_dim % 4:
        raise ConfigError(f"--pred-dim {pred_dim} must be divisible by 4 and by the {PRESETS[cfg.model]['num_heads']} heads")


# ---------------------------------------------------------------------------------------------
# Schedules: pure functions of the step (so a resumed run is identical). Length T = ipe_scale *
# total steps (Sec. 4.1: "all hyper-parameter schedules were scaled 25% beyond the actual training").
# ---------------------------------------------------------------------------------------------
def schedule_length(cfg, steps_per_epoch):
    return int(cfg.ipe_scale * cfg.epochs * steps_per_epoch)


def lr_at(step, cfg, steps_per_epoch):
    """Linear warmup start_lr -> lr over `warmup` epochs (Sec. 4.4), then cosine to final_lr at T
    (appendix; I-JEPA WarmupCosineSchedule) or constant (`--lr-schedule constant`, Sec. 4.4 text)."""
    warmup = cfg.warmup * steps_per_epoch
    if step < warmup:
        return cfg.start_lr + (cfg.lr - cfg.start_lr) * step / warmup
    if cfg.lr_schedule == "constant":
        return cfg.lr
    T = schedule_length(cfg, steps_per_epoch)
    progress = min(1.0, (step - warmup) / max(1.0, T - warmup))
    return cfg.final_lr + (cfg.lr - cfg.final_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def wd_at(step, cfg, steps_per_epoch):
    """Cosine weight decay wd -> final_wd (Sec. 4.4; I-JEPA CosineWDSchedule)."""
    progress = min(1.0, step / schedule_length(cfg, steps_per_epoch))
    return cfg.final_wd + (cfg.wd - cfg.final_wd) * 0.5 * (1 + math.cos(math.pi * progress))


def momentum_at(step, cfg, steps_per_epoch):
    """EMA momentum, linear ema -> final_ema (Sec. 4.2; I-JEPA momentum_scheduler)."""
    progress = min(1.0, step / schedule_length(cfg, steps_per_epoch))
    return cfg.ema + (cfg.final_ema - cfg.ema) * progress


def step_seed(seed, step, rank=0, stream=0):
    """A fresh seed for each (run seed, step, rank, stream): all randomness is a function of the step."""
    return (((seed * 1_000_003 + step) * 1_009 + rank) * 17 + stream) % (2**63 - 1)


# ---------------------------------------------------------------------------------------------
# Models, optimizer, EMA
# ---------------------------------------------------------------------------------------------
def build_models(cfg):
    """student (context encoder), teacher (its EMA copy, Alg. 1 line 4), predictor C and predictor N.
    predictor N is None in I-JEPA mode (both lambdas 0) and is predictor C with --share-predictor."""
    student = vit(cfg.model, img_size=cfg.img, patch_size=cfg.patch)
    teacher = vit(cfg.model, img_size=cfg.img, patch_size=cfg.patch)
    teacher.load_state_dict(student.state_dict())  # theta_bar = theta
    teacher.requires_grad_(False)
    D, heads = student.embed_dim, student.num_heads
    pred_dim = cfg.pred_dim or default_predictor_dim(D)
    make = lambda own: Predictor(student.grid, D, pred_dim, cfg.pred_depth, heads, own_mask_token=own)
    pred_c = make(True)
    use_n = cfg.lambda1 > 0 or cfg.lambda2 > 0
    pred_n = None if not use_n or cfg.share_predictor else make(not cfg.share_mask_token)
    return student, teacher, pred_c, pred_n


def param_groups(modules):
    """AdamW groups: weight decay on weight matrices only, none on biases and norm parameters (I-JEPA)."""
    decay, no_decay = [], []
    for m in modules:
        for name, p in m.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": 0.0, "apply_wd": True},
            {"params": no_decay, "weight_decay": 0.0, "apply_wd": False}]


@torch.no_grad()
def ema_update(teacher, student, momentum):
    """theta_bar <- q * theta_bar + (1 - q) * theta (Alg. 1 line 21)."""
    t = list(teacher.parameters())
    s = [p.detach() for p in student.parameters()]
    torch._foreach_lerp_(t, s, 1.0 - momentum)


# ---------------------------------------------------------------------------------------------
# FLOPs (analytic; checked against torch.utils.flop_counter in the tests). A multiply-add is 2 FLOPs.
# ---------------------------------------------------------------------------------------------
def transformer_flops(n_seq, n_tok, dim, depth, mlp_ratio=4.0):
    """Forward FLOPs of `depth` blocks on n_seq sequences of n_tok tokens: per token 2*(3D^2 + D^2 +
    2*r*D^2) for qkv, proj and the MLP; per sequence 2*2*T^2*D for q k^T and attn @ v."""
    per_token = 2 * dim * dim * (4 + 2 * mlp_ratio)
    return depth * n_seq * (n_tok * per_token + 4 * n_tok * n_tok * dim)


def step_flops(cfg, batch, n_ctx, n_tgt):
    """Model FLOPs of one training step: forward x1 for the no-grad teacher, x3 (forward + backward)
    for the student and the predictors (nanoGPT/PaLM convention). Elementwise ops are not counted."""
    p = PRESETS[cfg.model]
    D, depth, N = p["embed_dim"], p["depth"], (cfg.img // cfg.patch) ** 2
    P = cfg.pred_dim or default_predictor_dim(D)
    L = cfg.n_targets
    patch = 2 * 3 * cfg.patch ** 2 * D * batch * N  # conv patch embedding on all N patches
    teacher = patch + transformer_flops(batch, N, D, depth)
    student = patch + transformer_flops(batch, n_ctx, D, depth)
    predictor = (2 * D * P * batch * n_ctx  # predictor_embed (once per image, before the L copies)
                 + transformer_flops(batch * L, n_ctx + n_tgt, P, cfg.pred_depth)
                 + 2 * P * D * batch * L * n_tgt)  # predictor_proj on the mask tokens
    n_pred = 2 if (cfg.lambda1 > 0 or cfg.lambda2 > 0) else 1
    return teacher + 3 * student + 3 * n_pred * predictor


# ---------------------------------------------------------------------------------------------
# One training step (Alg. 1 lines 7-21), written out
# ---------------------------------------------------------------------------------------------
def forward_losses(cfg, images, context, targets, student, teacher, pred_c, pred_n, noise_gen):
    """images [B, 3, H, W] normalised; context [B, Nc]; targets [B, L, Nt].
    Returns (total loss, parts, extras) for one step."""
    B, L, Nt = targets.shape
    with torch.no_grad():  # teacher: all patches, layer-normed output (I-JEPA), Alg. 1 line 10
        h = teacher(images)  # [B, N, D]
        h = F.layer_norm(h, (h.size(-1),))
        target = gather_tokens(h, targets.reshape(B, L * Nt)).view(B, L, Nt, -1)  # [B, L, Nt, D]
    z = student(images, keep=context)  # [B, Nc, D], Alg. 1 line 10
    use_n = cfg.lambda1 > 0 or cfg.lambda2 > 0
    sigma = None
    if use_n:  # Alg. 1 lines 12-15: noise on the mask tokens' position embeddings of predictor N
        pred_width = cfg.pred_dim or default_predictor_dim(z.size(-1))
        noise, sigma = edm_noise.sample_noise(B, L, Nt, pred_width, cfg.noise, cfg.noise_dist,
                                              generator=noise_gen, device=images.device, sigma_max=cfg.sigma_max)
    if use_n and cfg.share_predictor:  # one predictor, one call on [clean ; noisy] (Table 6a "shared")
        both = pred_c(torch.cat([z, z]), torch.cat([context, context]), torch.cat([targets, targets]),
                      noise=torch.cat([torch.zeros_like(noise), noise]))
        p_c, p_n = both[:B], both[B:]
    else:
        p_c = pred_c(z, context, targets)  # Alg. 1 line 17, predictor C
        p_n = None
        if use_n:  # predictor N; with --share-mask-token it borrows predictor C's mask token
            raw_c = getattr(pred_c, "module", pred_c)
            p_n = pred_n(z, context, targets, noise=noise, mask_token=raw_c.mask_token if cfg.share_mask_token else None)
    total, parts = losses.njepa_loss(p_c, p_n, target, cfg.lambda1, cfg.lambda2, cfg.cn_stopgrad)  # Eq. 10
    return total, parts, {"sigma": sigma, "target": target, "z": z}


# ---------------------------------------------------------------------------------------------
# Data order: a pure function of (seed, epoch), sharded over ranks
# ---------------------------------------------------------------------------------------------
def epoch_batches(n_images, epoch, cfg, rank, world, start_batch=0):
    """Lists of (index, augmentation seed) for this rank's batches of one epoch, from `start_batch`."""
    g = torch.Generator().manual_seed(step_seed(cfg.seed, epoch, stream=1))
    order = torch.randperm(n_images, generator=g).tolist()
    per_rank = cfg.batch // world
    steps = n_images // cfg.batch  # drop the last partial batch
    batches = []
    for b in range(start_batch, steps):
        first = b * cfg.batch + rank * per_rank
        batches.append([(order[k], step_seed(cfg.seed, epoch * n_images + k, stream=2))
                        for k in range(first, first + per_rank)])
    return batches


# ---------------------------------------------------------------------------------------------
# Checkpoints: atomic write, weights_only load
# ---------------------------------------------------------------------------------------------
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


def load_checkpoint(path):
    """Load with weights_only=True: tensors and plain containers only, never code from the file."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"no checkpoint at {path}") from None
    except Exception as e:
        raise ConfigError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "njepa-1":
        raise ConfigError(f"{path} is not an njepa checkpoint")
    return ckpt


# ---------------------------------------------------------------------------------------------
# Curves: OUT/curves.png drawn with pillow
# ---------------------------------------------------------------------------------------------
def draw_curves(records, path, keys=("loss", "ct", "nt", "cn", "lr", "sigma_mean", "teacher_std", "img_s")):
    """One small line chart per logged quantity against the step."""
    from PIL import Image, ImageDraw
    keys = [k for k in keys if any(r.get(k) is not None for r in records)]
    if not records or not keys:
        return
    W, H, pad, ncol = 300, 180, 34, 4
    nrow = math.ceil(len(keys) / ncol)
    sheet = Image.new("RGB", (W * ncol, H * nrow), "white")
    d = ImageDraw.Draw(sheet)
    for k, key in enumerate(keys):
        pts = [(r["step"], r[key]) for r in records if r.get(key) is not None and math.isfinite(r[key])]
        x0, y0 = (k % ncol) * W, (k // ncol) * H
        d.rectangle([x0 + pad, y0 + 20, x0 + W - 8, y0 + H - 20], outline=(160, 160, 160))
        d.text((x0 + pad, y0 + 5), key, fill="black")
        if len(pts) < 2:
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        lo, hi = min(ys), max(ys)
        hi = hi if hi > lo else lo + 1e-12
        sx = lambda x: x0 + pad + (x - xs[0]) / max(1, xs[-1] - xs[0]) * (W - pad - 8)
        sy = lambda y: y0 + H - 20 - (y - lo) / (hi - lo) * (H - 40)
        d.line([(sx(x), sy(y)) for x, y in pts], fill=(30, 90, 200), width=2)
        d.text((x0 + 2, y0 + 20), f"{hi:.3g}", fill=(90, 90, 90))
        d.text((x0 + 2, y0 + H - 32), f"{lo:.3g}", fill=(90, 90, 90))
        d.text((x0 + W - 60, y0 + H - 16), f"step {xs[-1]}", fill=(90, 90, 90))
    sheet.save(path)


def read_log(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------
# Distributed setup (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK)
# ---------------------------------------------------------------------------------------------
def setup_device_and_ddp(cfg):
    rank, world, local = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    if cfg.device == "auto":
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda asked for, but no CUDA device is available")
    if world > 1:
        if cfg.batch < world or cfg.batch % world:
            raise ConfigError(f"--batch {cfg.batch} must be a multiple of the {world} processes (it is the global batch)")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, rank, world


def ignore_signals_in_worker(_worker_id):
    """Ctrl-C reaches the whole process group: DataLoader workers ignore it (and SIGTERM) so that only
    the main process reacts, saves a checkpoint and then shuts the workers down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def default_workers(cfg, world):
    if cfg.workers >= 0:
        return cfg.workers
    if cfg.data in data.BUILTIN:
        return 0  # in-memory 64 px images: cropping costs less than a worker process
    return min(8, max(1, (os.cpu_count() or 2) // world - 1))


def build_on_device(cfg, device):
    """The four models on `device` and AdamW over the trainable ones (student, predictors)."""
    student, teacher, pred_c, pred_n = build_models(cfg)
    for m in (student, teacher, pred_c, pred_n):
        if m is not None:
            m.to(device)
    trainable = [m for m in (student, pred_c, pred_n) if m is not None]
    optimizer = torch.optim.AdamW(param_groups(trainable), lr=cfg.lr, betas=(0.9, 0.999), fused=True)  # Sec. 4.4; fused: one kernel
    return student, teacher, pred_c, pred_n, optimizer


def compile_models(student, teacher, pred_c, pred_n):
    """torch.compile; the context length changes every batch, hence dynamic shapes for the student and predictors."""
    pred_n = torch.compile(pred_n, dynamic=True) if pred_n is not None else None
    return torch.compile(student, dynamic=True), torch.compile(teacher), torch.compile(pred_c, dynamic=True), pred_n


def autocast_for(device):
    """bf16 autocast on CUDA, plain fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


def step_inputs(cfg, step, rank, images_u8, mask_gen, noise_gen, device):
    """Seed this step's mask and noise streams from (seed, step, rank), sample the masks and move the
    batch to the device. Returns normalised images [B, 3, H, W], context [B, Nc], targets [B, L, Nt]."""
    mask_gen.manual_seed(step_seed(cfg.seed, step, rank, stream=3))
    noise_gen.manual_seed(step_seed(cfg.seed, step, rank, stream=4))
    grid = cfg.img // cfg.patch
    context, targets = masks.sample_masks(images_u8.size(0), grid, grid, generator=mask_gen, n_targets=cfg.n_targets)
    images = data.normalize(images_u8.to(device, non_blocking=True))
    return images, context.to(device, non_blocking=True), targets.to(device, non_blocking=True)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def train(cfg, ckpt=None):
    device, rank, world = setup_device_and_ddp(cfg)
    master = rank == 0
    torch.manual_seed(cfg.seed)
    os.makedirs(cfg.out, exist_ok=True)
    ckpt_path, log_path = os.path.join(cfg.out, "ckpt.pt"), os.path.join(cfg.out, "log.jsonl")

    dataset = data.build_dataset(cfg.data, "train", cfg.img, cfg.subset_per_class)
    if len(dataset) < cfg.batch:
        raise ConfigError(f"the dataset has {len(dataset)} images, fewer than one batch of {cfg.batch}")
    cfg.classes = list(dataset.classes)
    loader_data = data.Augmented(dataset, cfg.img, train=True)
    ipe = len(dataset) // cfg.batch  # iterations per epoch
    total_steps = cfg.epochs * ipe

    student, teacher, pred_c, pred_n, optimizer = build_on_device(cfg, device)
    step = 0
    if ckpt is not None:
        student.load_state_dict(ckpt["student"])
        teacher.load_state_dict(ckpt["teacher"])
        pred_c.load_state_dict(ckpt["pred_c"])
        if pred_n is not None:
            pred_n.load_state_dict(ckpt["pred_n"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
    raw = SimpleNamespace(student=student, teacher=teacher, pred_c=pred_c, pred_n=pred_n)  # for saving/EMA

    if world > 1:  # each trainable module in its own DDP wrapper; the teacher is not wrapped
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [device.index] if device.type == "cuda" else None
        student, pred_c = DDP(student, device_ids=ids), DDP(pred_c, device_ids=ids)
        pred_n = DDP(pred_n, device_ids=ids) if pred_n is not None else None
    teacher_run = teacher  # the EMA below updates `raw.teacher`; this is what runs forward
    if cfg.compile:
        student, teacher_run, pred_c, pred_n = compile_models(student, teacher, pred_c, pred_n)
    autocast = autocast_for(device)

    # bookkeeping
    if master and ckpt is not None:  # drop log lines written after the checkpoint (a crashed tail)
        kept = [r for r in read_log(log_path) if r["step"] <= step]
        with open(log_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
    elif master:
        open(log_path, "w").close()
    stop_signal = []  # Ctrl-C / SIGTERM: finish the step, save, exit (checked below, on every rank)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop_signal.append(signum))
    mask_gen = torch.Generator()
    noise_gen = torch.Generator(device=device)
    end_step = min(total_steps, cfg.max_steps or total_steps)
    workers = default_workers(cfg, world)
    if master:
        n_params = sum(p.numel() for g in optimizer.param_groups for p in g["params"]) / 1e6
        mode = "N-JEPA" if raw.pred_n is not None or cfg.share_predictor and (cfg.lambda1 or cfg.lambda2) else "I-JEPA (lambda1 = lambda2 = 0)"
        print(f"njepa: {mode} | {cfg.model} {cfg.img}px/{cfg.patch} | data {dataset.root} ({len(dataset)} images, "
              f"{len(cfg.classes)} classes) | batch {cfg.batch} x {world} proc | {cfg.epochs} epochs x {ipe} steps | "
              f"{n_params:.1f}M trainable params | device {device} | out {cfg.out}" +
              (f" | resumed at step {step}" if ckpt is not None else ""), flush=True)

    def checkpoint(at_step):  # only rank 0 writes
        if not master:
            return
        state = {"format": "njepa-1", "config": vars(cfg), "step": at_step, "epoch": at_step // ipe,
                 "student": raw.student.state_dict(), "teacher": raw.teacher.state_dict(),
                 "pred_c": raw.pred_c.state_dict(), "pred_n": raw.pred_n.state_dict() if raw.pred_n is not None else None,
                 "optimizer": optimizer.state_dict()}
        save_checkpoint(state, ckpt_path)

    bad_seen, records, collapse_warned = set(), read_log(log_path) if master else [], False
    t_last, images_since, exit_code = time.perf_counter(), 0, 0
    bar = tqdm(total=end_step, initial=step, disable=not master, desc="train", unit="step", dynamic_ncols=True)
    while step < end_step and exit_code == 0:
        epoch, start_batch = divmod(step, ipe)
        batches = epoch_batches(len(dataset), epoch, cfg, rank, world, start_batch)
        loader = torch.utils.data.DataLoader(loader_data, batch_sampler=batches, num_workers=workers,
                                             collate_fn=data.collate, pin_memory=device.type == "cuda",
                                             worker_init_fn=ignore_signals_in_worker)
        bad_this_epoch = []
        for images, _, bad in loader:
            # -- schedules for this step (pure functions of the step)
            lr, wd, m = lr_at(step, cfg, ipe), wd_at(step, cfg, ipe), momentum_at(step, cfg, ipe)
            for group in optimizer.param_groups:
                group["lr"] = lr
                group["weight_decay"] = wd if group["apply_wd"] else 0.0
            # -- masks and noise: seeded by (seed, step, rank)
            images, context, targets = step_inputs(cfg, step, rank, images, mask_gen, noise_gen, device)
            # -- forward, three losses (Alg. 1 lines 9-18)
            with autocast:
                loss, parts, extras = forward_losses(cfg, images, context, targets, student, teacher_run, pred_c, pred_n, noise_gen)
            # -- stop on a non-finite loss or a signal, the same step on every rank
            flags = torch.tensor([float(not torch.isfinite(loss)), float(bool(stop_signal))])
            if world > 1:
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            if flags[0] > 0:
                if master:
                    last = f"{ckpt_path} (step {load_checkpoint(ckpt_path)['step']})" if os.path.exists(ckpt_path) else "none yet"
                    print(f"\nerror: loss became {loss.item()} at step {step} (epoch {epoch}); stopped without saving. "
                          f"Last good checkpoint: {last}. Try a lower --lr.", file=sys.stderr, flush=True)
                exit_code = 3
                break
            if flags[1] > 0:
                checkpoint(step)
                if master:
                    print(f"\nstopped by signal at step {step}; checkpoint saved to {ckpt_path} (continue with --resume)", flush=True)
                exit_code = 130
                break
            # -- backward, AdamW step, EMA teacher (Alg. 1 lines 20-21)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            ema_update(raw.teacher, raw.student, m)
            step += 1
            images_since += images.size(0) * world
            bad_this_epoch += bad
            bar.update(1)
            # -- log
            if master and (step % cfg.log_every == 0 or step == end_step):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t_last
                target, sigma = extras["target"].float(), extras["sigma"]
                rec = {"step": step, "epoch": round(step / ipe, 4), "loss": loss.item(),
                       **{k: v.item() for k, v in parts.items()}, "lr": lr, "wd": wd, "momentum": m,
                       "sigma_mean": sigma.float().mean().item() if sigma is not None else None,
                       "sigma_max": sigma.float().max().item() if sigma is not None else None,
                       "sigma_clipped": (sigma >= cfg.sigma_max).float().mean().item() if sigma is not None and cfg.sigma_max else None,
                       # collapse signal: std over tokens of each teacher feature, averaged over features
                       "teacher_std": target.flatten(0, -2).std(0).mean().item(),
                       "n_ctx": context.size(1), "n_tgt": targets.size(2),
                       "img_s": images_since / dt, "step_s": dt / max(1, images_since / cfg.batch)}
                rec["tflops"] = step_flops(cfg, cfg.batch, context.size(1), targets.size(2)) * rec["img_s"] / cfg.batch / 1e12
                records.append(rec)
                with open(log_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                if rec["teacher_std"] < COLLAPSE_STD and not collapse_warned:
                    collapse_warned = True
                    print(f"\nwarning: step {step}: teacher_std {rec['teacher_std']:.3f} < {COLLAPSE_STD}: the teacher's features "
                          f"are collapsing to a constant (a loss near 0 is then meaningless); try a lower --lr",
                          file=sys.stderr, flush=True)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", ct=f"{rec['ct']:.4f}", lr=f"{lr:.2e}", img_s=f"{rec['img_s']:.0f}")
                t_last, images_since = time.perf_counter(), 0
            if step % ipe == 0 or step == end_step:
                break  # epoch (or run) ends: checkpoint below
        if exit_code:
            break
        # -- end of epoch (or --max-steps): checkpoint, curves, skipped-image summary
        checkpoint(step)
        if master:
            draw_curves(records, os.path.join(cfg.out, "curves.png"))
            new_bad = sorted(set(bad_this_epoch) - bad_seen)
            bad_seen.update(new_bad)
            if new_bad:
                print(f"\nwarning: skipped {len(new_bad)} unreadable image(s) (replaced by the next readable one), "
                      f"e.g. {', '.join(new_bad[:3])}", file=sys.stderr, flush=True)
    bar.close()
    if world > 1 and exit_code == 0:  # every rank must hold the same weights after DDP training
        vec = torch.nn.utils.parameters_to_vector(raw.student.parameters()).detach().float().cpu()
        sums = torch.tensor([vec.sum().item(), vec.abs().sum().item()], dtype=torch.float64)
        lo, hi = sums.clone(), sums.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        if master:
            with open(os.path.join(cfg.out, "ddp_check.json"), "w") as f:
                json.dump({"world": world, "max_param_checksum_diff": (hi - lo).abs().max().item()}, f)
    if master and exit_code == 0:
        last = records[-1] if records else {}
        print(f"done: step {step}/{total_steps}, loss {last.get('loss', float('nan')):.4f} "
              f"(ct {last.get('ct', float('nan')):.4f}), checkpoint {ckpt_path}", flush=True)
    if world > 1:
        dist.destroy_process_group()
    return exit_code

# ---------------------------------------------------------------------------------------------
# Benchmark: python train.py --bench [--model --img --patch --batch ...]
# Warm-up plus timed full steps (masks + teacher + student + predictors + losses + backward + AdamW
# + EMA) on synthetic images; one result line like nanoGPT's MFU report. Not a test: numbers depend
# on the machine, so no test asserts on them.
# ---------------------------------------------------------------------------------------------
# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, by substring of the device name.
GPU_PEAK_BF16 = {"H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12,
                 "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
                 "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12}


def measure_cpu_peak(n=2048, seconds=1.0):
    """The fp32 matmul rate of this process on this CPU (FLOP/s): the best of repeated n x n matmuls."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t))
    return best


def device_peak(device):
    """(peak FLOP/s, how it was found) for MFU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_BF16.items():
            if key in name:
                return peak, f"{name} bf16 data sheet"
        return None, f"{name}: unknown peak"
    return measure_cpu_peak(), "fp32 matmul measured in this process"


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux -> GB (process peak RSS)


def bench(cfg, steps=10, warmup=3):
    device, _, _ = setup_device_and_ddp(cfg)
    torch.manual_seed(cfg.seed)
    student, teacher, pred_c, pred_n, optimizer = build_on_device(cfg, device)
    raw_student, raw_teacher = student, teacher
    if cfg.compile:
        student, teacher, pred_c, pred_n = compile_models(student, teacher, pred_c, pred_n)
    autocast = autocast_for(device)
    images_u8 = torch.randint(0, 256, (cfg.batch, 3, cfg.img, cfg.img), dtype=torch.uint8)
    mask_gen, noise_gen = torch.Generator(), torch.Generator(device=device)
    peak, peak_src = device_peak(device)
    times, flops, n_ctx, n_tgt = [], [], [], []
    for step in tqdm(range(warmup + steps), desc="bench", unit="step", leave=False):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        images, context, targets = step_inputs(cfg, step, 0, images_u8, mask_gen, noise_gen, device)
        with autocast:
            loss, _, _ = forward_losses(cfg, images, context, targets, student, teacher, pred_c, pred_n, noise_gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema_update(raw_teacher, raw_student, 0.996)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
            flops.append(step_flops(cfg, cfg.batch, context.size(1), targets.size(2)))
            n_ctx.append(context.size(1))
            n_tgt.append(targets.size(2))
    t_med = sorted(times)[len(times) // 2]
    achieved = sum(flops) / sum(times)
    mode = "N-JEPA" if cfg.lambda1 > 0 or cfg.lambda2 > 0 else "I-JEPA"
    res = {"model": cfg.model, "img": cfg.img, "patch": cfg.patch, "batch": cfg.batch, "mode": mode,
           "compile": bool(cfg.compile), "device": str(device), "step_s": t_med, "img_s": cfg.batch / t_med,
           "gflop_s": achieved / 1e9, "gflop_per_step": sum(flops) / len(flops) / 1e9,
           "mfu": achieved / peak if peak else None, "peak_gflop_s": peak / 1e9 if peak else None, "peak_source": peak_src,
           "peak_mem_gb": peak_memory_gb(device), "n_ctx": sum(n_ctx) / len(n_ctx), "n_tgt": sum(n_tgt) / len(n_tgt),
           "threads": torch.get_num_threads()}
    mfu = f"MFU {100 * res['mfu']:.1f}% of {res['peak_gflop_s']:.0f} GFLOP/s ({peak_src})" if peak else f"MFU n/a ({peak_src})"
    print(f"bench | {cfg.model} {cfg.img}px/{cfg.patch} batch {cfg.batch} | {mode}{' compiled' if cfg.compile else ''} | "
          f"step {1000 * t_med:.0f} ms (median of {steps}) | {res['img_s']:.1f} img/s | {res['gflop_s']:.1f} GFLOP/s | "
          f"{mfu} | peak mem {res['peak_mem_gb']:.2f} GB | ctx {res['n_ctx']:.0f} + {cfg.n_targets}x{res['n_tgt']:.0f} tgt patches")
    print(json.dumps(res))
    return res


def bench_data(cfg, batches=30):
    """Images/s of the DataLoader alone (decode, random crop, collate) with cfg.workers workers, to
    compare with the training images/s: if it is lower, the accelerator waits for data."""
    dataset = data.build_dataset(cfg.data, "train", cfg.img, cfg.subset_per_class)
    workers = default_workers(cfg, 1)
    batches = epoch_batches(len(dataset), 0, cfg, 0, 1)[:batches]
    loader = torch.utils.data.DataLoader(data.Augmented(dataset, cfg.img, train=True), batch_sampler=batches,
                                         num_workers=workers, collate_fn=data.collate, worker_init_fn=ignore_signals_in_worker)
    it = iter(loader)
    next(it)  # start-up (worker processes) is not counted
    t0, n = time.perf_counter(), 0
    for images, _, _ in tqdm(it, total=len(batches) - 1, desc="data", leave=False):
        n += images.size(0)
    rate = n / (time.perf_counter() - t0)
    print(f"bench-data | {dataset.root} | {cfg.img}px | {workers} workers | {rate:.0f} img/s (decode + crop + collate)")
    return rate


def main(argv=None):
    args = parse_args(argv)
    try:
        ckpt = None
        if args.bench_data:
            bench_data(resolve_config(args))
            return 0
        if args.bench:
            bench(resolve_config(args), steps=args.bench_steps)
            return 0
        if args.resume:
            out = args.out or COMMON_DEFAULTS["out"]
            path = os.path.join(out, "ckpt.pt") if args.resume == "auto" else args.resume
            ckpt = load_checkpoint(path)
            cfg = resolve_config(args, ckpt["config"])
        else:
            cfg = resolve_config(args)
            if os.path.exists(os.path.join(cfg.out, "ckpt.pt")):
                raise ConfigError(f"{os.path.join(cfg.out, 'ckpt.pt')} already exists: pass --resume to continue it, "
                                  f"or choose another --out")
        return train(cfg, ckpt)
    except (ConfigError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
