"""
probe.py -- linear-probe evaluation of a pretrained encoder (paper Sec. 4.5, Sec. 5, Table 6b).

  python probe.py --ckpt out/ckpt.pt                         # pretrained vs random init, one line
  python probe.py --ckpt out/ckpt.pt --label-fraction 0.1    # low-shot (Table 6b), stratified per class
  python probe.py --ckpt out/ckpt.pt --last-layers 4         # concat of the last 4 blocks (Table 6b)
  python probe.py --ckpt runs/*/ckpt.pt --table              # many runs -> mean ± std table by config
  python probe.py --table results/study/*.json               # the same table from saved results
  python probe.py --ckpt runs/x/ckpt-e*.pt --table           # snapshots of one run: a row per epoch
  python probe.py --curves runs/a-s? runs/b-s? --curves-out lc.png   # kNN and probe vs epochs, per arm
                                                           # (and prints the kNN numbers, paired to I-JEPA)
  python probe.py --random-init --model vit_tiny --img 32 --patch 4 --data shapes   # baseline alone
  python probe.py --pixels --img 32 --data shapes            # raw pixels, for scale
  python probe.py --ckpt IN1K-vit.h.14-300e.pth.tar --data imagenette   # an official I-JEPA checkpoint

Protocol:
  * frozen encoder, the student by default (Sec. 4.5: "we employ the student encoder"), `--encoder
    teacher` to switch; for an official I-JEPA checkpoint the target encoder by default, as the I-JEPA
    paper evaluated (App. A.1), `--encoder encoder` for the context encoder; representation = mean over patch tokens of the final-normed output (Sec. 4.5
    "averaging its output"); with --last-layers k, the same for each of the last k blocks, concatenated.
  * features are extracted once, with the deterministic evaluation crop, and cached next to the
    checkpoint (key: checkpoint hash, encoder, layers, data, split, image size).
  * the classifier (SPEC section 2, "linear probe"). Default `--solver lbfgs`: multinomial logistic
    regression on standardised features, full batch, solved to convergence with L-BFGS (strong-Wolfe
    line search); its L2 strength is the one with the best mean accuracy over 3 x 5 stratified folds of
    the training labels, then it is refit on all of them; the test split is touched once. Deterministic:
    the probe seed only moves the fold splits. `--solver sgd` is the paper's protocol (SGD, batch 1024,
    50 epochs, DINO), for feature sets too large for memory; at our scale (5,000 images: 5 steps an
    epoch) it underfits and its top-1 moves 1.5-1.9 points from one probe seed to the next.
  * with --ckpt, the same probe also runs on the randomly initialised encoder of the same run (the
    student at step 0: same architecture, same seed), so the gain from pretraining is printed next to
    it: `probe | pretrained 31.2 % | random init 20.8 % | +10.4`.
  * results: a fixed-width line, OUT/probe.json (latest) and OUT/probe.jsonl (all).
"""
import argparse
import glob
import hashlib
import json
import math
import os
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import model as model_lib
import train
from model import vit

L2_GRID = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)  # strongest first: each fit warm-starts the next (SPEC: down to ~1e-6)
SGD_LR_GRID = (0.01, 0.03, 0.1, 0.3, 1.0)  # --solver sgd: base lr for batch 256, scaled by batch/256 (DINO)


class ProbeError(ValueError):
    pass


def file_hash(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def extract_features(encoder, dataset, img_size, last_layers, device, batch=256, workers=0):
    """[n, last_layers * D] features (mean-pooled final-normed patch tokens) and [n] labels.
    encoder None: the raw pixels of the evaluation crop, [n, 3 * img * img] (a baseline)."""
    if encoder is not None:
        encoder.eval()
    loader = torch.utils.data.DataLoader(data.Augmented(dataset, img_size, train=False), batch_size=batch,
                                         num_workers=workers, collate_fn=data.collate)
    feats, labels, bad = [], [], []
    autocast = train.autocast_for(device)
    for images, y, skipped in tqdm(loader, desc="features", unit="batch", leave=False):
        x = data.normalize(images.to(device))
        if encoder is None:
            feats.append(x.flatten(1).cpu())
        else:
            with autocast:
                outs = encoder(x, return_layers=last_layers)
            outs = outs if isinstance(outs, list) else [outs]
            feats.append(torch.cat([o.float().mean(1) for o in outs], dim=1).cpu())  # [B, k*D]
        labels.append(y)
        bad += skipped
    if bad:
        print(f"warning: skipped {len(bad)} unreadable image(s), e.g. {', '.join(sorted(set(bad))[:3])}", file=sys.stderr)
    return torch.cat(feats), torch.cat(labels)


def cached_features(encoder, key, cache_dir, dataset, img, last_layers, device, workers):
    """Features from the cache folder, or extracted and written there (atomically)."""
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, f"features-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}.pt")
    if os.path.exists(path):
        blob = torch.load(path, weights_only=True)
        return blob["x"], blob["y"], True
    x, y = extract_features(encoder, dataset, img, last_layers, device, workers=workers)
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save({"x": x, "y": y, "key": json.dumps(key)}, tmp)
    os.replace(tmp, path)
    return x, y, False


# ---------------------------------------------------------------------------------------------
# Classifiers on fixed features
# ---------------------------------------------------------------------------------------------
def stratified_subset(labels, fraction, generator):
    """Indices of a per-class fraction of the samples (at least one per class), chosen at random."""
    picked = []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().squeeze(1)
        k = max(1, int(round(fraction * len(idx))))
        picked.append(idx[torch.randperm(len(idx), generator=generator)[:k]])
    return torch.cat(picked).sort().values


