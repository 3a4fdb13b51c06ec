"""
masks.py -- I-JEPA multi-block masking (paper Sec. 4.3; I-JEPA Sec. 3 and `MaskCollator`).

Per batch:
  * one target block size (scale in (0.15, 0.2) of the patch grid, aspect ratio h/w in (0.75, 1.5))
    and one context block size (scale in (0.85, 1.0), aspect 1) are drawn (I-JEPA: sizes once per
    batch so that every image has the same number of target patches);
  * per image, L = 4 target blocks are placed at random positions (they may overlap each other),
    and one context block; the target patches are removed from the context (Sec. 4.3);
  * context lists are truncated to the shortest one in the batch so they stack into a tensor.

Block sides are clamped to grid - 1 as in I-JEPA (`while h >= height: h -= 1`): the context block is
at most 13x13 on the paper's 14x14 grid, never the whole image (SPEC section 2).

Departures from the reference code, both to remove a bias:
  * I-JEPA draws the top-left corner with randint(0, H - h), which never reaches the last row or
    column; here randint(0, H - h + 1), so every patch can be covered.
  * I-JEPA truncates the context to its first `min` indices (dropping the bottom of the image);
    here a random subset of that size is kept (in ascending order) by default. `context_keep="first"`
    (train.py `--context-keep first`) keeps the first indices as I-JEPA does: a harder task, since
    targets near the bottom are then predicted from farther away (SPEC section 2, "context cut").
Retries are bounded: a configuration that cannot leave `min_keep` context patches raises an error.

The picture (`draw_masks`) is drawn on real crops by `python data.py --show-masks masks.png`: data.py
imports this file for the training collator, so the command lives there and masks.py imports nothing of
the project.
"""
import math

import torch


def block_size(generator, scale, aspect, grid_h, grid_w):
    """Draw (h, w) of a block: area = scale * N patches, aspect = h / w (I-JEPA `_sample_block_size`)."""
    u = torch.rand(2, generator=generator).tolist()
    s = scale[0] + u[0] * (scale[1] - scale[0])
    # I-JEPA draws the aspect ratio uniformly in linear (not log) space.
    a = aspect[0] + u[1] * (aspect[1] - aspect[0])
    area = s * grid_h * grid_w
    h = int(round(math.sqrt(area * a)))
    w = int(round(math.sqrt(area / a)))
    # I-JEPA clamps each side to grid - 1 (`while h >= height: h -= 1`), so no block, the context
    # included, covers a whole side: 13x13 at most on 14x14, 7x7 on 8x8 (SPEC section 2, "masks").
    return max(1, min(h, grid_h - 1)), max(1, min(w, grid_w - 1))


def place_block(generator, h, w, grid_h, grid_w):
    """A [grid_h, grid_w] bool mask with one h x w block at a uniform position; the top-left corner
    ranges over 0..grid_h-h and 0..grid_w-w inclusive, so the last row and column are reachable."""
    top = int(torch.randint(0, grid_h - h + 1, (1,), generator=generator))
    left = int(torch.randint(0, grid_w - w + 1, (1,), generator=generator))
    mask = torch.zeros(grid_h, grid_w, dtype=torch.bool)
    mask[top:top + h, left:left + w] = True
    return mask


def patch_grid(img, patch):
    """Side of the square patch grid of an img x img image cut into patch x patch tiles. The multi-block
    masks need at least a 4x4 grid: on 2x2 and 3x3 every block is one patch and the context keeps a single
    patch, on 1x1 no context is left at all. Anything else is a ValueError with a one-line reason (shared by
    train.py's option check and data.py's picture)."""
    if img <= 0 or patch <= 0 or img % patch:
        raise ValueError(f"image size {img} is not divisible by patch size {patch}")
    grid = img // patch
    if grid < 4:
        raise ValueError(f"image size {img} with patch {patch} leaves a {grid}x{grid} grid; need at least 4x4")
    return grid


def default_min_keep(grid_h, grid_w):
    """I-JEPA keeps at least 10 context patches on its 14x14 grid; scale that by the grid area."""
    return max(1, math.ceil(10 * grid_h * grid_w / 196))


