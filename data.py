"""
data.py -- datasets and transforms, written with pillow only.

* `ImageFolder`: the ImageNet / ImageNette layout `ROOT/train/<class>/*.JPEG` (and `ROOT/val/...`).
  Unreadable files (corrupt, truncated, not an image, decompression bombs) are skipped and counted:
  the sample is replaced by the next readable one and train.py prints one summary per epoch.
* `Shapes`: the built-in dataset (`--data shapes`), made locally and deterministically, no download:
  10 classes of procedurally drawn shapes and textures, 64x64 px, random colours, sizes, positions
  and pixel noise. It is SYNTHETIC: good for checking that the code learns, not a benchmark.
* `--data imagenette` (also `imagenette-320`, `imagewoof`): the fast.ai archive, downloaded once into
  $NJEPA_DATA (default ~/.cache/njepa), resumable, extracted safely and checked; later runs use the
  cache without touching the network. Only the standard library (urllib, tarfile, hashlib) is used.
* Transforms as I-JEPA pretraining: RandomResizedCrop(scale=(0.3, 1.0)), no flip, ImageNet
  normalisation (applied on the device, so batches travel as uint8). Evaluation: resize the short
  side to img*256/224 and center-crop (the usual linear-probe protocol).

* Training batches (`training_loader`): the data order, every crop and the masks (`MaskCollator`, in
  the DataLoader workers as I-JEPA's) are pure functions of (seed, step), drawn for the global batch
  and sharded over processes: a batch is the same whatever the number of workers, after a resume, and
  on 1 or N processes.

Run `python data.py --show-masks masks.png` to draw the masks (masks.py) on evaluation crops.
"""
import argparse
import errno
import hashlib
import http.client
import math
import os
import random
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import warnings

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps
from tqdm import tqdm

import masks

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
BUILTIN = ("shapes",)


class DataError(ValueError):
    """A problem with the dataset the user pointed at; train.py prints it as one line."""


class BadImage(Exception):
    pass


def to_rgb(img):
    """Any pillow mode -> 8-bit RGB: EXIF orientation applied, 16-bit and float images rescaled
    (pillow's own convert would clip them to white), alpha dropped as torchvision's loader does."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        if img.mode == "F":
            lo, hi2 = float(arr.min()), float(arr.max())
            arr, hi = arr - lo, max(hi2 - lo, 1e-12)
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def load_image(path):
    """Open, fully decode and convert one image; raise BadImage with the reason on any failure.
    Pillow's decompression-bomb warning (> Image.MAX_IMAGE_PIXELS, 89 Mpx) is an error here."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()  # decode now: truncated files fail here, not later in a worker
                return to_rgb(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning,
            EOFError, MemoryError) as e:
        raise BadImage(f"{path}: {type(e).__name__}: {e}") from None