def stratified_folds(labels, k, generator):
    """A fold id in 0..k-1 per sample; each class is dealt round-robin over the folds in random order."""
    fold = torch.empty(len(labels), dtype=torch.long)
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=generator)]
        fold[idx] = torch.arange(len(idx)) % k
    return fold


def fit_logreg(x, y, n_classes, l2, w=None, eig=None, max_iter=200):
    """Multinomial logistic regression by full-batch L-BFGS with strong-Wolfe line search:
        min_W  mean_i CE(W [x_i; 1], y_i) + l2 / 2 * ||W without bias||^2
    x [n, F] float64 (standardised), y [n]. Returns W [C, F + 1] (bias last). Convex, so warm-starting
    from `w` only saves iterations; deterministic for fixed inputs (no sampling anywhere).

    Preconditioning (the same minimiser, only faster): mean-pooled features are strongly correlated,
    and plain L-BFGS needed > 1,000 iterations at weak L2 (measured). With x^T x / n = Q diag(lam) Q^T
    we optimise V in W = V P^T, P = Q diag(d), d = (lam + l2 / 0.1)^(-1/2): in the coordinates x P the
    loss's curvature is about the same in every direction, and L-BFGS converges in 20-80 evaluations.
    The penalty is still l2 / 2 ||W||^2 = l2 / 2 ||V diag(d)||^2."""
    lam, Q = eig if eig is not None else data_eig(x)
    d = (lam.clamp_min(0) + l2 / 0.1).rsqrt()  # [F]; 0.1 ~ the curvature of softmax cross-entropy
    z = torch.cat([x @ (Q * d), torch.ones(len(x), 1, dtype=x.dtype)], dim=1)  # [n, F + 1]
    if w is None:
        v = torch.zeros(n_classes, z.size(1), dtype=x.dtype)
    else:  # W -> V: V = W Q diag(1/d)
        v = torch.cat([(w[:, :-1] @ Q) / d, w[:, -1:]], dim=1)
    onehot = F.one_hot(y, n_classes).to(x.dtype)  # [n, C]
    penalty = d.pow(2)  # ||W||^2 = sum_j d_j^2 ||V[:, j]||^2 (bias column unpenalised)
    opt = torch.optim.LBFGS([v], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-8,
                            tolerance_change=1e-10, line_search_fn="strong_wolfe")

    @torch.no_grad()
    def closure():  # loss and its gradient written out: (softmax(z V^T) - Y)^T z / n + l2 * V diag(d^2)
        logits = z @ v.T  # [n, C]
        loss = (torch.logsumexp(logits, 1) - (logits * onehot).sum(1)).mean() + 0.5 * l2 * (v[:, :-1].pow(2) * penalty).sum()
        grad = (logits.softmax(1) - onehot).T @ z / len(z)  # [C, F + 1]
        grad[:, :-1] += l2 * v[:, :-1] * penalty
        v.grad = grad
        return loss

    opt.step(closure)
    v = v.detach()
    return torch.cat([(v[:, :-1] * d) @ Q.T, v[:, -1:]], dim=1)  # back to W [C, F + 1]


def predict(w, x):
    return (x @ w[:, :-1].T + w[:, -1]).argmax(1)


def data_eig(x):
    """(lam, Q) with x^T x / n = Q diag(lam) Q^T. With fewer samples than features, only the directions
    the data spans (from the SVD of x): the optimum W lies in them, the others only carry penalty."""
    if len(x) < x.size(1):
        _, s, vh = torch.linalg.svd(x, full_matrices=False)
        return s.pow(2) / len(x), vh.T
    return torch.linalg.eigh(x.T @ x / len(x))


def logreg_path(x, y, n_classes, grid):
    """fit_logreg for each L2 in `grid` (strongest first), each warm-started from the previous one."""
    eig = data_eig(x)
    ws, w = [], None
    for l2 in grid:
        w = fit_logreg(x, y, n_classes, l2, w, eig)
        ws.append(w)
    return ws


def choose_l2(x, y, n_classes, grid, k, generator, repeats=3):
    """The L2 with the best mean held-out accuracy over `repeats` x k stratified folds (ties: the
    stronger L2). One 5-fold split picked 1e-5 or 1e-4 on the same features depending on the seed
    (top-1 47.1 vs 48.1, measured); averaging 3 splits made the pick stable. Returns (l2, {l2: acc})."""
    acc = torch.zeros(len(grid), dtype=torch.float64)
    used = 0
    for _ in range(repeats):
        fold = stratified_folds(y, k, generator)
        for f in range(k):
            held = fold == f
            if held.all() or not held.any():
                continue
            for j, w in enumerate(logreg_path(x[~held], y[~held], n_classes, grid)):
                acc[j] += (predict(w, x[held]) == y[held]).double().mean()
            used += 1
    acc /= max(1, used)
    best = max(range(len(grid)), key=lambda j: (round(acc[j].item(), 12), -j))  # ties: earlier = stronger
    return grid[best], {f"{l2:g}": acc[j].item() for j, l2 in enumerate(grid)}


