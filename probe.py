"""
probe.py -- linear-probe evaluation of a pretrained encoder (paper Sec. 4.5, Sec. 5, Table 6b).

  python probe.py --ckpt out/ckpt.pt                         # pretrained vs random init, one line
  python probe.py --ckpt out/ckpt.pt --label-fraction 0.1    # low-shot (Table 6b), stratified per class
  python probe.py --ckpt out/ckpt.pt --last-layers 4         # concat of the last 4 blocks (Table 6b)
  python probe.py --ckpt runs/*/ckpt.pt                      # many runs, one by one (tables: tools/report.py)
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
  * results: a fixed-width line, OUT/probe.json (latest) and OUT/probe.jsonl (all); tables and curves
    across runs are tools/report.py's.

Also the evaluation that runs during training (train.py imports it): the online weighted kNN of the
student and the teacher (`OnlineKnn`, `knn_top1`, the eval-cost rule) and the collapse signal
(`feature_std`, `COLLAPSE_STD`).
"""
import argparse
import hashlib
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import data
import model as model_lib
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
    autocast = model_lib.autocast_for(device)
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
        raw = model_lib.read_checkpoint(args.ckpt)
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
    recs = [r for r in read_log(os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), "log.jsonl"))
            if "loss" in r and (step is None or r["step"] <= step)]
    stds = [r["teacher_std"] for r in recs if r.get("teacher_std") is not None]
    if not stds:
        return {}
    return {"steps": recs[-1]["step"], "final_loss": recs[-1]["loss"], "final_teacher_std": stds[-1],
            "min_teacher_std": min(stds), "collapsed": stds[-1] < COLLAPSE_STD, "wall_s": recs[-1].get("wall_s")}


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
# During training: the online kNN curve (SPEC 2, "quality curve") and the collapse signal. train.py
# imports these; they read the encoders and never change the run.
# ---------------------------------------------------------------------------------------------
KNN_K, KNN_T = 20, 0.07  # online kNN: DINO's eval_knn (k = 20, temperature 0.07)
# Cost of one eval image (the student's and the teacher's forward pass) in training images: a forward
# ran at 565 img/s where a training step ran at 217 img/s (vit_tiny, 64 tokens, bf16, 2 cores), 2 x 0.38.
KNN_COST = 0.77
# Collapse alarm: teacher_std (see feature_std) starts near 0.4-0.5 and stays there in a healthy run;
# a collapsed run falls towards 0. Measured: N-JEPA, vit_tiny, CIFAR-10 subset, lr 1e-3: 0.43 -> 0.04.
COLLAPSE_STD = 0.1


def feature_std(h):
    """The collapse signal: std over tokens of each feature of h [..., D], averaged over features.
    0 when every token has the same features (a collapsed teacher); about 0.4-0.8 in a healthy run."""
    return h.float().flatten(0, -2).std(0).mean()


def default_eval_every(epochs, n_train, n_eval, master=True):
    """The smallest E whose evals (half a one at step 0, where the teacher is the student, then one every
    E epochs and one at the end) cost <= 10 % of the training, in training images: (0.5 + ceil(epochs / E))
    * KNN_COST * n_eval <= 0.1 * epochs * n_train. A run too short for even E = epochs keeps its start
    and end points and is told what they cost."""
    cost = lambda e: (0.5 + math.ceil(epochs / e)) * KNN_COST * n_eval
    for e in range(1, epochs + 1):
        if cost(e) <= 0.1 * epochs * n_train:
            return e
    if master:
        print(f"notice: the online kNN at the start and end of this short run costs about {100 * cost(epochs) / (epochs * n_train):.0f} % "
              f"of its training time (--eval-every 0 turns it off; --knn-bank / --knn-queries shrink it)", flush=True)
    return epochs


@torch.no_grad()
def knn_top1(bank_x, bank_y, query_x, query_y, n_classes, k=20, temperature=0.07, chunk=1024):
    """Weighted k-nearest-neighbour top-1 (DINO's `eval_knn`, Caron et al. 2021, Sec. 4.1 / their
    knn_classifier): features L2-normalised, the k most cosine-similar bank samples vote for their
    class with weight exp(similarity / T). Used by the online curve (--eval-every); deterministic
    (ties of topk are broken by index, no sampling). bank_x [n, D], query_x [m, D]; returns a float."""
    bank = F.normalize(bank_x.float(), dim=1)  # [n, D]
    k = min(k, len(bank))
    correct = 0
    for i in range(0, len(query_x), chunk):
        q = F.normalize(query_x[i:i + chunk].float(), dim=1)  # [c, D]
        sim, idx = (q @ bank.T).topk(k, dim=1)  # [c, k] cosine similarities and bank indices
        votes = torch.zeros(len(q), n_classes, device=q.device)
        votes.scatter_add_(1, bank_y[idx], (sim / temperature).exp())  # [c, C] weighted votes
        correct += (votes.argmax(1) == query_y[i:i + chunk]).sum().item()
    return correct / len(query_x)