class ImageFolder:
    """`root/<class>/**/<image>`; classes are the sorted sub-folder names, labels their indices."""

    def __init__(self, root, subset_per_class=None):
        if not os.path.isdir(root):
            raise DataError(f"dataset folder {root!r} does not exist")
        self.root = root
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        if not self.classes:
            raise DataError(f"dataset folder {root!r} has no class sub-folders (expected {root}/<class>/<image>)")
        self.paths, self.labels, self.ignored, self.empty_classes = [], [], 0, []
        for label, name in enumerate(self.classes):
            files = []
            for dirpath, _, filenames in os.walk(os.path.join(root, name), followlinks=True):
                for f in filenames:
                    if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS:
                        files.append(os.path.join(dirpath, f))
                    elif not f.startswith("."):
                        self.ignored += 1
            files.sort()
            if subset_per_class is not None:
                files = files[:subset_per_class]
            if not files:
                self.empty_classes.append(name)
            self.paths += files
            self.labels += [label] * len(files)
        if not self.paths:
            raise DataError(f"dataset folder {root!r} has no images (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
        if self.empty_classes:
            warnings.warn(f"{len(self.empty_classes)} class folder(s) in {root} hold no images: "
                          f"{', '.join(self.empty_classes[:5])}")

    def __len__(self):
        return len(self.paths)

    def load(self, i):
        return load_image(self.paths[i])

    def name(self, i):
        return self.paths[i]


# ---------------------------------------------------------------------------------------------
# Built-in synthetic dataset
# ---------------------------------------------------------------------------------------------
SHAPE_CLASSES = ["disc", "square", "triangle", "cross", "ring", "h_stripes", "v_stripes", "checker",
                 "diag_stripes", "dots"]


def _colours(rng):
    """Two random colours that differ enough to be told apart."""
    while True:
        a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        if np.abs(a.astype(int) - b.astype(int)).sum() > 200:
            return tuple(int(v) for v in a), tuple(int(v) for v in b)


def draw_shape(label, rng, size=64):
    """One image of class `label` as a PIL RGB image, drawn at 2x and downsampled (anti-aliased)."""
    S = 2 * size
    bg, fg = _colours(rng)
    img = Image.new("RGB", (S, S), bg)
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.18, 0.38) * S  # half-size of a shape
    cx, cy = rng.uniform(r, S - r, 2)
    period = rng.uniform(0.08, 0.22) * S  # texture period
    phase = rng.uniform(0, period)
    name = SHAPE_CLASSES[label]
    if name == "disc":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif name == "square":
        d.regular_polygon((cx, cy, r), 4, rotation=rng.uniform(0, 90), fill=fg)
    elif name == "triangle":
        d.regular_polygon((cx, cy, r), 3, rotation=rng.uniform(0, 120), fill=fg)
    elif name == "cross":
        t = r * 0.35
        d.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fg)
        d.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fg)
    elif name == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=max(2, int(r * 0.3)))
    elif name == "h_stripes":
        for y in np.arange(-phase, S, period):
            d.rectangle([0, y, S, y + period / 2], fill=fg)
    elif name == "v_stripes":
        for x in np.arange(-phase, S, period):
            d.rectangle([x, 0, x + period / 2, S], fill=fg)
    elif name == "checker":
        for i, y in enumerate(np.arange(-phase, S, period)):
            for j, x in enumerate(np.arange(-phase, S, period)):
                if (i + j) % 2 == 0:
                    d.rectangle([x, y, x + period, y + period], fill=fg)
    elif name == "diag_stripes":
        for k in np.arange(-S - phase, S, period):
            d.polygon([(k, 0), (k + period / 2, 0), (k + period / 2 + S, S), (k + S, S)], fill=fg)
    elif name == "dots":
        rad = period * 0.25
        for y in np.arange(period / 2 - phase, S, period):
            for x in np.arange(period / 2 - phase, S, period):
                d.ellipse([x - rad, y - rad, x + rad, y + rad], fill=fg)
    img = img.resize((size, size), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.int16) + rng.normal(0, 12, (size, size, 3)).astype(np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


class Shapes:
    """The built-in synthetic dataset: `per_class` images of each of 10 classes, fixed by `seed`.
    train: seed 0, 500 per class (5,000 images); test: seed 1, 100 per class (1,000 images)."""

    def __init__(self, split="train", per_class=None, size=64):
        seed = {"train": 0, "test": 1, "val": 1}[split]
        per_class = per_class or (500 if split == "train" else 100)
        rng = np.random.default_rng(seed)
        self.root = f"builtin:shapes/{split}"
        self.classes = list(SHAPE_CLASSES)
        self.labels = [c for c in range(len(self.classes)) for _ in range(per_class)]
        self.images = [draw_shape(c, rng, size) for c in self.labels]

    def __len__(self):
        return len(self.images)

    def load(self, i):
        return self.images[i]

    def name(self, i):
        return f"{self.root}#{i}"


def build_dataset(data, split, img_size=None, subset_per_class=None):
    """`data` is a built-in name ("shapes"), a downloadable one ("imagenette", ...) or a folder. For a
    folder, split "train" uses ROOT/train when it exists (else ROOT itself); "test"/"val" use ROOT/val
    or ROOT/test."""
    if data in BUILTIN:
        return Shapes(split, per_class=subset_per_class)
    if data in DOWNLOADS:
        data = fetch(data)
    if not os.path.isdir(data):
        raise DataError(f"dataset folder {data!r} does not exist (or use the built-in dataset: --data shapes)")
    if split == "train":
        root = os.path.join(data, "train")
        root = root if os.path.isdir(root) else data
    else:
        candidates = [os.path.join(data, s) for s in ("val", "test")]
        found = [c for c in candidates if os.path.isdir(c)]
        if not found:
            raise DataError(f"dataset folder {data!r} has no val/ or test/ sub-folder for evaluation")
        root = found[0]
    return ImageFolder(root, subset_per_class=subset_per_class)


# ---------------------------------------------------------------------------------------------
# Downloadable datasets: the fast.ai archives (github.com/fastai/imagenette), cached after one download
# ---------------------------------------------------------------------------------------------
MIRROR = "https://s3.amazonaws.com/fast-ai-imageclas/"  # $NJEPA_MIRROR overrides it (a local copy, the tests)
# name: (archive, its top folder, train images, val images); counts as published for the v2 split
DOWNLOADS = {
    "imagenette": ("imagenette2-160.tgz", "imagenette2-160", 9469, 3925),
    "imagenette-320": ("imagenette2-320.tgz", "imagenette2-320", 9469, 3925),
    "imagewoof": ("imagewoof2-160.tgz", "imagewoof2-160", 9025, 3929),
}
READY = ".njepa-complete"  # written inside the folder before it is renamed into place


def cache_root():
    return os.environ.get("NJEPA_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "njepa")


def fetch(name):
    """The folder of a downloadable dataset: from the cache if it is complete, else downloaded into a
    .part file (resumed with an HTTP Range request), extracted into a temporary folder, checked, and
    renamed into place. Every failure is one DataError line; nothing half-made looks ready."""
    archive, top, n_train, n_val = DOWNLOADS[name]
    root = cache_root()
    final = os.path.join(root, top)
    if os.path.exists(os.path.join(final, READY)):
        return final  # cache hit: no network
    url = os.environ.get("NJEPA_MIRROR", MIRROR).rstrip("/") + "/" + archive
    manual = (f"or download it by hand (curl -LO {url} && tar xzf {archive}) and pass the folder: --data ./{top}")
    try:
        os.makedirs(root, exist_ok=True)
        tgz = os.path.join(root, archive)
        if not os.path.exists(tgz):
            download(url, tgz, manual)
        extract_checked(tgz, root, top, n_train, n_val, manual)
        os.remove(tgz)  # the folder holds everything now
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise DataError(f"disk full while preparing {name} in {root}: free space or set NJEPA_DATA to another disk; "
                            f"the partial download is kept and resumes next time") from None
        raise DataError(f"cannot prepare {name} in {root}: {e}") from None
    return final


def download(url, path, manual):
    """url -> path through path + '.part', renamed only when complete; a .part left by an interrupted
    run is continued with an HTTP Range request when the server allows it (else started afresh)."""
    part = path + ".part"
    have = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            if have and r.status != 206:  # the server ignored the Range: start again
                have = 0
            total = have + int(r.headers.get("Content-Length", 0)) if r.headers.get("Content-Length") else None
            with open(part, "ab" if have else "wb") as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                                                desc=f"download {os.path.basename(path)}") as bar:
                for chunk in iter(lambda: r.read(1 << 20), b""):
                    f.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the .part is already whole
            os.replace(part, path)
            return
        raise DataError(f"could not download {url}: HTTP {e.code} {e.reason}; {manual}") from None
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, OSError) as e:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise
        where = f"; {os.path.getsize(part):,} bytes kept in {part}, run again to resume" if os.path.exists(part) else ""
        reason = getattr(e, "reason", e)
        raise DataError(f"could not download {url} ({type(e).__name__}: {reason}){where}; {manual}") from None
    got = os.path.getsize(part)
    if total is not None and got != total:
        raise DataError(f"download of {url} stopped at {got:,} of {total:,} bytes (kept in {part}, run again to resume); {manual}")
    os.replace(part, path)


