"""
train.py -- N-JEPA pretraining: a plain loop, an EMA teacher and schedules that are pure functions
of the step (paper Sec. 3.2, 4.1-4.4, Alg. 1; I-JEPA `train.py` where the paper is silent).

  python train.py                                   # reduced default: vit_tiny, 32 px, built-in shapes
  python train.py --data ~/imagenet --epochs 100 --batch 128        # the paper's ViT-B/16 setting
  torchrun --nproc_per_node 8 train.py --data ~/imagenet            # DDP; --batch is the global batch
  python train.py --lambda1 0 --lambda2 0                           # plain I-JEPA (no predictor N)
  python train.py --init-from IN1K-vit.h.14-300e.pth.tar ...        # continue from I-JEPA weights
  python tools/bench.py                                             # speed: img/s, step time, MFU
  python train.py --data imagenette --eval-every 5 --keep-every 10,25,50  # kNN curve + snapshots

Writes OUT/ckpt.pt (every epoch, atomically), OUT/log.jsonl (one JSON line per log step, and one per
online kNN eval), OUT/curves.png and, with --keep-every, weights-only snapshots OUT/ckpt-eE.pt.
`--resume` continues a run exactly (same losses as an uninterrupted run), and a run draws the same
images, masks and noise on 1 or N processes.

Read from the top: the options and the paper's constants, the schedules, the models, one step
(Alg. 1) and the loop. Below "Support": config checking, stopping and saving, the log, devices and
DDP, the curves picture. The online kNN and the collapse signal are evaluation (probe.py); checkpoint
reading and the precision context sit beside the model (model.py); speed and reports are tools/.
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
import probe
from model import (PRESETS, CheckpointError, Predictor, architecture_of, autocast_for, checkpoint_states, default_predictor_dim,
                   gather_tokens, load_checkpoint, resolve_precision, save_checkpoint, train_step_flops, vit)


# ---------------------------------------------------------------------------------------------
# Options: one line each. Two defaults where the setting matters: the paper's (used when --data is
# a folder, Sec. 4.2-4.4) and the reduced one of the built-in dataset (about 5 minutes on 2 CPU cores).
# ---------------------------------------------------------------------------------------------
# name              paper      built-in   type   help (source)
OPTIONS = [
    ("data",             "shapes",   "shapes",   str,   "built-in 'shapes', 'imagenette' (downloads once), or an ImageFolder root ROOT/train/<class>/*"),
    ("out",              "out",      "out",      str,   "folder for ckpt.pt, log.jsonl, curves.png"),
    ("model",            "vit_base", "vit_tiny", str,   f"encoder preset: {', '.join(PRESETS)} (Sec. 4.2: ViT-B)"),
    ("img",              224,        32,         int,   "image size in pixels (Sec. 4.2: 224)"),
    ("patch",            16,         4,          int,   "patch size in pixels (Sec. 4.2: 16)"),
    ("epochs",           100,        4,          int,   "epochs (Sec. 4.2: 100 and 600)"),
    ("batch",            128,        64,         int,   "global batch, split over DDP processes (Sec. 4.2: 128)"),
    ("lr",               1e-3,       1e-4,       float, "peak learning rate, reached after warmup from 1e-4 (Sec. 4.4; built-in: README)"),
    ("warmup",           None,       None,       float, "warmup epochs (Sec. 4.4: 40; default min(40, 0.4 * epochs))"),
    ("lr_schedule",      "cosine",   "cosine",   str,   "after warmup: cosine to 1e-6 (appendix) or constant (Sec. 4.4 text)"),
    ("wd",               0.04,       0.04,       float, "weight decay at the start, cosine to 0.4 (Sec. 4.4)"),
    ("ema",              0.996,      0.996,      float, "EMA momentum at the start, linear to 1.0 (Sec. 4.2)"),
    ("ipe_scale",        1.25,       1.25,       float, "schedules stretched past the run by this factor (Sec. 4.1)"),
    ("lambda1",          0.1,        0.1,        float, "weight of L_NT (Eq. 10, Table 2); 0 with --lambda2 0 is I-JEPA"),
    ("lambda2",          0.1,        0.1,        float, "weight of L_CN (Eq. 10, Table 2)"),
    ("noise",            "multi",    "multi",    str,   "noise levels: multi (a draw per target block), single, none (Table 3, 5a)"),
    ("noise_dist",       "lognormal", "lognormal", str, "sigma: EDM log-normal, or fixed = sigma_data 0.5 (Sec. 4.2 / Alg. 1; SPEC 2)"),
    ("p_mean",           -1.2,       -1.2,       float, "log-normal sigma: mean of ln(sigma) (Sec. 4.2: EDM's P_mean; SPEC 2, noise scale vs width)"),
    ("p_std",            1.2,        1.2,        float, "log-normal sigma: std of ln(sigma) (Sec. 4.2: EDM's P_std)"),
    ("cn_stopgrad",      False,      False,      bool,  "detach the clean prediction in L_CN (ablation; Alg. 1 line 18 has none)"),
    ("sigma_max",        None,       None,       float, "clip sigma at this value (ablation; default no bound)"),
    ("pred_depth",       6,          6,          int,   "predictor depth (Sec. 4.2: 6)"),
    ("pred_dim",         None,       None,       int,   "predictor width (Sec. 4.2: 384; default min(384, encoder width / 2))"),
    ("share_predictor",  False,      False,      bool,  "one predictor for both branches (Table 6a)"),
    ("share_mask_token", False,      False,      bool,  "one mask token for both predictors (Table 5b)"),
    ("context_keep",     "random",   "random",   str,   "cut of a context longer than the batch minimum: random subset, or first (I-JEPA's collator; SPEC 2)"),
    ("subset_per_class", None,       None,       int,   "use only the first N images of each class"),
    ("init_from",        None,       None,       str,   "start from an I-JEPA (.pth.tar) or njepa checkpoint's weights; fresh optimizer"),
    ("seed",             0,          0,          int,   "seed of everything: init, data order, crops, masks, noise"),
    ("device",           "auto",     "auto",     str,   "auto, cpu, cuda (under torchrun: the GPU of LOCAL_RANK), cuda:1, ..."),
    ("compile",          False,      False,      bool,  "torch.compile the encoders and predictors"),
    ("precision",        "auto",     "auto",     str,   "auto (bf16 autocast on CUDA and on CPUs with AMX, where it measured faster; else fp32), fp32, bf16"),
    ("workers",          -1,         -1,         int,   "DataLoader workers (-1: auto)"),
    ("log_every",        10,         10,         int,   "log (and check for collapse) every N steps"),
    ("max_steps",        None,       None,       int,   "stop with a checkpoint after this step; schedules still span --epochs"),
    ("eval_every",       None,       None,       int,   "online kNN of student and teacher at step 0 and every E epochs (0: off; default: the "
                                                          "most often that costs <= 10 %% of training, for built-in and downloadable data; off for a folder)"),
    ("knn_bank",         1000,       500,        int,   "online kNN: labelled bank, a stratified pick of the train split"),
    ("knn_queries",      1000,       500,        int,   "online kNN: queries, a stratified pick of the val/test split"),
    ("keep_every",       None,       None,       str,   "also keep weights-only snapshots ckpt-eE.pt every E epochs, or at the listed epochs ('10,25,50')"),
]
START_LR, FINAL_LR, FINAL_WD, FINAL_EMA = 1e-4, 1e-6, 0.4, 1.0  # Sec. 4.4, appendix, Sec. 4.2


# ---------------------------------------------------------------------------------------------
# Schedules: pure functions of the step (so a resumed run is identical). Length T = ipe_scale *
# total steps (Sec. 4.1: "all hyper-parameter schedules were scaled 25% beyond the actual training").
# ---------------------------------------------------------------------------------------------
def schedule_length(cfg, steps_per_epoch):
    return int(cfg.ipe_scale * cfg.epochs * steps_per_epoch)


def lr_at(step, cfg, steps_per_epoch):
    """Linear warmup START_LR -> lr over `warmup` epochs (Sec. 4.4), then cosine to FINAL_LR at T
    (appendix; I-JEPA WarmupCosineSchedule) or constant (`--lr-schedule constant`, Sec. 4.4 text)."""
    warmup = cfg.warmup * steps_per_epoch
    if step < warmup:
        return START_LR + (cfg.lr - START_LR) * step / warmup
    if cfg.lr_schedule == "constant":
        return cfg.lr
    T = schedule_length(cfg, steps_per_epoch)
    progress = min(1.0, (step - warmup) / max(1.0, T - warmup))
    return FINAL_LR + (cfg.lr - FINAL_LR) * 0.5 * (1 + math.cos(math.pi * progress))


def wd_at(step, cfg, steps_per_epoch):
    """Cosine weight decay wd -> FINAL_WD (Sec. 4.4; I-JEPA CosineWDSchedule)."""
    progress = min(1.0, step / schedule_length(cfg, steps_per_epoch))
    return FINAL_WD + (cfg.wd - FINAL_WD) * 0.5 * (1 + math.cos(math.pi * progress))


def momentum_at(step, cfg, steps_per_epoch):
    """EMA momentum, linear ema -> FINAL_EMA (Sec. 4.2; I-JEPA momentum_scheduler)."""
    progress = min(1.0, step / schedule_length(cfg, steps_per_epoch))
    return cfg.ema + (FINAL_EMA - cfg.ema) * progress


def set_schedules(optimizer, step, cfg, ipe):
    """Write this step's lr and weight decay into the optimizer; returns (lr, wd, EMA momentum)."""
    lr, wd, m = lr_at(step, cfg, ipe), wd_at(step, cfg, ipe), momentum_at(step, cfg, ipe)
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["weight_decay"] = wd if group["apply_wd"] else 0.0  # I-JEPA: no decay on biases and norms
    return lr, wd, m