class OnlineKnn:
    """A fixed labelled bank (a stratified pick of the train split) and fixed queries (of the val/test
    split), evaluation crops decoded once; at each eval, mean-pooled final-normed features of the
    student and the teacher (eval mode, no_grad, the training precision) and DINO's weighted kNN top-1.
    It never changes the run: the picks use their own generator, no training generator is drawn from,
    and every module gets back the train/eval mode it had. Under DDP each rank encodes its shard
    (every world-th sample) and rank 0 scores the gathered features."""

    def __init__(self, cfg, train_set, rank, world, device, master):
        self.cfg, self.rank, self.world, self.device, self.sets = cfg, rank, world, device, None
        try:
            test_set = data.build_dataset(cfg.data, "test", cfg.img)
        except data.DataError as e:
            if master:
                print(f"notice: no online kNN ({e})", flush=True)
            return
        self.sets = []
        for ds, cap in ((train_set, cfg.knn_bank), (test_set, cfg.knn_queries)):
            picked = data.stratified_pick(ds.labels, cap, seed=0)  # the same picks in every run, whatever its seed
            images, labels, bad = data.eval_images(ds, picked[rank::world], cfg.img)  # this rank's shard
            if bad and master:
                print(f"warning: online kNN skipped {len(bad)} unreadable image(s), e.g. {', '.join(bad[:3])}", file=sys.stderr)
            self.sets.append((images, labels, len(picked)))
        self.n_classes = len(train_set.classes)
        if cfg.eval_every is None:  # default: the most often that keeps the evals at <= 10 % of the training time
            cfg.eval_every = default_eval_every(cfg.epochs, len(train_set), sum(n for *_, n in self.sets), master)

    def due(self, step, ipe):
        """At the end of every eval_every-th epoch and of the whole run."""
        return self.sets is not None and step % ipe == 0 and (step // ipe % self.cfg.eval_every == 0 or step == self.cfg.epochs * ipe)

    @torch.no_grad()
    def features(self, encoder, images, autocast, batch=256):
        """[n, D] mean over patch tokens of the final-normed output, as probe.py and Sec. 4.5."""
        out = []
        for i in range(0, len(images), batch):
            x = data.normalize(images[i:i + batch].to(self.device))
            with autocast:
                out.append(encoder(x).float().mean(1))  # [b, D]
        return torch.cat(out) if out else torch.zeros(0, encoder.embed_dim, device=self.device)

    def gather(self, x, n):
        """The full [n, ...] tensor from every rank's shard (rank r holds samples r, r + world, ...)."""
        if self.world == 1:
            return x
        per = -(-n // self.world)
        padded = torch.zeros(per, *x.shape[1:], dtype=x.dtype, device=x.device)
        padded[:len(x)] = x
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return torch.stack(parts, 1).flatten(0, 1)[:n]  # interleave back: sample i came from rank i % world

    def evaluate(self, m, autocast):
        """{"knn_student", "knn_teacher", "knn_bank", "knn_queries", "knn_s"} (scores on rank 0 only)."""
        if self.sets is None:
            return None
        t0 = time.perf_counter()
        res = {}
        same = all(torch.equal(a, b) for a, b in zip(m.student.state_dict().values(), m.teacher.state_dict().values()))
        for name, encoder in (("student", m.student), ("teacher", m.teacher)):
            if name == "teacher" and same:  # step 0: the teacher is the student's copy (Alg. 1 line 4), one pass does
                res["knn_teacher"] = res.get("knn_student")
                break
            was_training = encoder.training
            encoder.eval()
            try:
                (bx, by, nb), (qx, qy, nq) = [(self.gather(self.features(encoder, images, autocast), n),
                                               self.gather(labels.to(self.device), n), n) for images, labels, n in self.sets]
            finally:
                encoder.train(was_training)
            if self.rank == 0:
                res[f"knn_{name}"] = knn_top1(bx, by, qx, qy, self.n_classes, KNN_K, KNN_T)
        res.update(knn_bank=nb, knn_queries=nq, knn_s=round(time.perf_counter() - t0, 2))
        return res


def read_log(path):
    """The records of a JSON-lines file (a run's log.jsonl, its probe.jsonl); [] when there is none."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


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
    a("--device", default="auto")
    a("--workers", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    try:
        args = parse_args(argv)
        if args.ckpt and len(args.ckpt) > 1 and args.out:
            raise ProbeError("--out with several --ckpt would mix their results; leave it out")
        for ckpt in args.ckpt or [None]:
            run(args, ckpt)
        return 0
    except (ProbeError, data.DataError, model_lib.CheckpointError, FileNotFoundError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
