"""
probe.py -- linear-probe evaluation of a pretrained encoder (paper Sec. 4.5, Sec. 5, Table 6b).

  python probe.py --ckpt out/ckpt.pt                         # student encoder, all labels
  python probe.py --ckpt out/ckpt.pt --label-fraction 0.01   # low-shot (Table 6b), stratified per class
  python probe.py --ckpt out/ckpt.pt --last-layers 4         # concat of the last 4 blocks (Table 6b)
  python probe.py --random-init --model vit_tiny --img 32 --patch 4 --data shapes   # no-pretraining baseline

Protocol:
  * frozen encoder, the student by default (Sec. 4.5: "we employ the student encoder"), `--encoder
    teacher` to switch; representation = mean over patch tokens of the final-normed output (Sec. 4.5
    "averaging its output"); with --last-layers k, the same for each of the last k blocks, concatenated.
  * features are extracted once, with the deterministic evaluation crop, and cached next to the
    checkpoint (key: checkpoint hash, encoder, layers, data, split, image size).
  * a linear classifier on standardised features, SGD with momentum 0.9, batch 1024, 50 epochs,
    cosine learning rate (DINO protocol, as the paper). The learning rate is chosen on a held-out 10 %
    of the (possibly reduced) training labels, then the classifier is retrained on all of them.
  * top-1 on the test/val split; a fixed-width result line, OUT/probe.json (latest) and OUT/probe.jsonl (all).
"""
import argparse
import hashlib
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import train
from model import vit

LR_GRID = (0.01, 0.03, 0.1, 0.3, 1.0)  # base lr for batch 256, scaled by batch/256 (DINO linear eval)


class ProbeError(ValueError):
    pass