# ---------------------------------------------------------------------------------------------
# Models, optimizer, EMA
# ---------------------------------------------------------------------------------------------
def build_models(cfg):
    """student (context encoder), teacher (its EMA copy, Alg. 1 line 4), predictor C and predictor N.
    predictor N is None in I-JEPA mode (both lambdas 0) and with --share-predictor (predictor C runs
    both branches). With --share-mask-token predictor N is built around predictor C's mask token."""
    student = vit(cfg.model, img_size=cfg.img, patch_size=cfg.patch)  # first: probe.random_encoder relies on it
    teacher = vit(cfg.model, img_size=cfg.img, patch_size=cfg.patch)
    teacher.load_state_dict(student.state_dict())  # theta_bar = theta
    teacher.requires_grad_(False)
    make = lambda token=None: Predictor(student.grid, student.embed_dim, cfg.pred_dim, cfg.pred_depth,
                                        student.num_heads, shared_mask_token=token)
    pred_c = make()
    pred_n = make(pred_c.mask_token if cfg.share_mask_token else None) if cfg.use_n and not cfg.share_predictor else None
    return SimpleNamespace(student=student, teacher=teacher, pred_c=pred_c, pred_n=pred_n)


def param_groups(modules):
    """AdamW groups: weight decay on weight matrices only, none on biases and norm parameters (I-JEPA)."""
    decay, no_decay = [], []
    for m in modules:
        for name, p in m.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": 0.0, "apply_wd": True},
            {"params": no_decay, "weight_decay": 0.0, "apply_wd": False}]


