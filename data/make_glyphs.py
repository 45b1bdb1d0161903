"""The source task of the demo backbone: printed letters in the style of scikit-learn's digits.

    python -m data.make_glyphs --preview glyphs.png [--n 64] [--seed 0]

40 classes of Latin letters (``GLYPHS``: A-Z and the lower-case letters whose shape differs from their
capital; no digits) rendered offline with the TrueType fonts matplotlib ships (DejaVu, STIX). Each
sample is one glyph of one font under a random affine transform (rotation, shear, scale, shift) and a
random stroke width, binarised on a 32x32 grid with a few flipped pixels of noise, then reduced the way
the UCI digits were made: ink counted over 4x4 blocks (8x8 values 0..16), scaled to 0..255 and upscaled
4x (nearest) to 32x32 RGB. The demo's digits therefore look like these images, but the classes differ.

Everything is generated from a seed with ``torch.Generator`` on the CPU: the same seed gives the same
images on the same library versions (fonts rasterised by PIL's FreeType).
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["GLYPHS", "FONT_FILES", "IMAGE_SIZE", "font_paths", "glyph_masks", "render", "make_batch",
           "normalize", "main"]

# Capitals, plus the lower-case letters that do not become their capital once scaled to fill the frame
# (c o s u v w x z k p j l are left out: l is I in sans-serif fonts).
GLYPHS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabdefghimnqrty"
FONT_FILES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
)
IMAGE_SIZE = 32          # output images: 32x32, i.e. 8x8 blocks of 4x4 pixels like the demo's digits
MASK_SIZE = 64           # glyph masks are rendered at this size and resampled by the affine transform
BLOCK = 4                # ink is counted over BLOCK x BLOCK pixels of the 32x32 bitmap (UCI digits: 0..16)


def font_paths() -> tuple[Path, ...]:
    """The font files, from matplotlib's own data folder (installed with it; nothing is downloaded)."""
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    paths = tuple(folder / name for name in FONT_FILES)
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"fonts shipped with matplotlib not found: {', '.join(missing)}")
    return paths


@lru_cache(maxsize=2)
def glyph_masks(size: int = MASK_SIZE) -> torch.Tensor:
    """``fonts x classes x size x size`` float masks in [0, 1]: each glyph cropped to its ink and scaled,
    aspect kept, so that its longer side spans 7/8 of the frame, centred."""
    from PIL import Image, ImageDraw, ImageFont

    canvas = 3 * size
    masks = np.zeros((len(FONT_FILES), len(GLYPHS), size, size), dtype=np.float32)
    for f, path in enumerate(font_paths()):
        font = ImageFont.truetype(str(path), size=2 * size)
        for c, char in enumerate(GLYPHS):
            image = Image.new("L", (canvas, canvas), 0)
            ImageDraw.Draw(image).text((size // 2, size // 4), char, fill=255, font=font)
            box = image.getbbox()
            if box is None:
                raise ValueError(f"{path.name} renders {char!r} as an empty image")
            glyph = image.crop(box)
            scale = (size * 7 / 8) / max(glyph.size)
            w, h = max(1, round(glyph.size[0] * scale)), max(1, round(glyph.size[1] * scale))
            glyph = glyph.resize((w, h), Image.Resampling.LANCZOS)
            frame = Image.new("L", (size, size), 0)
            frame.paste(glyph, ((size - w) // 2, (size - h) // 2))
            masks[f, c] = np.asarray(frame, dtype=np.float32) / 255.0
    # A box blur turns the threshold of ``render`` into a stroke width (low threshold = bold).
    blurred = F.avg_pool2d(torch.from_numpy(masks).flatten(0, 1).unsqueeze(1), 7, stride=1, padding=3,
                           count_include_pad=True)
    return blurred.view(masks.shape)


def render(labels: torch.Tensor, fonts: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``N x 32 x 32`` uint8 images of glyph ``labels[i]`` in font ``fonts[i]``, randomly deformed."""
    n = labels.numel()
    masks = glyph_masks()[fonts, labels].unsqueeze(1)                       # N x 1 x 64 x 64

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator)

    angle = uniform(-15.0, 15.0) * (math.pi / 180.0)
    shear = uniform(-0.3, 0.3)
    scale_x, scale_y = uniform(0.75, 1.1), uniform(0.9, 1.15)
    shift_x, shift_y = uniform(-0.08, 0.08), uniform(-0.08, 0.08)
    threshold = uniform(0.1, 0.55)                                          # stroke width
    flip = uniform(0.0, 0.015)                                              # salt-and-pepper rate

    cos, sin = torch.cos(angle), torch.sin(angle)
    # Output -> mask coordinates (affine_grid's convention): inverse of rotate * shear * scale.
    a = torch.stack([cos, -sin, sin, cos], 1).view(n, 2, 2)
    s = torch.stack([torch.ones(n), shear, torch.zeros(n), torch.ones(n)], 1).view(n, 2, 2)
    forward = a @ s @ torch.diag_embed(torch.stack([scale_x, scale_y], 1))
    theta = torch.cat([torch.linalg.inv(forward), torch.stack([shift_x, shift_y], 1).unsqueeze(2)], 2)
    grid = F.affine_grid(theta, [n, 1, IMAGE_SIZE, IMAGE_SIZE], align_corners=False)
    ink = F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    bitmap = ink > threshold.view(n, 1, 1, 1)
    noise = torch.rand(bitmap.shape, generator=generator) < flip.view(n, 1, 1, 1)
    bitmap = (bitmap ^ noise).float()
    counts = F.avg_pool2d(bitmap, BLOCK) * (BLOCK * BLOCK)                  # N x 1 x 8 x 8, 0..16
    pixels = torch.round(counts * (255.0 / (BLOCK * BLOCK))).to(torch.uint8)
    return pixels.repeat_interleave(BLOCK, 2).repeat_interleave(BLOCK, 3).squeeze(1)


def make_batch(n: int, seed: int = 0, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (``N x 32 x 32`` uint8) with uniformly drawn classes and fonts, and their labels.

    With ``generator`` the draw continues that stream (training); otherwise it is seeded by ``seed``.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(len(GLYPHS), (n,), generator=generator)
    fonts = torch.randint(len(FONT_FILES), (n,), generator=generator)
    return render(labels, fonts, generator), labels


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``N x H x W`` gray images -> ``N x 3 x H x W`` floats with the ImageNet mean/std the demo's
    data pipeline applies (``lib.data``: ToTensor then Normalize)."""
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    x = images.float().div(255.0).unsqueeze(1).expand(-1, 3, -1, -1)
    return (x - mean) / std


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: write a preview grid of generated samples."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preview", required=True, help="PNG file to write (a grid of samples)")
    parser.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from PIL import Image

    images, labels = make_batch(args.n, args.seed)
    cols = math.ceil(math.sqrt(args.n))
    rows = math.ceil(args.n / cols)
    grid = np.zeros((rows * (IMAGE_SIZE + 2), cols * (IMAGE_SIZE + 2)), dtype=np.uint8)
    for i, image in enumerate(images.numpy()):
        r, c = divmod(i, cols)
        grid[r * (IMAGE_SIZE + 2):r * (IMAGE_SIZE + 2) + IMAGE_SIZE,
             c * (IMAGE_SIZE + 2):c * (IMAGE_SIZE + 2) + IMAGE_SIZE] = image
    Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.Resampling.NEAREST).save(args.preview)
    print(f"[make_glyphs] {args.preview}: {args.n} samples; labels {''.join(GLYPHS[i] for i in labels.tolist())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