def file_hash(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


@torch.no_grad()
def extract_features(encoder, dataset, img_size, last_layers, device, batch=256, workers=0):
    """[n, last_layers * D] features (mean-pooled final-normed patch tokens) and [n] labels."""
    encoder.eval()
    loader = torch.utils.data.DataLoader(data.Augmented(dataset, img_size, train=False), batch_size=batch,
                                         num_workers=workers, collate_fn=data.collate)
    feats, labels, bad = [], [], []
    autocast = train.autocast_for(device)
    for images, y, skipped in tqdm(loader, desc="features", unit="batch", leave=False):
        with autocast:
            outs = encoder(data.normalize(images.to(device)), return_layers=last_layers)
        outs = outs if isinstance(outs, list) else [outs]
        feats.append(torch.cat([o.float().mean(1) for o in outs], dim=1).cpu())  # [B, k*D]
        labels.append(y)
        bad += skipped
    if bad:
        print(f"warning: skipped {len(bad)} unreadable image(s), e.g. {', '.join(sorted(set(bad))[:3])}", file=sys.stderr)
    return torch.cat(feats), torch.cat(labels)


def stratified_subset(labels, fraction, generator):
    """Indices of a per-class fraction of the samples (at least one per class), chosen at random."""
    picked = []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().squeeze(1)
        k = max(1, int(round(fraction * len(idx))))
        picked.append(idx[torch.randperm(len(idx), generator=generator)[:k]])
    return torch.cat(picked).sort().values


def train_linear(x, y, n_classes, lr, epochs, batch, generator):
    """Linear classifier on features x [n, F] with SGD + momentum 0.9, cosine lr (DINO protocol)."""
    head = torch.nn.Linear(x.size(1), n_classes)
    torch.nn.init.normal_(head.weight, std=0.01, generator=generator)
    torch.nn.init.zeros_(head.bias)
    lr = lr * batch / 256
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    steps_per_epoch = max(1, -(-len(x) // batch))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for k in range(0, len(x), batch):
            idx = order[k:k + batch]
            loss = F.cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return head


@torch.no_grad()
def accuracy(head, x, y):
    return (head(x).argmax(1) == y).float().mean().item()


def linear_probe(train_x, train_y, test_x, test_y, n_classes, epochs=50, batch=1024, seed=0,
                 label_fraction=1.0, lr_grid=LR_GRID):
    """Returns dict(top1, lr, n_train, held_out_acc). Features are standardised with train statistics."""
    g = torch.Generator().manual_seed(seed)
    keep = stratified_subset(train_y, label_fraction, g) if label_fraction < 1.0 else torch.arange(len(train_y))
    x, y = train_x[keep], train_y[keep]
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x, tx = (x - mean) / std, (test_x - mean) / std
    # held-out 10 % of the training labels (stratified, >= 1 per class when a class has >= 2) for the lr
    hold = stratified_subset(y, 0.1, g)
    hold = hold[torch.isin(y[hold], y.bincount(minlength=n_classes).ge(2).nonzero().squeeze(1))]
    fit = torch.ones(len(y), dtype=torch.bool)
    fit[hold] = False
    scores = {}
    for lr in lr_grid if len(lr_grid) > 1 and len(hold) > 0 else lr_grid[:1]:
        head = train_linear(x[fit], y[fit], n_classes, lr, epochs, batch, torch.Generator().manual_seed(seed))
        scores[lr] = accuracy(head, x[hold], y[hold]) if len(hold) else 0.0
    best_lr = max(scores, key=lambda k: (scores[k], -k))  # ties: the smaller lr
    head = train_linear(x, y, n_classes, best_lr, epochs, batch, torch.Generator().manual_seed(seed))
    return {"top1": accuracy(head, tx, test_y), "lr": best_lr, "n_train": len(y),
            "held_out_acc": scores[best_lr], "lr_scores": {str(k): v for k, v in scores.items()}}


def cached_features(encoder, key, cache_dir, dataset, img, last_layers, device, workers):
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, f"features-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}.pt")
    if os.path.exists(path):
        blob = torch.load(path, weights_only=True)
        return blob["x"], blob["y"], True
    x, y = extract_features(encoder, dataset, img, last_layers, device, workers=workers)
    tmp = path + ".tmp"
    torch.save({"x": x, "y": y, "key": json.dumps(key)}, tmp)
    os.replace(tmp, path)
    return x, y, False


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Linear probe of a pretrained N-JEPA encoder",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--ckpt", help="checkpoint from train.py")
    a("--data", help="dataset (default: the one the checkpoint was pretrained on); needs a test/ or val/ split")
    a("--epochs", type=int, default=50)
    a("--batch", type=int, default=1024)
    a("--label-fraction", type=float, default=1.0, help="fraction of training labels, per class (0.01, 0.1, 1.0)")
    a("--last-layers", type=int, default=1, help="concatenate mean-pooled outputs of the last k blocks")
    a("--encoder", choices=["student", "teacher"], default="student")
    a("--seed", type=int, default=0)
    a("--random-init", action="store_true", help="probe a randomly initialised encoder (no pretraining baseline)")
    a("--model", help="with --random-init and no --ckpt")
    a("--img", type=int, help="with --random-init and no --ckpt")
    a("--patch", type=int, help="with --random-init and no --ckpt")
    a("--subset-per-class", type=int, help="use only the first N training images of each class")
    a("--transfer", action="store_true", help="allow --data with other classes than pretraining")
    a("--out", help="where probe.json and the feature cache go (default: the checkpoint's folder)")
    a("--device", default="auto")
    a("--workers", type=int, default=0)
    return p.parse_args(argv)


def run(args):
    t0 = time.time()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if not 0 < args.label_fraction <= 1:
        raise ProbeError(f"--label-fraction must be in (0, 1], got {args.label_fraction}")
    if args.ckpt:
        ckpt = train.load_checkpoint(args.ckpt)
        cfg = ckpt["config"]
        model, img, patch = cfg["model"], cfg["img"], cfg["patch"]
        ckpt_hash = file_hash(args.ckpt)
        out = args.out or os.path.dirname(os.path.abspath(args.ckpt))
        data_name = args.data or cfg["data"]
    elif args.random_init:
        if not (args.model and args.img and args.patch and args.data):
            raise ProbeError("--random-init without --ckpt needs --model, --img, --patch and --data")
        ckpt, cfg, model, img, patch, ckpt_hash = None, {}, args.model, args.img, args.patch, "random-init"
        out, data_name = args.out or "out", args.data
    else:
        raise ProbeError("give --ckpt PATH (or --random-init)")
    if args.last_layers < 1:
        raise ProbeError("--last-layers must be >= 1")
    train_set = data.build_dataset(data_name, "train", img, args.subset_per_class)
    test_set = data.build_dataset(data_name, "test", img)
    if train_set.classes != test_set.classes:
        raise ProbeError(f"train and test splits of {data_name} have different classes")
    if cfg.get("classes") and cfg["classes"] != train_set.classes and not args.transfer:
        raise ProbeError(f"{data_name} has other classes ({len(train_set.classes)}) than the checkpoint's pretraining "
                         f"data {cfg['data']} ({len(cfg['classes'])}); pass --transfer to probe another dataset on purpose")
    torch.manual_seed(args.seed)  # the random-init baseline depends on the seed
    encoder = vit(model, img_size=img, patch_size=patch)
    if args.last_layers > encoder.depth:
        raise ProbeError(f"--last-layers {args.last_layers} exceeds the encoder depth {encoder.depth}")
    if args.random_init:
        ckpt_hash = f"random-init-seed{args.seed}"
    else:
        encoder.load_state_dict(ckpt[args.encoder])
    encoder.to(device)
    feats = {}
    for split, ds in (("train", train_set), ("test", test_set)):
        key = {"ckpt": ckpt_hash, "encoder": args.encoder, "layers": args.last_layers, "data": os.path.abspath(data_name)
               if os.path.isdir(data_name) else data_name, "split": split, "img": img, "n": len(ds),
               "subset": args.subset_per_class if split == "train" else None}
        feats[split] = cached_features(encoder, key, os.path.join(out, "probe_cache"), ds, img, args.last_layers,
                                       device, args.workers)
    (train_x, train_y, hit_a), (test_x, test_y, hit_b) = feats["train"], feats["test"]
    res = linear_probe(train_x, train_y, test_x, test_y, len(train_set.classes), args.epochs, args.batch,
                       args.seed, args.label_fraction)
    result = {"top1": res["top1"], "lr": res["lr"], "held_out_acc": res["held_out_acc"], "lr_scores": res["lr_scores"],
              "n_train": res["n_train"], "n_test": len(test_y), "ckpt": args.ckpt, "ckpt_hash": ckpt_hash,
              "encoder": "random-init" if args.random_init else args.encoder, "last_layers": args.last_layers,
              "label_fraction": args.label_fraction, "data": data_name, "epochs": args.epochs, "batch": args.batch,
              "seed": args.seed, "features_cached": hit_a and hit_b, "time_s": round(time.time() - t0, 2)}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "probe.json"), "w") as f:  # the latest result
        json.dump(result, f, indent=1)
    with open(os.path.join(out, "probe.jsonl"), "a") as f:  # every result, one line each
        f.write(json.dumps(result) + "\n")
    print(f"probe | top1 {100 * result['top1']:6.2f}% | {result['encoder']:>11} | layers {args.last_layers} | "
          f"labels {100 * args.label_fraction:5.1f}% ({res['n_train']:>6}) | test {len(test_y):>6} | "
          f"lr {res['lr']:<5g} | {ckpt_hash} | {result['time_s']:.1f}s")
    return result


def main(argv=None):
    try:
        run(parse_args(argv))
        return 0
    except (ProbeError, data.DataError, train.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