def build_on_device(cfg, device):
    """The four models on `device` and AdamW (Sec. 4.4, betas as I-JEPA) over the trainable ones."""
    m = build_models(cfg)
    for net in (m.student, m.teacher, m.pred_c, m.pred_n):
        if net is not None:
            net.to(device)
    trainable = [net for net in (m.student, m.pred_c, m.pred_n) if net is not None]
    # fused: one kernel for all parameters; on CPU it needs torch >= 2.4 (requirements.txt)
    m.optimizer = torch.optim.AdamW(param_groups(trainable), lr=cfg.lr, betas=(0.9, 0.999), fused=True)
    return m


@torch.no_grad()
def ema_update(teacher, student, momentum):
    """theta_bar <- q * theta_bar + (1 - q) * theta (Alg. 1 line 21)."""
    torch._foreach_lerp_(list(teacher.parameters()), [p.detach() for p in student.parameters()], 1.0 - momentum)


# ---------------------------------------------------------------------------------------------
# One training step (Alg. 1 lines 7-21)
# ---------------------------------------------------------------------------------------------
def step_noise(cfg, step, rank, world, targets, device):
    """Alg. 1 lines 12-15: the noise for predictor N's mask-token position embeddings, drawn for the
    global batch on `device` from (seed, step) and sliced to this rank. Returns (noise [b, L, Nt, P],
    sigma [b, L]), or (None, None) in I-JEPA mode."""
    if not cfg.use_n:
        return None, None
    b, L, Nt = targets.shape
    g = torch.Generator(device=device).manual_seed(data.step_seed(cfg.seed, step, stream=4))
    noise, sigma = edm_noise.sample_noise(b * world, L, Nt, cfg.pred_dim, cfg.noise, cfg.noise_dist,
                                          generator=g, device=device, sigma_max=cfg.sigma_max, p_mean=cfg.p_mean, p_std=cfg.p_std)
    rows = slice(rank * b, (rank + 1) * b)
    return noise[rows], sigma[rows]


def forward_losses(cfg, images, context, targets, noise, student, teacher, pred_c, pred_n):
    """images [B, 3, H, W] normalised; context [B, Nc]; targets [B, L, Nt]; noise [B, L, Nt, P] or None.
    Returns (total loss, parts, the layer-normed teacher targets [B, L, Nt, D])."""
    B, L, Nt = targets.shape
    with torch.no_grad():  # teacher: all patches, layer-normed output (I-JEPA), Alg. 1 line 10
        h = teacher(images)  # [B, N, D]
        h = F.layer_norm(h, (h.size(-1),))
        target = gather_tokens(h, targets.reshape(B, L * Nt)).view(B, L, Nt, -1)  # [B, L, Nt, D]
    z = student(images, keep=context)  # [B, Nc, D], Alg. 1 line 10
    if cfg.use_n and cfg.share_predictor:  # one predictor, one call on [clean ; noisy] (Table 6a "shared")
        both = pred_c(torch.cat([z, z]), torch.cat([context, context]), torch.cat([targets, targets]),
                      noise=torch.cat([torch.zeros_like(noise), noise]))
        p_c, p_n = both[:B], both[B:]
    else:
        p_c = pred_c(z, context, targets)  # Alg. 1 line 17, predictor C: clean positions
        p_n = pred_n(z, context, targets, noise=noise) if cfg.use_n else None  # predictor N: noisy positions
    total, parts = losses.njepa_loss(p_c, p_n, target, cfg.lambda1, cfg.lambda2, cfg.cn_stopgrad)  # Eq. 10
    return total, parts, target