def train_linear_sgd(x, y, n_classes, lr, epochs, batch, generator):
    """--solver sgd: linear classifier with SGD + momentum 0.9, cosine lr (the paper's DINO protocol)."""
    head = torch.nn.Linear(x.size(1), n_classes)
    torch.nn.init.normal_(head.weight, std=0.01, generator=generator)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.SGD(head.parameters(), lr=lr * batch / 256, momentum=0.9, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * max(1, -(-len(x) // batch)))
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for k in range(0, len(x), batch):
            idx = order[k:k + batch]
            loss = F.cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return torch.cat([head.weight, head.bias[:, None]], dim=1).detach()


def choose_sgd_lr(x, y, n_classes, grid, epochs, batch, generator, seed):
    """--solver sgd: the lr with the best accuracy on a stratified 10 % of the training labels."""
    hold = stratified_subset(y, 0.1, generator)
    fit = torch.ones(len(y), dtype=torch.bool)
    fit[hold] = False
    scores = {}
    for lr in grid:
        w = train_linear_sgd(x[fit], y[fit], n_classes, lr, epochs, batch, torch.Generator().manual_seed(seed))
        scores[lr] = (predict(w, x[hold]) == y[hold]).float().mean().item()
    best = max(scores, key=lambda k: (scores[k], -k))  # ties: the smaller lr
    return best, {f"{k:g}": v for k, v in scores.items()}


def linear_probe(train_x, train_y, test_x, test_y, n_classes, seed=0, label_fraction=1.0, solver="lbfgs",
                 folds=5, l2_grid=L2_GRID, epochs=50, batch=1024, repeats=3):
    """Top-1 of a linear classifier on fixed features. Features are standardised with the statistics
    of the (possibly reduced) training labels. Returns dict(top1, solver, chosen, scores, n_train, solve_s)."""
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    keep = stratified_subset(train_y, label_fraction, g) if label_fraction < 1.0 else torch.arange(len(train_y))
    x, y = train_x[keep], train_y[keep]
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x, tx = (x - mean) / std, (test_x - mean) / std
    if solver == "lbfgs":
        x, tx = x.double(), tx.double()
        threads = torch.get_num_threads()
        if x.numel() < 1_000_000:  # small problems: thread start-up costs more than it saves (measured 4x)
            torch.set_num_threads(1)
        try:
            chosen, scores = choose_l2(x, y, n_classes, l2_grid, folds, g, repeats)
            w = logreg_path(x, y, n_classes, [l2 for l2 in l2_grid if l2 >= chosen])[-1]  # refit on all labels
        finally:
            torch.set_num_threads(threads)
    elif solver == "sgd":
        chosen, scores = choose_sgd_lr(x, y, n_classes, SGD_LR_GRID, epochs, batch, g, seed)
        w = train_linear_sgd(x, y, n_classes, chosen, epochs, batch, torch.Generator().manual_seed(seed))
    else:
        raise ProbeError(f"unknown solver {solver!r}; choose lbfgs or sgd")
    top1 = (predict(w, tx) == test_y).double().mean().item()  # the only use of the test split
    return {"top1": top1, "solver": solver, "chosen": chosen, "scores": scores, "n_train": len(y),
            "solve_s": round(time.perf_counter() - t0, 2)}


# ---------------------------------------------------------------------------------------------
# Encoders: a checkpoint's, its step-0 twin, a bare random one, or none (pixels)
# ---------------------------------------------------------------------------------------------
def random_encoder(model, img, patch, seed):
    """The encoder train.py starts from with this seed: torch.manual_seed(seed), then the student is
    the first module built (train.build_models), so this is the run's student at step 0."""
    torch.manual_seed(seed)
    return vit(model, img_size=img, patch_size=patch)


def load_encoder(args):
    """What to probe, from the command line: returns (encoder or None for pixels, info) where info has
    model, img, patch, data, the run's config (or {}), the cache folder and a cache id. --ckpt takes an
    njepa checkpoint or an official I-JEPA one (.pth.tar: encoder / predictor / target_encoder)."""
    if args.ckpt:
        raw = train.read_checkpoint(args.ckpt)
        out = args.out or os.path.dirname(os.path.abspath(args.ckpt))
        if model_lib.is_ijepa_checkpoint(raw):
            # I-JEPA evaluated its target encoder (I-JEPA paper, App. A.1); "student" = "encoder"
            name = {None: "target_encoder", "student": "encoder", "teacher": "target_encoder"}.get(args.encoder, args.encoder)
            state = model_lib.ijepa_state(raw, name)
            try:
                model, img, patch = model_lib.infer_architecture(state)
            except ValueError as e:
                raise ProbeError(f"{args.ckpt}: {e}") from None
            if args.img and args.img != img:
                raise ProbeError(f"{args.ckpt} was trained at {img} px (its position embeddings fix it); --img {args.img} does not fit")
            if not args.data:
                raise ProbeError("an I-JEPA checkpoint carries no dataset: pass --data (e.g. --data imagenette)")
            print(f"probe: I-JEPA checkpoint {args.ckpt} (epoch {raw.get('epoch', '?')}): {model}, patch {patch}, "
                  f"{img} px, {name}", flush=True)
            cfg = {}
        else:
            if not isinstance(raw, dict) or raw.get("format") != "njepa-1":
                raise ProbeError(f"{args.ckpt} is neither an njepa checkpoint nor an I-JEPA one (encoder / predictor / target_encoder)")
            cfg, name = raw["config"], {None: "student", "encoder": "student", "target_encoder": "teacher"}.get(args.encoder, args.encoder)
            model, img, patch, state = cfg["model"], cfg["img"], cfg["patch"], raw[name]
        encoder = vit(model, img_size=img, patch_size=patch)
        encoder.load_state_dict(state)
        dataset = args.data or cfg["data"]
        # a downloadable dataset is read from the folder the run trained on (recorded by train.py) while it
        # exists, whatever $NJEPA_DATA says now; else it is resolved as usual (cache, or a download)
        root = cfg.get("data_path") if dataset == cfg.get("data") and os.path.isdir(cfg.get("data_path") or "") else None
        # the epoch of this point of the run: snapshots carry it, ckpt.pt has step / iterations per epoch
        epoch = raw.get("epoch", raw["step"] / cfg["ipe"] if cfg.get("ipe") else cfg["epochs"]) if cfg else None
        return encoder, dict(model=model, img=img, patch=patch, config=cfg, data=dataset, root=root, out=out,
                             id=file_hash(args.ckpt), name=name, epoch=epoch, step=raw.get("step"))
    if not args.data or not args.img:
        raise ProbeError("give --ckpt PATH, or --random-init / --pixels with --data and --img")
    if args.pixels:
        return None, dict(model="pixels", img=args.img, patch=None, config={}, data=args.data, out=args.out or "out",
                          id="pixels", name="pixels")
    if args.random_init:
        if not (args.model and args.patch):
            raise ProbeError("--random-init without --ckpt needs --model, --img, --patch and --data")
        return random_encoder(args.model, args.img, args.patch, args.seed), dict(
            model=args.model, img=args.img, patch=args.patch, config={}, data=args.data, out=args.out or "out",
            id=f"random-init-{args.model}-{args.img}-{args.patch}-seed{args.seed}", name="random-init")
    raise ProbeError("give --ckpt PATH (or --random-init, or --pixels)")


def features_for(encoder, info, args, device):
    """Train and test features (cached in OUT/probe_cache) and whether both came from the cache."""
    if args.last_layers < 1 or (encoder is not None and args.last_layers > encoder.depth):
        raise ProbeError(f"--last-layers must be between 1 and the encoder depth, got {args.last_layers}")
    train_set = data.build_dataset(info.get("root") or info["data"], "train", info["img"], args.subset_per_class)
    test_set = data.build_dataset(info.get("root") or info["data"], "test", info["img"])
    if train_set.classes != test_set.classes:
        raise ProbeError(f"train and test splits of {info['data']} have different classes")
    cfg = info["config"]
    if cfg.get("classes") and cfg["classes"] != train_set.classes and not args.transfer:
        raise ProbeError(f"{info['data']} has other classes ({len(train_set.classes)}) than the checkpoint's pretraining "
                         f"data {cfg['data']} ({len(cfg['classes'])}); pass --transfer to probe another dataset on purpose")
    if encoder is not None:
        encoder.to(device)
    out, cached = {}, True
    for split, ds in (("train", train_set), ("test", test_set)):
        key = {"ckpt": info["id"], "encoder": info["name"], "layers": args.last_layers, "split": split,
               "data": os.path.abspath(info["data"]) if os.path.isdir(info["data"]) else info["data"],
               "img": info["img"], "n": len(ds), "subset": args.subset_per_class if split == "train" else None}
        x, y, hit = cached_features(encoder, key, os.path.join(info["out"], "probe_cache"), ds, info["img"],
                                    args.last_layers, device, args.workers)
        out[split], cached = (x, y), cached and hit
    return out, len(train_set.classes), cached


def evaluate(encoder, info, args, device):
    """Features, then the linear classifier: the result dict of one encoder."""
    t0 = time.time()
    feats, n_classes, cached = features_for(encoder, info, args, device)
    (x, y), (tx, ty) = feats["train"], feats["test"]
    res = linear_probe(x, y, tx, ty, n_classes, args.seed, args.label_fraction, args.solver, args.folds,
                       epochs=args.epochs, batch=args.batch, repeats=args.cv_repeats)
    res.update(n_test=len(ty), features_cached=cached, time_s=round(time.time() - t0, 2))
    return res


def train_stats(ckpt_path, step=None):
    """Collapse signal, length and wall time of the run behind a checkpoint up to its `step`, from the
    run's log.jsonl (if present): a snapshot gets the figures of its own point of the run."""
    recs = [r for r in train.read_log(os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), "log.jsonl"))
            if "loss" in r and (step is None or r["step"] <= step)]
    stds = [r["teacher_std"] for r in recs if r.get("teacher_std") is not None]
    if not stds:
        return {}
    return {"steps": recs[-1]["step"], "final_loss": recs[-1]["loss"], "final_teacher_std": stds[-1],
            "min_teacher_std": min(stds), "collapsed": stds[-1] < train.COLLAPSE_STD, "wall_s": recs[-1].get("wall_s")}


def run(args, ckpt=None):
    """Probe one encoder (and, for a checkpoint, its random-init twin); print one line, write JSON."""
    if not 0 < args.label_fraction <= 1:
        raise ProbeError(f"--label-fraction must be in (0, 1], got {args.label_fraction}")
    args = argparse.Namespace(**vars(args))  # a copy: one checkpoint of possibly several
    args.ckpt = ckpt if ckpt is not None else (args.ckpt[0] if isinstance(args.ckpt, list) else args.ckpt)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    encoder, info = load_encoder(args)
    res = evaluate(encoder, info, args, device)
    result = {"top1": res["top1"], **{k: res[k] for k in ("solver", "chosen", "scores", "n_train", "n_test", "solve_s")},
              "ckpt": args.ckpt, "ckpt_hash": info["id"], "encoder": info["name"], "model": info["model"],
              "last_layers": args.last_layers, "label_fraction": args.label_fraction, "data": info["data"],
              "seed": args.seed, "features_cached": res["features_cached"], "config": info["config"],
              "epoch": info.get("epoch"), "step": info.get("step")}
    if args.ckpt and not args.no_baseline:  # the same run's student at step 0, on the same data
        seed = info["config"].get("seed", 0)
        twin = random_encoder(info["model"], info["img"], info["patch"], seed)
        base_info = dict(info, id=f"random-init-{info['model']}-{info['img']}-{info['patch']}-seed{seed}", name="random-init")
        base = evaluate(twin, base_info, args, device)
        result["random_init"] = {"top1": base["top1"], "chosen": base["chosen"], "seed": seed}
        result["gain"] = result["top1"] - base["top1"]
        result["train"] = train_stats(args.ckpt, info.get("step"))
    result["time_s"] = round(sum(r["time_s"] for r in [res] + ([base] if "random_init" in result else [])), 2)
    os.makedirs(info["out"], exist_ok=True)
    stem = os.path.splitext(os.path.basename(args.ckpt))[0] if args.ckpt else "ckpt"
    suffix = stem[len("ckpt"):] if stem.startswith("ckpt") else "-" + stem  # ckpt.pt -> probe.json, ckpt-e10.pt -> probe-e10.json
    with open(os.path.join(info["out"], f"probe{suffix}.json"), "w") as f:  # the latest result of this checkpoint
        json.dump(result, f, indent=1)
    with open(os.path.join(info["out"], "probe.jsonl"), "a") as f:  # every result, one line each
        f.write(json.dumps(result) + "\n")
    setting = (f"{info['name']} | layers {args.last_layers} | labels {100 * args.label_fraction:g}% ({res['n_train']}) | "
               f"test {res['n_test']} | {args.solver} {res['chosen']:g} | {result['time_s']:.1f}s")
    if "random_init" in result:
        print(f"probe | pretrained {100 * result['top1']:.1f} % | random init {100 * result['random_init']['top1']:.1f} % | "
              f"{100 * result['gain']:+.1f} | {setting}")
    else:
        print(f"probe | {info['name']} {100 * result['top1']:.1f} % | {setting}")
    return result


# ---------------------------------------------------------------------------------------------
# Tables: runs grouped by config, mean ± std over pretraining seeds, paired differences to I-JEPA
# ---------------------------------------------------------------------------------------------
# Config entries that do not define an arm: the seed pairs runs, the rest is bookkeeping.
NOT_ARM = {"seed", "out", "device", "compile", "workers", "log_every", "max_steps", "classes", "init_from", "eval_every",
           "knn_bank", "knn_queries", "keep_every", "precision"}  # precision: how, not what (like device, compile)


def mean_std(xs):
    """Mean and sample std (n - 1) of a list; std None for one value (a spread needs two)."""
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None)