def sample_masks(batch_size, grid_h, grid_w, generator=None, n_targets=4, target_scale=(0.15, 0.2),
                 target_aspect=(0.75, 1.5), context_scale=(0.85, 1.0), context_aspect=(1.0, 1.0),
                 min_keep=None, max_tries=100, context_keep="random"):
    """Returns (context [B, Nc], targets [B, L, Nt]) as LongTensors of row-major patch indices.

    Invariants (tested): every target block is a full h x w rectangle of the same size for the whole
    batch; context and targets are disjoint; Nc >= min_keep; indices are in [0, grid_h * grid_w).
    """
    if n_targets < 1:
        raise ValueError(f"n_targets must be >= 1, got {n_targets}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if context_keep not in ("random", "first"):
        raise ValueError(f"context_keep must be 'random' or 'first', got {context_keep!r}")
    if min_keep is None:
        min_keep = default_min_keep(grid_h, grid_w)
    g = generator if generator is not None else torch.Generator().manual_seed(torch.seed() % 2**62)
    th, tw = block_size(g, target_scale, target_aspect, grid_h, grid_w)
    ch, cw = block_size(g, context_scale, context_aspect, grid_h, grid_w)
    contexts, targets = [], []
    for _ in range(batch_size):
        for _try in range(max_tries):
            blocks = [place_block(g, th, tw, grid_h, grid_w) for _ in range(n_targets)]
            covered = torch.stack(blocks).any(0)
            context = place_block(g, ch, cw, grid_h, grid_w) & ~covered  # Sec. 4.3: remove targets
            if int(context.sum()) >= min_keep:
                break
        else:
            raise RuntimeError(
                f"could not leave {min_keep} context patches after {max_tries} tries on a {grid_h}x{grid_w} "
                f"grid with {n_targets} targets of {th}x{tw}: use fewer/smaller targets or a larger image")
        contexts.append(context.flatten().nonzero().squeeze(1))
        targets.append(torch.stack([b.flatten().nonzero().squeeze(1) for b in blocks]))
    n_keep = min(len(c) for c in contexts)  # truncate to the shortest context in the batch (SPEC 2, "context cut"):
    if context_keep == "first":  # I-JEPA's collator: the first n_keep indices in raster order
        contexts = [c[:n_keep] for c in contexts]
    else:  # a random subset of n_keep, kept in ascending order
        contexts = [c[torch.randperm(len(c), generator=g)[:n_keep].sort().values] for c in contexts]
    return torch.stack(contexts), torch.stack(targets)


# ---------------------------------------------------------------------------------------------
# Picture (the command is `python data.py --show-masks masks.png`)
# ---------------------------------------------------------------------------------------------
TARGET_COLOURS = [(230, 60, 60), (240, 200, 40), (60, 120, 230), (60, 190, 90), (180, 90, 210), (240, 140, 40)]


def block_box(block, grid, p):
    """Pixel box [x0, y0, x1, y1] of a target block given as patch indices on a grid of p-pixel cells."""
    rows, cols = [i // grid for i in block], [i % grid for i in block]
    return [min(cols) * p, min(rows) * p, (max(cols) + 1) * p - 1, (max(rows) + 1) * p - 1]


def draw_masks(images, context, targets, grid, cell=None):
    """images: list of PIL RGB images (square). Returns one PIL image: per example, the image with
    context patches shown as they are, dropped patches darkened, target blocks outlined and tinted."""
    from PIL import Image, ImageDraw
    size = cell or max(96, images[0].width)
    p = size / grid
    tiles = []
    for img, ctx, tgt in zip(images, context.tolist(), targets.tolist()):
        base = img.convert("RGB").resize((size, size), Image.NEAREST)
        dark = Image.blend(base, Image.new("RGB", base.size, (0, 0, 0)), 0.75)
        keep = Image.new("L", base.size, 0)
        dk = ImageDraw.Draw(keep)
        for i in ctx:
            r, c = divmod(i, grid)
            dk.rectangle([c * p, r * p, (c + 1) * p - 1, (r + 1) * p - 1], fill=255)
        tile = Image.composite(base, dark, keep)
        boxes = [block_box(block, grid, p) for block in tgt]
        overlay = tile.copy()
        for j, box in enumerate(boxes):  # tinted fill, then a solid outline on top
            ImageDraw.Draw(overlay).rectangle(box, fill=TARGET_COLOURS[j % len(TARGET_COLOURS)])
        tile = Image.blend(tile, overlay, 0.35)
        for j, box in enumerate(boxes):
            ImageDraw.Draw(tile).rectangle(box, outline=TARGET_COLOURS[j % len(TARGET_COLOURS)], width=2)
        tiles.append(tile)
    n = len(tiles)
    ncol = min(4, n)
    nrow = math.ceil(n / ncol)
    pad = 6
    sheet = Image.new("RGB", (ncol * (size + pad) + pad, nrow * (size + pad) + pad + 18), (255, 255, 255))
    for k, tile in enumerate(tiles):
        sheet.paste(tile, (pad + (k % ncol) * (size + pad), pad + 18 + (k // ncol) * (size + pad)))
    ImageDraw.Draw(sheet).text((pad, 3), "context = bright patches; 4 targets = coloured boxes", fill=(0, 0, 0))
    return sheet