def stop_flags(loss, signalled, world):
    """[loss not finite, a signal arrived], max over ranks so every rank stops at the same step. The
    tensor lives on the loss's device: NCCL reduces CUDA tensors only (a CPU tensor crashed it)."""
    flags = torch.stack([(~torch.isfinite(loss.detach())).float().reshape(()),
                         torch.tensor(float(signalled), device=loss.device)])
    if world > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def train(cfg, ckpt=None):
    device, rank, world = setup_distributed(cfg)
    cfg.precision = resolve_precision(cfg.precision, device)  # kept resolved in the checkpoint: a resume keeps it
    master = rank == 0
    torch.manual_seed(cfg.seed)
    os.makedirs(cfg.out, exist_ok=True)
    dataset = data.build_dataset(cfg.data, "train", cfg.img, cfg.subset_per_class)
    if len(dataset) < cfg.batch:
        raise ConfigError(f"the dataset has {len(dataset)} images, fewer than one batch of {cfg.batch}")
    cfg.classes = list(dataset.classes)
    cfg.data_path = os.path.abspath(data.fetch(cfg.data)) if cfg.data in data.DOWNLOADS else None  # probe.py reuses it
    ipe = cfg.ipe = len(dataset) // cfg.batch  # iterations per epoch (kept in the checkpoint: its epoch = step / ipe)
    m = build_on_device(cfg, device)
    step = restore(m, ckpt) if ckpt is not None else 0
    if ckpt is None and cfg.init_from:
        init_weights_from(m, cfg, cfg.init_from)
    student, teacher, pred_c, pred_n = wrap_for_training(m, cfg, device, world)
    autocast = autocast_for(device, cfg.precision)
    end_step = min(cfg.epochs * ipe, cfg.max_steps or cfg.epochs * ipe)
    log = Log(cfg, master, ipe, step, end_step, resumed=ckpt is not None)
    signalled = catch_stop_signals()
    if master:
        log.start(m, dataset, world, device)
    knn = probe.OnlineKnn(cfg, dataset, rank, world, device, master) if cfg.eval_every != 0 else None
    if knn and step == 0:  # the random-init encoder: where every curve starts
        log.knn(step, knn.evaluate(m, autocast))
    exit_code = 0
    while step < end_step and exit_code == 0:
        epoch, start_batch = divmod(step, ipe)
        for images, _, bad, context, targets, _ in data.training_loader(dataset, cfg.img, cfg.img // cfg.patch, cfg.seed, cfg.batch,
                                                                        epoch, start_batch, rank, world, cfg.workers, device.type == "cuda",
                                                                        cfg.context_keep):
            # -- schedules, masks (drawn in the loader) and noise: pure functions of (seed, step)
            lr, wd, mom = set_schedules(m.optimizer, step, cfg, ipe)
            images = data.normalize(images.to(device, non_blocking=True))
            context, targets = context.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            noise, sigma = step_noise(cfg, step, rank, world, targets, device)
            # -- forward, three losses (Alg. 1 lines 9-18), backward
            with autocast:
                loss, parts, target = forward_losses(cfg, images, context, targets, noise, student, teacher, pred_c, pred_n)
            m.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # -- a non-finite loss or a signal stops every rank before the update
            nan, sig = stop_flags(loss, bool(signalled), world).tolist()
            if nan or sig:
                exit_code = stop_run(m, cfg, step, loss, master, nan)
                break
            # -- AdamW step, EMA teacher (Alg. 1 lines 20-21)
            m.optimizer.step()
            ema_update(m.teacher, m.student, mom)
            step += 1
            log.step(step, loss, parts, target, sigma, context, targets, lr, wd, mom, bad, images.size(0) * world)
            if step % ipe == 0 or step == end_step:
                break  # epoch (or run) ends: checkpoint below
        if exit_code == 0:
            if knn and knn.due(step, ipe):  # before the checkpoint: a run killed during the eval redoes it on --resume
                log.knn(step, knn.evaluate(m, autocast))
            end_of_epoch(m, cfg, step, ipe, master, log)
    log.close()
    if master and exit_code == 0:
        log.done(step, cfg.epochs * ipe)
    if world > 1:
        dist.destroy_process_group()
    return exit_code


# =============================================================================================
# Support, not the method: config, stopping and saving, the log, devices and DDP, the curves picture
# =============================================================================================
# ---------------------------------------------------------------------------------------------
# Config: the command line, a resumed run's checkpoint, and checks before any work starts
# ---------------------------------------------------------------------------------------------
class ConfigError(ValueError):
    """A bad option or checkpoint; printed as one line before any work starts."""


# Options a resumed run may change; anything else must match the checkpoint (--epochs: see --reschedule).
RESUME_MAY_CHANGE = {"out", "device", "compile", "workers", "log_every", "max_steps", "eval_every", "knn_bank", "knn_queries",
                     "keep_every"}