# The N-JEPA defaults of the switches an arm may change (train.OPTIONS); a name lists only departures.
ARM_DEFAULTS = {"noise": "multi", "noise_dist": "lognormal", "p_mean": -1.2, "p_std": 1.2, "cn_stopgrad": False, "sigma_max": None,
                "share_predictor": False, "share_mask_token": False}


def arm_name(cfg, common):
    """A short name for a config: the method, plus the options that differ from the other arms and
    from the N-JEPA defaults (e.g. "N-JEPA noise=none"); I-JEPA ignores the noise options."""
    ijepa = cfg.get("lambda1") == 0 and cfg.get("lambda2") == 0
    extra = [f"{k}={cfg[k]}" for k in sorted(cfg) if k not in common and k not in ("lambda1", "lambda2")
             and not (k in ARM_DEFAULTS and (ijepa or cfg[k] == ARM_DEFAULTS[k]))]
    if not ijepa and (cfg.get("lambda1"), cfg.get("lambda2")) != (0.1, 0.1):
        extra.insert(0, f"lambda={cfg.get('lambda1')}/{cfg.get('lambda2')}")
    return " ".join(["I-JEPA" if ijepa else "N-JEPA"] + extra)


def arm_config(cfg):
    """The options that define an arm, with today's defaults filled in for options a run predates and
    the derived width resolved, so that runs of older code group with their peers."""
    if not cfg:
        return {}
    arm = {name: cfg.get(name, small) for name, _, small, _, _ in train.OPTIONS if name not in NOT_ARM}
    return vars(train.fill_derived(SimpleNamespace(**arm)))


