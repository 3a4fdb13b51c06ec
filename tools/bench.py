"""
tools/bench.py -- speed, measured: full training steps on synthetic images (img/s, step time, GFLOP/s,
MFU, peak memory, the projected wall time of the configured run), or the data pipeline alone. A
benchmark, never a test. It takes train.py's options and runs train.py's own step.

  python tools/bench.py                                             # the built-in default (vit_tiny, 32 px)
  python tools/bench.py --model vit_tiny --img 64 --patch 8 --batch 64 --lambda1 0 --lambda2 0   # I-JEPA
  python tools/bench.py --model vit_base --img 224 --patch 16 --batch 128 --compile --device cuda  # the paper's
  python tools/bench.py --data-only --data imagenette --img 64                                   # decode + crop: img/s

One result line like nanoGPT's MFU report, a projection line, then the result as JSON.
"""
import argparse
import json
import os
import sys
import time

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import data  # noqa: E402
import model  # noqa: E402
import train  # noqa: E402


# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, by substring of the device name.
GPU_PEAK_BF16 = {"H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12,
                 "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
                 "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12}
IMAGENET_TRAIN = 1_281_167  # ImageNet-1K training images, for the projected wall time


def measure_cpu_peak(n=2048, seconds=1.0, dtype=torch.float32):
    """The matmul rate of this process on this CPU (FLOP/s) in `dtype`: the best of repeated n x n matmuls."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t))
    return best


def device_peak(device, precision="fp32"):
    """(peak FLOP/s, how it was found) for MFU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_BF16.items():
            if key in name:
                return peak, f"{name} bf16 data sheet"
        return None, f"{name}: unknown peak"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return measure_cpu_peak(dtype=dtype), f"{precision} matmul measured in this process"


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux -> GB (process peak RSS)


def bench(cfg, steps=10, warmup=3):
    """python tools/bench.py [--model --img --patch --batch ...]: warm-up plus timed full steps (masks,
    noise, teacher, student, predictors, losses, backward, AdamW, EMA) on synthetic images; one line
    like nanoGPT's MFU report and the projected wall time of the configured run. Not a test."""
    device, _, _ = train.setup_distributed(cfg)
    cfg.precision = model.resolve_precision(cfg.precision, device)
    torch.manual_seed(cfg.seed)
    m = train.build_on_device(cfg, device)
    student, teacher, pred_c, pred_n = train.wrap_for_training(m, cfg, device, 1)
    autocast = model.autocast_for(device, cfg.precision)
    collate = data.MaskCollator(cfg.img // cfg.patch, cfg.seed, context_keep=cfg.context_keep)
    images_u8 = torch.randint(0, 256, (cfg.batch, 3, cfg.img, cfg.img), dtype=torch.uint8)
    images_u8 = images_u8.pin_memory() if device.type == "cuda" else images_u8
    all_masks = [collate.masks(step, cfg.batch) for step in range(warmup + steps)]  # the loader's workers draw these
    peak, peak_src = device_peak(device, cfg.precision)
    times, flops, n_ctx, n_tgt = [], [], [], []
    for step in tqdm(range(warmup + steps), desc="bench", unit="step", leave=False):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        context, targets = all_masks[step]
        images = data.normalize(images_u8.to(device, non_blocking=True))
        context, targets = context.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        noise, _ = train.step_noise(cfg, step, 0, 1, targets, device)
        with autocast:
            loss, _, _ = train.forward_losses(cfg, images, context, targets, noise, student, teacher, pred_c, pred_n)
        m.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        m.optimizer.step()
        train.ema_update(m.teacher, m.student, 0.996)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
            flops.append(train.step_flops(cfg, cfg.batch, context.size(1), targets.size(2)))
            n_ctx.append(context.size(1))
            n_tgt.append(targets.size(2))
    t_med = sorted(times)[len(times) // 2]
    achieved = sum(flops) / sum(times)
    mode = "N-JEPA" if cfg.use_n else "I-JEPA"
    n_images = count_images(cfg)
    imagenet_h = 100 * (IMAGENET_TRAIN // cfg.batch) * t_med / 3600
    res = {"model": cfg.model, "img": cfg.img, "patch": cfg.patch, "batch": cfg.batch, "mode": mode, "precision": cfg.precision,
           "compile": bool(cfg.compile), "device": str(device), "device_name": torch.cuda.get_device_name(device)
           if device.type == "cuda" else "cpu", "step_s": t_med, "img_s": cfg.batch / t_med,
           "gflop_s": achieved / 1e9, "gflop_per_step": sum(flops) / len(flops) / 1e9,
           "mfu": achieved / peak if peak else None, "peak_gflop_s": peak / 1e9 if peak else None, "peak_source": peak_src,
           "peak_mem_gb": peak_memory_gb(device), "n_ctx": sum(n_ctx) / len(n_ctx), "n_tgt": sum(n_tgt) / len(n_tgt),
           "threads": torch.get_num_threads(), "epochs": cfg.epochs, "dataset_images": n_images[0],
           "projected_hours": cfg.epochs * (n_images[0] // cfg.batch) * t_med / 3600, "imagenet_100ep_hours": imagenet_h}
    mfu = f"MFU {100 * res['mfu']:.1f}% of {res['peak_gflop_s']:.0f} GFLOP/s ({peak_src})" if peak else f"MFU n/a ({peak_src})"
    print(f"bench | {cfg.model} {cfg.img}px/{cfg.patch} batch {cfg.batch} | {mode}{' compiled' if cfg.compile else ''} | {cfg.precision} | "
          f"step {1000 * t_med:.0f} ms (median of {steps}) | {res['img_s']:.1f} img/s | {res['gflop_s']:.1f} GFLOP/s | "
          f"{mfu} | peak mem {res['peak_mem_gb']:.2f} GB | ctx {res['n_ctx']:.0f} + {all_masks[0][1].size(1)}x{res['n_tgt']:.0f} tgt patches")
    print(f"bench | projected: {cfg.epochs} epochs x {n_images[0] // cfg.batch} steps ({n_images[0]:,} images, {n_images[1]}) "
          f"x {t_med:.3f} s = {res['projected_hours']:.2f} h; ImageNet-1K, 100 epochs x {IMAGENET_TRAIN // cfg.batch} steps: "
          f"{imagenet_h:.1f} h on this device, one process (data loading not included)")
    print(json.dumps(res))
    return res


def count_images(cfg):
    """(training images, where the number comes from) of the configured data, for the projected time."""
    return len(data.build_dataset(cfg.data, "train", None, cfg.subset_per_class)), cfg.data


def bench_data(cfg, batches=30):
    """Images/s of the DataLoader alone (decode, random crop, masks, collate) with cfg.workers workers,
    to compare with the training images/s: if it is lower, the accelerator waits for data."""
    dataset = data.build_dataset(cfg.data, "train", cfg.img, cfg.subset_per_class)
    loader = data.training_loader(dataset, cfg.img, cfg.img // cfg.patch, cfg.seed, cfg.batch, 0, workers=cfg.workers)
    batches = min(batches, len(loader.batch_sampler))
    it = iter(loader)
    next(it)  # start-up (worker processes) is not counted
    t0, n = time.perf_counter(), 0
    for _ in tqdm(range(batches - 1), desc="data", leave=False):
        n += next(it)[0].size(0)
    rate = n / (time.perf_counter() - t0)
    print(f"bench-data | {dataset.root} | {cfg.img}px | {loader.num_workers} workers | {rate:.0f} img/s "
          f"(decode + crop + masks + collate)")
    return rate


def main(argv=None):
    """Its own two flags; everything else is train.py's (python train.py --help lists them)."""
    p = argparse.ArgumentParser(description="Benchmark N-JEPA training steps (or the data pipeline); every other flag is "
                                            "train.py's: " + " ".join("--" + o[0].replace("_", "-") for o in train.OPTIONS))
    p.add_argument("--steps", type=int, default=10, help="timed steps, after 3 warm-up steps")
    p.add_argument("--data-only", action="store_true", help="the data pipeline (decode + crop + masks + collate) alone: images/s")
    args, rest = p.parse_known_args(argv)
    try:
        cfg = train.resolve_config(train.parse_args(rest))
        bench_data(cfg) if args.data_only else bench(cfg, steps=args.steps)
        return 0
    except (train.ConfigError, model.CheckpointError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