def parse_args(argv=None):
    """--help shows the defaults of the setting chosen by --data (peeked first). Options not given stay
    out of the namespace, so a resumed run can tell them from the checkpoint's."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--data", default="shapes")
    builtin = pre.parse_known_args(argv)[0].data in data.BUILTIN
    p = argparse.ArgumentParser(description="N-JEPA pretraining", epilog="defaults shown for " + (
        "the built-in data; with --data DIR they are the paper's" if builtin else "the paper's setting (--data DIR)"))
    for name, paper, small, kind, text in OPTIONS:
        default = small if builtin else paper
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            p.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=text)
        else:
            p.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=f"{text} [default: {default}]")
    p.add_argument("--resume", nargs="?", const="auto", help="continue OUT/ckpt.pt (or the given checkpoint)")
    p.add_argument("--reschedule", action="store_true", help="with --resume: allow another --epochs (bends every schedule)")
    return p.parse_args(argv)


def resolve_config(args, ckpt_config=None):
    """Options given on the command line win; a resumed run takes the others from its checkpoint; the
    rest come from OPTIONS. Derived settings (use_n, pred_dim, warmup) are computed here, once."""
    given = {k: v for k, v in vars(args).items() if k in {o[0] for o in OPTIONS}}
    if ckpt_config is not None:
        if "epochs" in given and given["epochs"] != ckpt_config.get("epochs") and not args.reschedule:
            raise ConfigError(f"--epochs {given['epochs']} differs from the checkpoint's {ckpt_config.get('epochs')}: the lr, wd and "
                              f"momentum schedules would bend mid-run; add --reschedule to do it anyway")
        old = {o[0]: o[2] for o in OPTIONS} | {k: v for k, v in ckpt_config.items() if k in {o[0] for o in OPTIONS}}
        clash = {k: (old.get(k), v) for k, v in given.items() if k not in RESUME_MAY_CHANGE | {"epochs"} and old.get(k) != v}
        if clash:
            what = ", ".join(f"--{k.replace('_', '-')} {new} (checkpoint: {was})" for k, (was, new) in clash.items())
            raise ConfigError(f"checkpoint was trained with another config: {what}")
        cfg = dict(old, max_steps=None)  # --max-steps belongs to one invocation, not to the run
        if "precision" not in ckpt_config:  # a run of older code: it trained in fp32 on CPU, bf16 on CUDA
            cfg["precision"] = "fp32" if given.get("device", old["device"]) == "cpu" or not torch.cuda.is_available() else "bf16"
    else:
        column = 2 if given.get("data", "shapes") in data.BUILTIN else 1
        cfg = {o[0]: o[column] for o in OPTIONS}
    cfg.update(given)
    cfg = SimpleNamespace(**cfg)
    check_config(cfg)
    cfg.use_n = cfg.lambda1 > 0 or cfg.lambda2 > 0  # predictor N runs only when its losses count (Eq. 10)
    if cfg.eval_every is None and cfg.data not in data.BUILTIN and cfg.data not in data.DOWNLOADS:
        cfg.eval_every = 0  # a folder (the paper's ImageNet setting): off unless asked for
    return fill_derived(cfg)


def fill_derived(cfg):
    """The defaults that depend on other options (also used by tools/report.py to group runs of older code)."""
    cfg.pred_dim = cfg.pred_dim or default_predictor_dim(PRESETS[cfg.model]["embed_dim"])
    cfg.warmup = min(40.0, 0.4 * cfg.epochs) if cfg.warmup is None else cfg.warmup  # Sec. 4.4; SPEC 2
    return cfg


def check_config(cfg):
    if cfg.model not in PRESETS:
        raise ConfigError(f"unknown model {cfg.model!r}; choose one of {', '.join(PRESETS)}")
    try:
        masks.patch_grid(cfg.img, cfg.patch)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for name in ("epochs", "batch", "pred_depth", "log_every"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.lambda1 < 0 or cfg.lambda2 < 0:
        raise ConfigError("--lambda1 and --lambda2 must be >= 0")
    for name, choices in (("noise", ("multi", "single", "none")), ("noise_dist", ("lognormal", "fixed")),
                          ("lr_schedule", ("cosine", "constant")), ("context_keep", ("random", "first")),
                          ("precision", ("auto", "fp32", "bf16"))):
        if getattr(cfg, name) not in choices:
            raise ConfigError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)}, got {getattr(cfg, name)!r}")
    for name in ("eval_every", "knn_bank", "knn_queries"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < (0 if name == "eval_every" else 1):
            raise ConfigError(f"--{name.replace('_', '-')} must be >= {0 if name == 'eval_every' else 1}, got {getattr(cfg, name)}")
    snapshot_epochs(cfg.keep_every, cfg.epochs)  # raises on a bad --keep-every
    if cfg.p_std < 0:
        raise ConfigError(f"--p-std must be >= 0, got {cfg.p_std}")
    if cfg.sigma_max is not None and cfg.sigma_max <= 0:
        raise ConfigError(f"--sigma-max must be > 0, got {cfg.sigma_max}")
    pred_dim, heads = cfg.pred_dim or default_predictor_dim(PRESETS[cfg.model]["embed_dim"]), PRESETS[cfg.model]["num_heads"]
    if pred_dim % heads or pred_dim % 4:
        raise ConfigError(f"--pred-dim {pred_dim} must be divisible by 4 and by the {heads} heads")


def main(argv=None):
    args = parse_args(argv)
    try:
        ckpt = None
        if args.resume:
            ckpt = load_checkpoint(os.path.join(getattr(args, "out", "out"), "ckpt.pt") if args.resume == "auto" else args.resume)
            cfg = resolve_config(args, ckpt["config"])
        else:
            if getattr(args, "init_from", None):  # the architecture comes from the weights unless given
                for k, v in architecture_of(args.init_from).items():
                    if not hasattr(args, k):
                        setattr(args, k, v)
            cfg = resolve_config(args)
            if os.path.exists(os.path.join(cfg.out, "ckpt.pt")):
                raise ConfigError(f"{os.path.join(cfg.out, 'ckpt.pt')} already exists: pass --resume to continue it, "
                                  f"or choose another --out")
        return train(cfg, ckpt)
    except (ConfigError, CheckpointError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------------------------------------
# Stopping and saving: checkpoints every epoch, snapshots, signals and NaN
# ---------------------------------------------------------------------------------------------
def restore(m, ckpt):
    """Load a checkpoint's models and optimizer (--resume); returns its step."""
    if "optimizer" not in ckpt:
        raise ConfigError(f"the checkpoint of step {ckpt['step']} is a weights-only snapshot (--keep-every): resume from ckpt.pt")
    for name in ("student", "teacher", "pred_c", "pred_n"):
        if getattr(m, name) is not None:
            getattr(m, name).load_state_dict(ckpt[name])
    m.optimizer.load_state_dict(ckpt["optimizer"])
    return ckpt["step"]


def stop_run(m, cfg, step, loss, master, nan):
    """A NaN/inf loss (exit 3, nothing saved: the last checkpoint is the last good state) or a
    signal (exit 130, checkpoint of this step, continue with --resume)."""
    ckpt_path = os.path.join(cfg.out, "ckpt.pt")
    if nan:
        if master:
            last = f"{ckpt_path} (step {load_checkpoint(ckpt_path)['step']})" if os.path.exists(ckpt_path) else "none yet"
            print(f"\nerror: loss became {loss.item()} at step {step}; stopped without saving. "
                  f"Last good checkpoint: {last}. Try a lower --lr.", file=sys.stderr, flush=True)
        return 3
    save_run(m, cfg, step, master)
    if master:
        print(f"\nstopped by signal at step {step}; checkpoint saved to {ckpt_path} (continue with --resume)", flush=True)
    return 130