NOISE_OPTIONS = ("lambda1", "lambda2", "noise", "noise_dist", "p_mean", "p_std", "cn_stopgrad", "sigma_max")  # what N-JEPA adds to I-JEPA


def is_ijepa(arm):
    return arm.get("lambda1") == 0 and arm.get("lambda2") == 0


def ijepa_twin(arm, arms):
    """The I-JEPA arm among `arms` that differs from `arm` in the noise options only: its paired reference."""
    return next((a for a in arms if is_ijepa(a) and all(a.get(k) == arm.get(k) for k in arm if k not in NOISE_OPTIONS)), None)


def result_epoch(r):
    """The epoch a probe result was taken at: recorded since snapshots exist, else the run's length."""
    e = r.get("epoch", r.get("config", {}).get("epochs"))
    return round(e, 2) if e is not None else None


def table(results):
    """Group probe results by (arm config, probe settings, epoch: snapshots of one run are points of its
    curve, ordered by epoch). Returns (rows, text)."""
    groups = {}
    for r in results:
        arm = arm_config(r.get("config", {}))
        probe_key = (r.get("encoder"), r.get("last_layers"), r.get("label_fraction"), r.get("solver"), result_epoch(r))
        groups.setdefault(json.dumps([arm, probe_key], sort_keys=True), []).append(r)
    arms = [json.loads(k)[0] for k in groups if json.loads(k)[0]]
    common = {k: v for k, v in arms[0].items() if all(a.get(k) == v for a in arms)} if arms else {}
    rows = []
    for key, runs in groups.items():
        arm, probe_key = json.loads(key)
        by_seed = {r["config"].get("seed"): r for r in runs}
        same_probe = {k2: g for k2, g in groups.items() if json.loads(k2)[1] == probe_key}
        twin = ijepa_twin(arm, [json.loads(k2)[0] for k2 in same_probe])
        ref = same_probe[json.dumps([twin, probe_key], sort_keys=True)] if twin is not None else None
        ref_by_seed = {r["config"].get("seed"): r for r in ref} if ref else {}
        diffs = [100 * (by_seed[s]["top1"] - ref_by_seed[s]["top1"]) for s in sorted(by_seed) if s in ref_by_seed]
        gains = [100 * r["gain"] for r in runs if "gain" in r]
        tops = [100 * r["top1"] for r in runs]
        label = arm_name(arm, common) if arm else os.path.basename(str(runs[0].get("ckpt")))  # e.g. an I-JEPA file
        rows.append({"arm": label, "probe": dict(zip(("encoder", "last_layers", "label_fraction", "solver", "epoch"), probe_key)),
                     "seeds": sorted(by_seed), "top1": mean_std(tops),
                     "random_init": mean_std([100 * r["random_init"]["top1"] for r in runs if "random_init" in r]) if gains else None,
                     "gain": mean_std(gains) if gains else None,
                     "vs_ijepa": mean_std(diffs) if diffs and ref is not runs else None, "pairs": len(diffs),
                     "collapsed": sum(bool(r.get("train", {}).get("collapsed")) for r in runs),
                     "teacher_std": mean_std([r["train"]["final_teacher_std"] for r in runs if r.get("train")])
                     if any(r.get("train") for r in runs) else None, "config": arm})
    rows.sort(key=lambda r: (r["probe"]["label_fraction"] != 1.0, r["arm"] != "I-JEPA", r["arm"], r["probe"]["epoch"] or 0))
    fmt = lambda ms, d=2: "" if not ms else f"{ms[0]:.{d}f}" + (f" ± {ms[1]:.{d}f}" if ms[1] is not None else "")
    head = ["arm", "epoch", "labels", "n", "top-1 %", "random init %", "gain over random", "vs I-JEPA (paired)", "collapsed", "teacher_std"]
    pairs = lambda r: f" ({r['pairs']} pair{'s' * (r['pairs'] > 1)})" if r["vs_ijepa"] else ""
    cells = [[r["arm"], f"{r['probe']['epoch']:g}" if r["probe"]["epoch"] is not None else "", f"{100 * r['probe']['label_fraction']:g}%", str(len(r["seeds"])), fmt(r["top1"]), fmt(r["random_init"]),
              fmt(r["gain"]), fmt(r["vs_ijepa"]) + pairs(r), f"{r['collapsed']} of {len(r['seeds'])}", fmt(r["teacher_std"], 3)]
             for r in rows]
    width = [max(len(c[i]) for c in [head] + cells) for i in range(len(head))]
    line = lambda c: "| " + " | ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(c, width))) + " |"
    lines = [line(head), "|" + "|".join("-" * (w + 2) for w in width) + "|"] + [line(c) for c in cells]
    return rows, "\n".join(lines)