def safe_members(tar, top):
    """The archive's members, refused unless each is a file or folder under `top`/ (no absolute
    paths, no '..', no links or devices): the layout check and the path-traversal guard in one."""
    members = tar.getmembers()
    for m in members:
        parts = m.name.replace("\\", "/").split("/")
        if m.name.startswith("/") or ".." in parts or parts[0] != top or not (m.isfile() or m.isdir()):
            raise DataError(f"unsafe or unexpected member {m.name!r} in the archive (expected files under {top}/)")
    return members


def extract_checked(tgz, root, top, n_train, n_val, manual):
    """Extract into a temporary folder next to the cache, check 10 classes and the image counts, mark
    it complete and rename it into place. A corrupt or truncated archive is deleted."""
    tmp = tempfile.mkdtemp(prefix=".extract-", dir=root)
    try:
        try:
            with tarfile.open(tgz, "r:gz") as tar:
                members = safe_members(tar, top)
                extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.11.4, 3.12
                tar.extractall(tmp, members=members, **extra)
        except DataError:  # an unsafe member: the archive is not the one we expect
            os.remove(tgz)
            raise
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                raise
            os.remove(tgz)
            raise DataError(f"{tgz} is corrupt or truncated ({type(e).__name__}: {e}); deleted, run again to "
                            f"download it afresh, {manual}") from None
        folder = os.path.join(tmp, top)
        for split, expected in (("train", n_train), ("val", n_val)):
            d = os.path.join(folder, split)
            classes = sorted(os.listdir(d)) if os.path.isdir(d) else []
            n = sum(len(fs) for c in classes for _, _, fs in os.walk(os.path.join(d, c)))
            if len(classes) != 10 or n != expected:
                os.remove(tgz)
                raise DataError(f"{tgz} has an unexpected layout: {top}/{split} holds {len(classes)} classes and {n} "
                                f"images, expected 10 and {expected}; deleted, {manual}")
        h = hashlib.sha256()
        with open(tgz, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        with open(os.path.join(folder, READY), "w") as f:
            f.write(h.hexdigest() + "\n")  # the archive's sha256, for the record
        final = os.path.join(root, top)
        if os.path.exists(final):  # an incomplete folder from an older version: replace it
            shutil.rmtree(final)
        os.replace(folder, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------
def random_resized_crop(img, size, rng, scale=(0.3, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop algorithm (used by I-JEPA with scale (0.3, 1.0)): area
    fraction uniform in `scale`, aspect ratio log-uniform in `ratio`, 10 tries, then a center crop."""
    W, H = img.size
    area = W * H
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= W and 0 < h <= H:
            left, top = rng.randint(0, W - w), rng.randint(0, H - h)
            return img.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
    s = min(W, H)  # fallback: largest centered square
    left, top = (W - s) // 2, (H - s) // 2
    return img.resize((size, size), Image.BILINEAR, box=(left, top, left + s, top + s))


def center_crop_pil(img, size):
    """Resize the short side to size*256/224, then center-crop size x size (evaluation)."""
    W, H = img.size
    short = int(round(size * 256 / 224))
    scale = short / min(W, H)
    img = img.resize((max(size, round(W * scale)), max(size, round(H * scale))), Image.BILINEAR)
    W, H = img.size
    left, top = (W - size) // 2, (H - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_uint8_tensor(img):
    """PIL RGB -> uint8 tensor [3, H, W] (normalised later, on the device)."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def normalize(batch):
    """uint8 [B, 3, H, W] -> float32 normalised with the ImageNet mean and std (I-JEPA)."""
    mean = torch.tensor(IMAGENET_MEAN, device=batch.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=batch.device).view(1, 3, 1, 1) * 255
    return (batch.float() - mean) / std


class Augmented(torch.utils.data.Dataset):
    """Wraps a base dataset. Indexed by (i, seed, *extra): seed drives the random crop (train=True);
    train=False applies the deterministic evaluation crop. Returns (uint8 image, label, bad_names,
    *extra): a sample that cannot be read is replaced by the next readable one and its name reported;
    `extra` is passed through (train.py passes the step, for the masks drawn in the collate)."""

    def __init__(self, base, img_size, train=True, max_skip=50):
        self.base, self.img_size, self.train, self.max_skip = base, img_size, train, max_skip

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        i, seed, *extra = key if isinstance(key, tuple) else (key, 0)
        bad = []
        for k in range(self.max_skip):
            j = (i + k) % len(self.base)
            try:
                img = self.base.load(j)
            except BadImage:
                bad.append(self.base.name(j))
                continue
            if self.train:
                img = random_resized_crop(img, self.img_size, random.Random(seed))
            else:
                img = center_crop_pil(img, self.img_size)
            return (to_uint8_tensor(img), self.base.labels[j], tuple(bad), *extra)
        raise DataError(f"{self.max_skip} images in a row could not be read, starting at {self.base.name(i)}: "
                        f"is {self.base.root} an image dataset?")


def collate(samples):
    images, labels, bad = zip(*samples)
    return torch.stack(images), torch.tensor(labels), [b for group in bad for b in group]


# ---------------------------------------------------------------------------------------------
# Training batches: order, crops and masks are pure functions of (seed, step), sharded over processes,
# so a resumed run and a run on N processes see exactly the images, crops and masks of a plain run.
# ---------------------------------------------------------------------------------------------
def step_seed(seed, step, rank=0, stream=0):
    """A fresh seed for each (run seed, step, rank, stream)."""
    return (((seed * 1_000_003 + step) * 1_009 + rank) * 17 + stream) % (2**63 - 1)


def epoch_batches(n_images, epoch, seed, batch, rank=0, world=1, start_batch=0):
    """Lists of (index, crop seed, step) for this rank's share of each global batch of one epoch."""
    g = torch.Generator().manual_seed(step_seed(seed, epoch, stream=1))
    order = torch.randperm(n_images, generator=g).tolist()
    per_rank, ipe = batch // world, n_images // batch  # the last partial batch is dropped
    return [[(order[k], step_seed(seed, epoch * n_images + k, stream=2), epoch * ipe + b)
             for k in range(b * batch + rank * per_rank, b * batch + (rank + 1) * per_rank)] for b in range(start_batch, ipe)]


class MaskCollator:
    """DataLoader collate (in the workers, as I-JEPA's MaskCollator): stacks this rank's images and
    draws this step's masks for the whole global batch from (seed, step), keeping this rank's rows.
    Returns (images uint8, labels, unreadable image names, context [b, Nc], targets [b, L, Nt], step)."""

    def __init__(self, grid, seed, rank=0, world=1, n_targets=4, context_keep="random"):
        self.grid, self.seed, self.rank, self.world, self.n_targets = grid, seed, rank, world, n_targets
        self.context_keep = context_keep  # how a context longer than the batch minimum is cut (masks.py)

    def __call__(self, samples):
        images, labels, bad = collate([s[:3] for s in samples])
        step = samples[0][3]
        return (images, labels, bad, *self.masks(step, len(samples)), step)

    def masks(self, step, b):
        """(context [b, Nc], targets [b, L, Nt]) of this rank's b images at `step`."""
        g = torch.Generator().manual_seed(step_seed(self.seed, step, stream=3))
        context, targets = masks.sample_masks(b * self.world, self.grid, self.grid, generator=g, n_targets=self.n_targets,
                                              context_keep=self.context_keep)
        rows = slice(self.rank * b, (self.rank + 1) * b)
        return context[rows], targets[rows]


def ignore_signals_in_worker(_worker_id):
    """Ctrl-C reaches the whole process group: DataLoader workers ignore it (and SIGTERM) so that only
    the main process reacts, saves a checkpoint and then shuts the workers down."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def training_loader(dataset, img, grid, seed, batch, epoch, start_batch=0, rank=0, world=1, workers=-1, pin=False,
                    context_keep="random"):
    """This rank's batches of one epoch, from `start_batch` on. workers -1: none for the in-memory
    built-in data (cropping costs less than a worker process), else one per core left, up to 8."""
    if workers < 0:
        workers = 0 if isinstance(dataset, Shapes) else min(8, max(1, (os.cpu_count() or 2) // world - 1))
    return torch.utils.data.DataLoader(Augmented(dataset, img, train=True), num_workers=workers, pin_memory=pin,
                                       batch_sampler=epoch_batches(len(dataset), epoch, seed, batch, rank, world, start_batch),
                                       collate_fn=MaskCollator(grid, seed, rank, world, context_keep=context_keep),
                                       worker_init_fn=ignore_signals_in_worker)


# ---------------------------------------------------------------------------------------------
# Evaluation sets of the online kNN curve (train.py --eval-every): fixed, stratified, decoded once
# ---------------------------------------------------------------------------------------------
def stratified_pick(labels, cap, seed):
    """Sorted indices of at most `cap` samples with the classes as balanced as they allow: each class
    in a random order (its own generator, `seed`), then taken round-robin over the classes."""
    labels = torch.as_tensor(labels)
    if cap is None or cap >= len(labels):
        return torch.arange(len(labels))
    g = torch.Generator().manual_seed(seed)
    rank = torch.empty(len(labels), dtype=torch.long)  # position of each sample within its class's random order
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().squeeze(1)
        rank[idx[torch.randperm(len(idx), generator=g)]] = torch.arange(len(idx))
    order = sorted(range(len(labels)), key=lambda i: (rank[i].item(), labels[i].item()))
    return torch.tensor(sorted(order[:cap]))


def eval_images(dataset, indices, img_size):
    """(uint8 [n, 3, img, img] evaluation crops, labels [n], names of unreadable files skipped) of the
    given samples, decoded once; an unreadable file is replaced by the next readable one (Augmented)."""
    view = Augmented(dataset, img_size, train=False)
    images, labels, bad = collate([view[int(i)] for i in tqdm(indices, desc="knn images", unit="img", leave=False)])
    return images, labels, bad


# ---------------------------------------------------------------------------------------------
# Picture of the masks on real images: python data.py --show-masks masks.png
# (here rather than in masks.py, which data.py imports: the imports go one way)
# ---------------------------------------------------------------------------------------------
def main(argv=None):
    parser = argparse.ArgumentParser(description="Draw I-JEPA multi-block masks (masks.py) on example images.")
    parser.add_argument("--show-masks", required=True, metavar="PNG", help="output PNG path")
    parser.add_argument("--data", default="shapes", help="built-in dataset name or ImageFolder root")
    parser.add_argument("--img", type=int, default=224)
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--n", type=int, default=8, help="number of examples")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        grid = masks.patch_grid(args.img, args.patch)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if args.n < 1:
        raise SystemExit(f"error: --n must be >= 1, got {args.n}")
    dataset = build_dataset(args.data, "train", args.img)
    g = torch.Generator().manual_seed(args.seed)
    picks = torch.randperm(len(dataset), generator=g)[:args.n].tolist()
    images = [center_crop_pil(dataset.load(i), args.img) for i in picks]
    context, targets = masks.sample_masks(len(images), grid, grid, generator=g)  # [n, Nc], [n, 4, Nt]
    masks.draw_masks(images, context, targets, grid).save(args.show_masks)
    print(f"wrote {args.show_masks}: {len(images)} images, grid {grid}x{grid}, context {context.shape[1]} patches, "
          f"targets {targets.shape[1]} x {targets.shape[2]} patches")


if __name__ == "__main__":
    main()