def end_of_epoch(m, cfg, step, ipe, master, log):
    """Checkpoint (and a snapshot where --keep-every asks), curves, the summary of images skipped this epoch."""
    save_run(m, cfg, step, master)
    if master and step % ipe == 0 and step // ipe in snapshot_epochs(cfg.keep_every, cfg.epochs):
        save_snapshot(m, cfg, step, step // ipe)
    if master:
        log.end_of_epoch()


def snapshot_epochs(keep_every, epochs):
    """--keep-every "E" -> {E, 2E, ...} up to `epochs`; "10,25,50" -> those epochs; None -> none."""
    if not keep_every:
        return set()
    try:
        parts = [int(p) for p in str(keep_every).split(",") if p.strip()]
    except ValueError:
        raise ConfigError(f"--keep-every takes E or a list of epochs like 10,25,50, got {keep_every!r}") from None
    if not parts or min(parts) < 1:
        raise ConfigError(f"--keep-every epochs must be >= 1, got {keep_every!r}")
    return set(range(parts[0], epochs + 1, parts[0])) if len(parts) == 1 and "," not in str(keep_every) else set(parts)


def save_snapshot(m, cfg, step, epoch):
    """OUT/ckpt-eE.pt: the weights and config at the end of epoch E, without the optimizer (a point of
    the curve for probe.py, not a state to --resume from); written atomically like ckpt.pt."""
    save_checkpoint({"format": "njepa-1", "config": vars(cfg), "step": step, "epoch": epoch, "snapshot": True,
                     "student": m.student.state_dict(), "teacher": m.teacher.state_dict(), "pred_c": m.pred_c.state_dict(),
                     "pred_n": m.pred_n.state_dict() if m.pred_n is not None else None}, os.path.join(cfg.out, f"ckpt-e{epoch}.pt"))


def save_run(m, cfg, step, master):
    if master:  # only rank 0 writes
        save_checkpoint({"format": "njepa-1", "config": vars(cfg), "step": step,
                         "student": m.student.state_dict(), "teacher": m.teacher.state_dict(),
                         "pred_c": m.pred_c.state_dict(), "pred_n": m.pred_n.state_dict() if m.pred_n is not None else None,
                         "optimizer": m.optimizer.state_dict()}, os.path.join(cfg.out, "ckpt.pt"))


# ---------------------------------------------------------------------------------------------
# The log: log.jsonl, the progress bar, the collapse warning
# ---------------------------------------------------------------------------------------------
def step_flops(cfg, batch, n_ctx, n_tgt):
    """Model FLOPs of one training step with this config (model.train_step_flops)."""
    return train_step_flops(cfg.model, cfg.img, cfg.patch, cfg.pred_dim, cfg.pred_depth, cfg.use_n, batch, n_ctx, n_tgt)


class Log:
    """log.jsonl (one line every --log-every steps), the progress bar, the collapse warning and the
    per-epoch summaries; on rank 0 only."""

    def __init__(self, cfg, master, ipe, step, end_step, resumed):
        self.cfg, self.master, self.ipe, self.end_step = cfg, master, ipe, end_step
        self.path = os.path.join(cfg.out, "log.jsonl")
        self.records, self.bad, self.bad_seen, self.warned = [], [], set(), False
        if master:  # a resumed run drops log lines written after its checkpoint (a crashed tail)
            self.records = [r for r in probe.read_log(self.path) if r["step"] <= step] if resumed else []
            with open(self.path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.records)
        self.bar = tqdm(total=end_step, initial=step, disable=not master, desc="train", unit="step", dynamic_ncols=True)
        self.t_last, self.images = time.perf_counter(), 0
        # wall_s: seconds this run has spent since step 0, over all its resumed pieces (kNN evals included)
        self.t_start = self.t_last - max([r.get("wall_s", 0.0) for r in self.records] + [0.0])
        self.resumed_at = step if resumed else None

    def start(self, m, dataset, world, device):
        cfg = self.cfg
        n_params = sum(p.numel() for g in m.optimizer.param_groups for p in g["params"]) / 1e6
        mode = "N-JEPA" if cfg.use_n else "I-JEPA (lambda1 = lambda2 = 0)"
        print(f"njepa: {mode} | {cfg.model} {cfg.img}px/{cfg.patch} | data {dataset.root} ({len(dataset)} images, "
              f"{len(cfg.classes)} classes) | batch {cfg.batch} x {world} proc | {cfg.epochs} epochs x {self.ipe} steps | "
              f"{n_params:.1f}M trainable params | device {device} {cfg.precision} | out {cfg.out}" +
              (f" | from {cfg.init_from}" if cfg.init_from else "") +
              (f" | resumed at step {self.resumed_at}" if self.resumed_at is not None else ""), flush=True)
        if cfg.use_n and cfg.noise != "none":  # what the noise hides at this width (its own generator: the run is unchanged)
            print(edm_noise.describe(cfg.pred_dim, cfg.img // cfg.patch, cfg.noise_dist, cfg.p_mean, cfg.p_std, cfg.sigma_max), flush=True)

    def step(self, step, loss, parts, target, sigma, context, targets, lr, wd, mom, bad, n_images):
        self.bar.update(1)
        self.bad += bad
        self.images += n_images
        cfg = self.cfg
        if not self.master or (step % cfg.log_every and step != self.end_step):
            return
        if target.is_cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - self.t_last
        rec = {"step": step, "epoch": round(step / self.ipe, 4), "loss": loss.item(), **{k: v.item() for k, v in parts.items()},
               "lr": lr, "wd": wd, "momentum": mom,
               "sigma_mean": sigma.float().mean().item() if sigma is not None else None,
               "sigma_max": sigma.float().max().item() if sigma is not None else None,
               "sigma_clipped": (sigma >= cfg.sigma_max).float().mean().item() if sigma is not None and cfg.sigma_max else None,
               "teacher_std": probe.feature_std(target).item(), "n_ctx": context.size(1), "n_tgt": targets.size(2),
               "img_s": self.images / dt, "step_s": dt / max(1, self.images / cfg.batch),
               "wall_s": round(time.perf_counter() - self.t_start, 1)}
        rec["tflops"] = step_flops(cfg, cfg.batch, context.size(1), targets.size(2)) * rec["img_s"] / cfg.batch / 1e12
        self.records.append(rec)
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if rec["teacher_std"] < probe.COLLAPSE_STD and not self.warned:
            self.warned = True
            print(f"\nwarning: step {step}: teacher_std {rec['teacher_std']:.3f} < {probe.COLLAPSE_STD}: the teacher's features "
                  f"are collapsing to a constant (a loss near 0 is then meaningless); try a lower --lr", file=sys.stderr, flush=True)
        self.bar.set_postfix(loss=f"{rec['loss']:.4f}", ct=f"{rec['ct']:.4f}", lr=f"{lr:.2e}", img_s=f"{rec['img_s']:.0f}")
        self.t_last, self.images = time.perf_counter(), 0

    def knn(self, step, res):
        """One log line and one printed line per online kNN eval; its time is kept out of img/s."""
        if not self.master or res is None:
            return
        rec = {"step": step, "epoch": round(step / self.ipe, 4), **res, "wall_s": round(time.perf_counter() - self.t_start, 1)}
        self.records.append(rec)
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        self.t_last += res["knn_s"]
        self.bar.write(f"knn | epoch {rec['epoch']:g} (step {step}) | student {100 * res['knn_student']:.1f} % | teacher "
                       f"{100 * res['knn_teacher']:.1f} % | bank {res['knn_bank']} | queries {res['knn_queries']} | {res['knn_s']:.1f}s")

    def end_of_epoch(self):
        draw_curves(self.records, os.path.join(self.cfg.out, "curves.png"))
        new_bad = sorted(set(self.bad) - self.bad_seen)
        self.bad_seen.update(new_bad)
        self.bad = []
        if new_bad:
            print(f"\nwarning: skipped {len(new_bad)} unreadable image(s) (replaced by the next readable one), "
                  f"e.g. {', '.join(new_bad[:3])}", file=sys.stderr, flush=True)

    def close(self):
        self.bar.close()

    def done(self, step, total):
        last = next((r for r in reversed(self.records) if "loss" in r), {})
        print(f"done: step {step}/{total}, loss {last.get('loss', float('nan')):.4f} (ct {last.get('ct', float('nan')):.4f}), "
              f"checkpoint {os.path.join(self.cfg.out, 'ckpt.pt')}", flush=True)


# ---------------------------------------------------------------------------------------------
# --init-from: official I-JEPA (or njepa) weights
# ---------------------------------------------------------------------------------------------
def init_weights_from(m, cfg, path):
    """--init-from: student <- the checkpoint's context encoder, teacher <- its target encoder (EMA),
    predictor C <- its predictor. Predictor N starts as a copy of predictor C: Sec. 3.2 describes the
    two predictors as the same network fed clean or noisy positions, and L_CN (Eq. 9) pulls them
    together, so starting equal (L_CN = 0 at sigma = 0) keeps the warm start from a random jolt."""
    states = checkpoint_states(path)
    for net, state, name in zip((m.student, m.teacher, m.pred_c), states, ("encoder", "target encoder", "predictor")):
        mine = net.state_dict()
        bad = [k for k in mine if k not in state or state[k].shape != mine[k].shape]
        if bad:
            k = bad[0]
            raise ConfigError(f"{path}: its {name} does not fit --model {cfg.model} --img {cfg.img} --patch {cfg.patch} "
                              f"--pred-depth {cfg.pred_depth} --pred-dim {cfg.pred_dim}: {k} is "
                              f"{tuple(state[k].shape) if k in state else 'missing'}, expected {tuple(mine[k].shape)}")
        net.load_state_dict({k: state[k] for k in mine})
    if m.pred_n is not None:
        m.pred_n.load_state_dict({k: v for k, v in m.pred_c.state_dict().items() if k in m.pred_n.state_dict()})


# ---------------------------------------------------------------------------------------------
# Devices, DDP (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK), signals
# ---------------------------------------------------------------------------------------------
def resolve_device(spec, local_rank, world, n_gpus):
    """The device of this process. Under torchrun (world > 1) a CUDA process takes the GPU of its
    LOCAL_RANK, whatever index was asked for; too few GPUs is a one-line error."""
    if spec == "auto":
        spec = "cuda" if n_gpus > 0 else "cpu"
    device = torch.device(spec)
    if device.type == "cuda":
        if n_gpus == 0:
            raise ConfigError("--device cuda asked for, but no CUDA device is available")
        index = local_rank if world > 1 else (device.index or 0)
        if index >= n_gpus:
            raise ConfigError(f"process with LOCAL_RANK {local_rank} needs GPU {index}, but this node has {n_gpus} "
                              f"GPU(s); use --nproc_per_node <= {n_gpus}" if world > 1 else f"--device {spec}: only {n_gpus} GPU(s)")
        device = torch.device("cuda", index)
    return device


def process_group_backend(device):
    """gloo for CPU tensors, NCCL for CUDA tensors; on GPUs both, so any collective on either works."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def setup_distributed(cfg):
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", 0)), world, n_gpus)
    if world > 1:
        if cfg.batch < world or cfg.batch % world:
            raise ConfigError(f"--batch {cfg.batch} must be a multiple of the {world} processes (it is the global batch)")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(process_group_backend(device))
    return device, rank, world


def wrap_for_training(m, cfg, device, world):
    """What runs forward: each trainable module in its own DDP wrapper (the teacher is not wrapped: it
    follows the student by EMA, identical on every rank), then torch.compile if asked for."""
    student, teacher, pred_c, pred_n = m.student, m.teacher, m.pred_c, m.pred_n
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [device.index] if device.type == "cuda" else None
        student, pred_c = DDP(student, device_ids=ids), DDP(pred_c, device_ids=ids)
        pred_n = DDP(pred_n, device_ids=ids) if pred_n is not None else None
    return compile_models(student, teacher, pred_c, pred_n) if cfg.compile else (student, teacher, pred_c, pred_n)


def compile_models(student, teacher, pred_c, pred_n):
    """torch.compile; the context length changes every batch, hence dynamic shapes for the student and predictors."""
    import torch._inductor.config
    # inductor's coalescing analysis hit an internal assertion on these dynamic shapes (torch 2.11, H200,
    # measured); its own comment says it "does not yet apply to dynamic shapes", so it is turned off.
    torch._inductor.config.triton.coalesce_tiling_analysis = False
    pred_n = torch.compile(pred_n, dynamic=True) if pred_n is not None else None
    return torch.compile(student, dynamic=True), torch.compile(teacher), torch.compile(pred_c, dynamic=True), pred_n


def catch_stop_signals():
    """Ctrl-C / SIGTERM: the loop finishes its step, saves and exits (checked on every rank)."""
    received = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: received.append(signum))
    return received


# ---------------------------------------------------------------------------------------------
# The per-epoch OUT/curves.png (pillow), also tools/report.py --plot
# ---------------------------------------------------------------------------------------------
CURVE_COLOURS = [(30, 90, 200), (220, 60, 40), (40, 160, 70), (150, 60, 190), (230, 150, 20), (20, 170, 180)]


def draw_curves(runs, path, keys=("knn", "loss", "ct", "nt", "cn", "lr", "sigma_mean", "teacher_std", "img_s")):
    """A PNG drawn with pillow: one small chart per logged quantity against the step. `runs` is one
    run's log records (OUT/curves.png) or {label: records} to overlay several runs in colour. The
    "knn" chart holds the online kNN top-1 of the student (thick) and the teacher (thin) on a fixed
    0-100 % axis, a dot per eval, and the step-0 value (the random-init encoder) as a grey line."""
    from PIL import Image, ImageDraw
    runs = runs if isinstance(runs, dict) else {"": runs}
    every = [r for recs in runs.values() for r in recs]
    lines = lambda key: [("knn_student", 2), ("knn_teacher", 1)] if key == "knn" else [(key, 2)]
    keys = [k for k in keys if any(r.get(name) is not None for r in every for name, _ in lines(k))]
    if not every or not keys:
        return
    W, H, pad, ncol, legend = 300, 180, 34, 4, 16 * (len(runs) > 1) * len(runs)
    sheet = Image.new("RGB", (W * ncol, H * math.ceil(len(keys) / ncol) + legend), "white")
    d = ImageDraw.Draw(sheet)
    for j, label in enumerate(runs if len(runs) > 1 else []):
        d.text((8, sheet.height - legend + 16 * j + 2), f"-- {label}", fill=CURVE_COLOURS[j % len(CURVE_COLOURS)])
    for k, key in enumerate(keys):
        x0, y0 = (k % ncol) * W, (k // ncol) * H
        d.rectangle([x0 + pad, y0 + 20, x0 + W - 8, y0 + H - 20], outline=(160, 160, 160))
        d.text((x0 + pad, y0 + 5), "knn top-1 (thick: student, thin: teacher)" if key == "knn" else key, fill="black")
        series = [(j, width, [(r["step"], r[name]) for r in recs if r.get(name) is not None and math.isfinite(r[name])])
                  for j, recs in enumerate(runs.values()) for name, width in lines(key)]
        pts = [p for *_, s in series for p in s]
        if len(pts) < 2:
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        (lo, hi), first, last = (0.0, 1.0) if key == "knn" else (min(ys), max(ys)), min(xs), max(xs)
        hi = hi if hi > lo else lo + 1e-12
        sx = lambda x: x0 + pad + (x - first) / max(1, last - first) * (W - pad - 8)
        sy = lambda y: y0 + H - 20 - (y - lo) / (hi - lo) * (H - 40)
        for j, width, s in series:
            colour = CURVE_COLOURS[j % len(CURVE_COLOURS)]
            if key == "knn" and width == 2 and s and s[0][0] == 0:  # random init: the level a curve must rise above
                d.line([(sx(first), sy(s[0][1])), (sx(last), sy(s[0][1]))], fill=(170, 170, 170), width=1)
            if len(s) > 1:
                d.line([(sx(x), sy(y)) for x, y in s], fill=colour, width=width)
            for x, y in s if key == "knn" else []:
                d.ellipse([sx(x) - width, sy(y) - width, sx(x) + width, sy(y) + width], fill=colour)
        d.text((x0 + 2, y0 + 20), "100%" if key == "knn" else f"{hi:.3g}", fill=(90, 90, 90))
        d.text((x0 + 2, y0 + H - 32), "0" if key == "knn" else f"{lo:.3g}", fill=(90, 90, 90))
        d.text((x0 + W - 60, y0 + H - 16), f"step {last}", fill=(90, 90, 90))
    sheet.save(path)


if __name__ == "__main__":
    sys.exit(main())