def read_results(paths):
    """Probe results from JSON files (probe.json or copies of it); a probe.jsonl gives its last line."""
    results = []
    for p in paths:
        with open(p) as f:
            text = f.read().strip()
        if not text:
            continue
        results.append(json.loads(text.splitlines()[-1]) if p.endswith(".jsonl") else json.loads(text))
    return results


# ---------------------------------------------------------------------------------------------
# Learning curves: kNN (from log.jsonl) and probe (from the snapshots' results) against epochs,
# mean over the pretraining seeds of each arm with a band from the lowest to the highest seed
# ---------------------------------------------------------------------------------------------
def run_points(folder):
    """(config, kNN points [(epoch, student, teacher)], probe points [(epoch, top1, random-init top1)])
    of one run folder (or a committed copy of it): log.jsonl, and probe.jsonl or probe*.json (student,
    last layer, all labels; the latest result per epoch)."""
    recs = train.read_log(os.path.join(folder, "log.jsonl"))
    knn = [(r["epoch"], 100 * r["knn_student"], 100 * r["knn_teacher"]) for r in recs if "knn_student" in r]
    jsonl = os.path.join(folder, "probe.jsonl")
    results = read_results_lines(jsonl) if os.path.exists(jsonl) else read_results(sorted(glob.glob(os.path.join(folder, "probe*.json"))))
    probes = {}
    for r in results:
        if r.get("label_fraction") == 1.0 and r.get("encoder") == "student" and r.get("last_layers") == 1 and "random_init" in r:
            probes[result_epoch(r)] = (result_epoch(r), 100 * r["top1"], 100 * r["random_init"]["top1"])
    config = next((r["config"] for r in results if r.get("config")), None)
    if config is None and os.path.exists(os.path.join(folder, "config.json")):  # a committed copy (results/)
        config = json.load(open(os.path.join(folder, "config.json")))
    if config is None and os.path.exists(os.path.join(folder, "ckpt.pt")):  # a run not probed yet
        config = train.load_checkpoint(os.path.join(folder, "ckpt.pt"))["config"]
    return config or {}, knn, sorted(probes.values())


def read_results_lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def curve_bands(runs, column):
    """{epoch: (mean, low, high, n)} over the runs' points of one column (1 = kNN student / probe)."""
    by_epoch = {}
    for points in runs:
        for pt in points:
            by_epoch.setdefault(round(pt[0], 2), []).append(pt[column])
    return {e: (sum(v) / len(v), min(v), max(v), len(v)) for e, v in sorted(by_epoch.items())}


def group_by_arm(runs):
    """Runs [(config, knn, probes)] grouped by arm config (JSON key, in first-seen order), and the
    options all arms share (left out of the arms' names)."""
    arms = {}
    for run in runs:
        arms.setdefault(json.dumps(arm_config(run[0]), sort_keys=True), []).append(run)
    configs = [json.loads(k) for k in arms]
    common = {k: v for k, v in configs[0].items() if all(c.get(k) == v for c in configs)} if configs else {}
    return arms, common


def knn_curve_table(runs):
    """The numbers behind the kNN panel, as a markdown table: per epoch and arm, the student's online kNN
    top-1 (mean ± std over seeds) and, for an arm with an I-JEPA twin among the runs, its paired difference
    to I-JEPA (the same seed's kNN at the same epoch): does the gap open, close or stay along the curve?
    runs: [run_points(folder), ...]."""
    grouped, common = group_by_arm(runs)
    arms = {key: {cfg.get("seed"): {round(e, 2): s for e, s, _ in knn} for cfg, knn, _ in group}
            for key, group in grouped.items()}  # arm -> {seed: {epoch: kNN student %}}
    configs = [json.loads(k) for k in arms]

    def fmt(xs):
        if not xs:
            return ""
        m, sd = mean_std(xs)
        return f"{m:.1f}" + (f" ± {sd:.1f}" if sd is not None else "") + f" ({len(xs)})"

    head, columns = ["epoch"], []  # columns: (arm seeds, I-JEPA twin seeds or None)
    for cfg, seeds in zip(configs, arms.values()):
        twin = ijepa_twin(cfg, configs) if not is_ijepa(cfg) else None
        head.append(f"{arm_name(cfg, common)} kNN %")
        columns.append((seeds, None))
        if twin is not None:
            head.append(f"{arm_name(cfg, common)} - {arm_name(twin, common)} (paired)")
            columns.append((seeds, arms[json.dumps(twin, sort_keys=True)]))
    epochs = sorted({e for seeds in arms.values() for points in seeds.values() for e in points})
    rows = []
    for e in epochs:
        cells = [f"{e:g}"]
        for seeds, ref in columns:
            if ref is None:
                cells.append(fmt([pts[e] for pts in seeds.values() if e in pts]))
            else:
                cells.append(fmt([pts[e] - ref[s][e] for s, pts in seeds.items() if e in pts and e in ref.get(s, {})]))
        rows.append(cells)
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(c) + " |" for c in rows])


def draw_learning_curves(runs, path):
    """A PNG (pillow): left the online kNN top-1 of the student (thick) and teacher (thin), right the
    linear-probe top-1 of the snapshots, against epochs; one colour per arm, the mean over its seeds
    with a shaded band from the lowest to the highest seed; grey: the random-init level (kNN at step 0,
    the probe's random-init twin), averaged over all runs. runs: [run_points(folder), ...]."""
    from PIL import Image, ImageDraw
    arms, common = group_by_arm(runs)
    W, H, pad, legend = 460, 300, 44, 18 * len(arms) + 8
    sheet = Image.new("RGB", (2 * W, H + legend), "white")
    # source: which list of a run (config, knn, probes) a panel draws
    panels = [("online kNN top-1 % (thick: student, thin: teacher)", [(1, 3), (2, 1)], 1), ("linear probe top-1 %", [(1, 3)], 2)]
    for p, (title, columns, source) in enumerate(panels):
        series = [(j, col, width, curve_bands([r[source] for r in group], col))
                  for j, group in enumerate(arms.values()) for col, width in columns]
        base = [r[1][0][1] for r in runs if source == 1 and r[1] and r[1][0][0] == 0] or \
               [pt[2] for r in runs if source == 2 for pt in r[2]]
        values = [v for *_, bands in series for m, lo, hi, n in bands.values() for v in (lo, hi)] + base
        epochs = [e for *_, bands in series for e in bands]
        if len(epochs) < 1 or not values:
            continue
        x0, lo, hi, last = p * W, min(values) - 1, max(values) + 1, max(epochs) or 1
        sx = lambda e: x0 + pad + e / last * (W - pad - 12)
        sy = lambda v: H - 24 - (v - lo) / (hi - lo) * (H - 54)
        overlay = Image.new("RGBA", sheet.size, (0, 0, 0, 0))
        od = ImageDraw.Draw(overlay)
        for j, col, width, bands in series:  # bands first, lines on top
            pts = list(bands.items())
            if width > 1 and len(pts) > 1 and any(n > 1 for _, (_, _, _, n) in pts):
                poly = [(sx(e), sy(b[2])) for e, b in pts] + [(sx(e), sy(b[1])) for e, b in reversed(pts)]
                od.polygon(poly, fill=train.CURVE_COLOURS[j % len(train.CURVE_COLOURS)] + (60,))
        sheet.paste(Image.alpha_composite(sheet.convert("RGBA"), overlay).convert("RGB"))
        d = ImageDraw.Draw(sheet)
        d.rectangle([x0 + pad, 30, x0 + W - 12, H - 24], outline=(160, 160, 160))
        d.text((x0 + pad, 10), title, fill="black")
        if base:
            y = sy(sum(base) / len(base))
            for x in range(int(x0 + pad), int(x0 + W - 12), 8):  # dashed: the random-init level
                d.line([(x, y), (x + 4, y)], fill=(120, 120, 120), width=1)
            d.text((x0 + W - 80, y - 13), f"random {sum(base) / len(base):.1f}", fill=(110, 110, 110))
        for j, col, width, bands in series:
            colour = train.CURVE_COLOURS[j % len(train.CURVE_COLOURS)]
            pts = [(sx(e), sy(b[0])) for e, b in bands.items()]
            if len(pts) > 1:
                d.line(pts, fill=colour, width=width)
            for x, y in pts:
                d.ellipse([x - width, y - width, x + width, y + width], fill=colour)
        d.text((x0 + 2, 30), f"{hi:.0f}", fill=(90, 90, 90))
        d.text((x0 + 2, H - 36), f"{lo:.0f}", fill=(90, 90, 90))
        d.text((x0 + W - 70, H - 18), f"epoch {last:g}", fill=(90, 90, 90))
    d = ImageDraw.Draw(sheet)
    for j, (key, group) in enumerate(arms.items()):
        d.text((10, H + 4 + 18 * j), f"-- {arm_name(json.loads(key), common)}  ({len(group)} seed{'s' * (len(group) > 1)})",
               fill=train.CURVE_COLOURS[j % len(train.CURVE_COLOURS)])
    sheet.save(path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Linear probe of a pretrained N-JEPA encoder",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--ckpt", nargs="+", help="checkpoint(s) from train.py; several (e.g. runs/*/ckpt.pt) are probed one by one")
    a("--data", help="dataset (default: the one the checkpoint was pretrained on); needs a test/ or val/ split")
    a("--solver", choices=["lbfgs", "sgd"], default="lbfgs", help="lbfgs: converged logistic regression; sgd: the paper's protocol")
    a("--folds", type=int, default=5, help="lbfgs: stratified folds that choose the L2 strength")
    a("--cv-repeats", type=int, default=3, help="lbfgs: fold splits averaged (3 made the choice stable)")
    a("--epochs", type=int, default=50, help="sgd only")
    a("--batch", type=int, default=1024, help="sgd only")
    a("--label-fraction", type=float, default=1.0, help="fraction of training labels, per class (0.01, 0.1, 1.0)")
    a("--last-layers", type=int, default=1, help="concatenate mean-pooled outputs of the last k blocks")
    a("--encoder", choices=["student", "teacher", "encoder", "target_encoder"],
      help="njepa: student (default, the paper's Sec. 4.5) or teacher; I-JEPA checkpoints: target_encoder "
           "(default, what I-JEPA evaluated) or encoder")
    a("--seed", type=int, default=0, help="probe seed: the fold split and label subset (and --random-init's encoder)")
    a("--no-baseline", action="store_true", help="with --ckpt: skip the random-init comparison")
    a("--random-init", action="store_true", help="probe a randomly initialised encoder (no pretraining baseline)")
    a("--pixels", action="store_true", help="probe the raw pixels of the evaluation crop (needs --img, --data)")
    a("--model", help="with --random-init and no --ckpt")
    a("--img", type=int, help="with --random-init / --pixels")
    a("--patch", type=int, help="with --random-init and no --ckpt")
    a("--subset-per-class", type=int, help="use only the first N training images of each class")
    a("--transfer", action="store_true", help="allow --data with other classes than pretraining")
    a("--out", help="where probe.json and the feature cache go (default: the checkpoint's folder)")
    a("--table", nargs="*", help="print mean ± std by config: of the --ckpt runs, or of the given probe JSON files")
    a("--table-json", help="with --table: also write the table's rows to this JSON file")
    a("--curves", nargs="+", metavar="RUN_DIR", help="draw kNN and probe against epochs of these runs (mean and band per arm) and print "
                                                              "the kNN numbers (mean ± std, paired difference to I-JEPA) ...")
    a("--curves-out", default="learning-curve.png", help="... into this PNG")
    a("--device", default="auto")
    a("--workers", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    try:
        args = parse_args(argv)
        if args.curves:  # python probe.py --curves runs/in-*-s? --curves-out docs/learning-curve.png
            runs = [run_points(f) for f in args.curves]  # read once: the picture and its numbers
            draw_learning_curves(runs, args.curves_out)
            print(f"wrote {args.curves_out}: {len(runs)} runs; the kNN panel's numbers (mean ± std (seeds)):")
            print(knn_curve_table(runs))
            return 0
        if args.ckpt and len(args.ckpt) > 1 and args.out:
            raise ProbeError("--out with several --ckpt would mix their results; leave it out")
        results = [run(args, c) for c in args.ckpt] if args.ckpt else ([] if args.table is not None else [run(args)])
        if args.table is not None:
            results += read_results([p for pat in args.table for p in sorted(glob.glob(pat)) or [pat]])
            if not results:
                raise ProbeError("--table found no results")
            rows, text = table(results)
            print(text)
            if args.table_json:
                with open(args.table_json, "w") as f:
                    json.dump(rows, f, indent=1)
        return 0
    except (ProbeError, data.DataError, train.ConfigError, FileNotFoundError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
