"""Histology images: spot tiles, colour features, augmentations and self-supervised tile encoders.

The histology-aware methods use the H&E image in one of three ways (see the review's ST + histology chapter):

* **one colour per spot** (SpaGCN, TransformerST, TESLA): :func:`colour_features`, the mean RGB in a square
  window around each spot, computed with a summed-area table so it costs O(n) whatever the window;
* **tiles through a CNN** (SpaCell, stLearn, DeepST, ConGI, stMVC): :func:`spot_tiles` cuts them,
  :func:`train_tile_encoder` trains a :class:`stcore.nn.TileCNN` SimCLR-style on them (the originals use
  ImageNet ResNets, which cannot be downloaded here) and :func:`encode_tiles` embeds them;
* **hand-crafted tile statistics** as a baseline: :func:`spot_tile_features`.

Conventions: an image is ``(H, W, 3) uint8``; spot coordinates ``coords_px`` are ``(x, y)`` = (column, row) in
full-resolution pixels, and ``scale`` maps them to the image (``tissue_hires_scalef`` for the hires image), see
:func:`image_and_scale`. Pixel ``(r, c)`` is centred on image coordinates ``(x, y) = (c, r)`` (as in
``matplotlib.imshow`` and ``scanpy.pl.spatial``). Tiles for torch are ``(n, 3, H, W)`` float in [0, 1]; use
:func:`to_tensor` to convert ``(n, H, W, 3) uint8`` tiles.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .validation import check_image_covers

__all__ = [
    "colour_coordinate",
    "TILE_FEATURES",
    "augment",
    "colour_features",
    "encode_tiles",
    "image_and_scale",
    "slide_tile_features",
    "spot_tile_features",
    "spot_tiles",
    "to_tensor",
    "train_tile_encoder",
]

#: names of the columns returned by :func:`spot_tile_features`.
TILE_FEATURES = (
    "mean_r", "mean_g", "mean_b", "std_r", "std_g", "std_b",
    "grey_gradient", "glcm_contrast", "glcm_homogeneity", "glcm_energy", "glcm_correlation",
)

_GREY = (0.299, 0.587, 0.114)   # ITU-R 601 luma weights


# --------------------------------------------------------------------------------------------------- images
def _as_rgb_uint8(image, what: str = "image") -> np.ndarray:
    """(H, W, 3) uint8 view of an image that may be float in [0, 1], greyscale or RGBA."""
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4):
        raise ValueError(f"{what} must be (H, W, 3) RGB (or greyscale / RGBA), got shape {img.shape}.")
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    img = img[..., :3]
    if img.dtype == np.uint8:
        return img
    if img.dtype.kind == "f":
        if not np.all(np.isfinite(img)):
            raise ValueError(f"{what} contains NaN or infinite values.")
        # scanpy's read_visium stores images as float in [0, 1]
        top = 1.0 if img.max() <= 1.0 + 1e-6 else 255.0
        return np.clip(np.rint(img * (255.0 / top)), 0, 255).astype(np.uint8)
    if img.dtype.kind in "iu":
        if img.min() < 0 or img.max() > 255:
            raise ValueError(f"{what} has integer values outside 0..255 (e.g. 16-bit); rescale it to uint8.")
        return img.astype(np.uint8)
    raise ValueError(f"{what} has unsupported dtype {img.dtype}; pass uint8 or float in [0, 1].")


def image_and_scale(adata, library_id: str | None = None, resolution: str | None = "hires"):
    """The H&E image of ``adata`` and the factor that maps full-resolution pixels onto it.

    Parameters
    ----------
    adata
        AnnData with ``uns["spatial"][library_id]["images"]`` and ``["scalefactors"]`` (scanpy/squidpy layout).
    library_id
        Which library; may be omitted when there is only one.
    resolution
        ``"hires"``, ``"lowres"``, or ``None`` for hires when present, else lowres.

    Returns
    -------
    image : (H, W, 3) uint8
        Float images in [0, 1] (as ``scanpy.read_visium`` stores them) are converted.
    scale : float
        ``tissue_<resolution>_scalef``: image pixel = full-resolution pixel x scale.
    """
    spatial = adata.uns.get("spatial") if hasattr(adata, "uns") else None
    if not spatial:
        raise KeyError("adata.uns['spatial'] is missing, so there is no image. Read Visium data with "
                       "scanpy.read_visium / squidpy.read.visium (which store the H&E image there), or put it in "
                       "adata.uns['spatial'][library_id] = {'images': {'hires': img}, 'scalefactors': {...}}.")
    libraries = list(spatial.keys())
    if library_id is None:
        if len(libraries) != 1:
            raise ValueError(f"adata.uns['spatial'] holds {len(libraries)} libraries {libraries}; choose one "
                             f"with library_id=.")
        library_id = libraries[0]
    if library_id not in spatial:
        raise KeyError(f"library_id={library_id!r} is not in adata.uns['spatial']; available: {libraries}.")
    lib = spatial[library_id]
    images = lib.get("images", {}) or {}
    if not images:
        raise KeyError(f"adata.uns['spatial'][{library_id!r}] has no 'images'; this sample has no H&E image "
                       f"(spot coordinates alone cannot give histology features).")
    if resolution is None:
        resolution = "hires" if "hires" in images else "lowres"
    if resolution not in ("hires", "lowres"):
        raise ValueError(f"resolution={resolution!r}: choose 'hires', 'lowres' or None.")
    if resolution not in images:
        raise KeyError(f"No {resolution!r} image for library {library_id!r}; available: {list(images)}. "
                       f"Pass resolution={next(iter(images))!r} (or None).")
    factors = lib.get("scalefactors", {}) or {}
    key = f"tissue_{resolution}_scalef"
    if key not in factors:
        raise KeyError(f"adata.uns['spatial'][{library_id!r}]['scalefactors'] has no {key!r}, so spot "
                       f"coordinates cannot be placed on the image; add it (available: {list(factors)}).")
    return _as_rgb_uint8(images[resolution], f"the {resolution} image"), float(factors[key])


def _nearest_pixel(v: np.ndarray) -> np.ndarray:
    """Index of the pixel whose centre is nearest (halves round up, unlike numpy's round-half-to-even)."""
    return np.floor(v + 0.5).astype(np.int64)


def spot_tiles(image, coords_px, size: int, scale: float = 1.0, tolerance: float = 2.0) -> np.ndarray:
    """Square tiles of ``size x size`` image pixels centred on each spot.

    The centre of spot ``i`` is ``coords_px[i] * scale``; its tile covers rows ``round(y) - size // 2`` to
    ``round(y) - size // 2 + size - 1`` (likewise for columns; halves round up). Parts of a tile that run past the image edge are
    filled by reflection; a spot whose centre is more than ``tolerance`` pixels off the image is an error.

    Parameters
    ----------
    image
        (H, W, 3) image (uint8, or float in [0, 1]).
    coords_px
        (n, 2) spot centres ``(x, y)`` in full-resolution pixels.
    size
        Tile side in image pixels (e.g. stLearn crops 40 full-res px: ``size = round(40 * scale)``).
    scale
        Full-resolution -> image factor (from :func:`image_and_scale`).
    tolerance
        How far (image pixels) a centre may lie beyond the edge, to absorb rounding of scale factors.

    Returns
    -------
    (n, size, size, 3) uint8
    """
    img = _as_rgb_uint8(image)
    if int(size) != size or size < 1:
        raise ValueError(f"size={size}: the tile side must be a positive integer number of image pixels.")
    size = int(size)
    xy = check_image_covers(img, coords_px, scale, tolerance=tolerance)
    h, w = img.shape[:2]
    half = size // 2
    pad = half + math.ceil(tolerance) + 1
    padded = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode="reflect" if min(h, w) > 1 else "edge")
    r0 = _nearest_pixel(xy[:, 1]) - half + pad
    c0 = _nearest_pixel(xy[:, 0]) - half + pad
    offs = np.arange(size)
    return padded[(r0[:, None] + offs)[:, :, None], (c0[:, None] + offs)[:, None, :]]


def colour_features(image, coords_px, scale: float = 1.0, radius: float = 24.0, tolerance: float = 2.0) -> np.ndarray:
    """Mean RGB in a square window around each spot (SpaGCN's histology colour, before its 1-D projection).

    The window of spot ``i`` spans ``round(x_i) - r .. round(x_i) + r`` columns (rows likewise) of the image,
    ``r = round(radius * scale)``, clipped to the image (a centre just off the edge moves to the edge pixel). With a summed-area table
    ``S[a, b] = sum_{r < a, c < b} I[r, c]`` every window sum is ``S[r1, c1] - S[r0, c1] - S[r1, c0] + S[r0, c0]``,
    so the cost is O(H W + n) whatever the radius.

    Parameters
    ----------
    image
        (H, W, 3) image.
    coords_px
        (n, 2) spot centres ``(x, y)`` in full-resolution pixels.
    scale
        Full-resolution -> image factor.
    radius
        Window half-width in **full-resolution** pixels. SpaGCN's ``b = 49`` window on the full-resolution image is
        ``radius=24``; on the hires image the window shrinks with the scale factor.
    tolerance
        How far (image pixels) a centre may lie beyond the edge.

    Returns
    -------
    (n, 3) float64 mean R, G, B in 0..255.
    """
    img = _as_rgb_uint8(image)
    if not np.isfinite(radius) or radius < 0:
        raise ValueError(f"radius={radius}: the window half-width must be >= 0 (full-resolution pixels).")
    xy = check_image_covers(img, coords_px, scale, tolerance=tolerance)
    h, w = img.shape[:2]
    r = round(radius * scale)
    rows = np.clip(_nearest_pixel(xy[:, 1]), 0, h - 1)
    cols = np.clip(_nearest_pixel(xy[:, 0]), 0, w - 1)
    ra, rb = np.maximum(rows - r, 0), np.minimum(rows + r + 1, h)
    ca, cb = np.maximum(cols - r, 0), np.minimum(cols + r + 1, w)
    area = ((rb - ra) * (cb - ca)).astype(np.float64)
    # exact integer sums; int32 is enough while H * W * 255 fits
    dtype = np.int32 if h * w * 255 < 2**31 else np.int64
    out = np.empty((len(xy), 3))
    for ch in range(3):                     # one channel at a time keeps the table small
        table = np.zeros((h + 1, w + 1), dtype=dtype)
        np.cumsum(np.cumsum(img[..., ch], axis=0, dtype=dtype), axis=1, out=table[1:, 1:])
        out[:, ch] = (table[rb, cb] - table[ra, cb] - table[rb, ca] + table[ra, ca]) / area
    return out


def _tiles_nhwc_float(tiles) -> np.ndarray:
    """Tiles as (n, H, W, 3) float in [0, 1] from uint8 NHWC or float NCHW / NHWC."""
    if torch.is_tensor(tiles):
        tiles = tiles.detach().cpu().numpy()
    t = np.asarray(tiles)
    if t.ndim != 4:
        raise ValueError(f"tiles must be a batch (n, H, W, 3) or (n, 3, H, W), got shape {t.shape}.")
    if t.shape[-1] != 3 and t.shape[1] == 3:
        t = np.transpose(t, (0, 2, 3, 1))
    if t.shape[-1] != 3:
        raise ValueError(f"tiles must have 3 colour channels, got shape {t.shape}.")
    if t.dtype == np.uint8:
        return t.astype(np.float64) / 255.0
    t = t.astype(np.float64)
    if t.size and (t.min() < -1e-6 or t.max() > 1 + 1e-6):
        raise ValueError("float tiles must lie in [0, 1]; divide 0-255 values by 255 (or pass uint8).")
    return t


def colour_coordinate(image, coords_px, scale: float = 1.0, *, beta: float = 49, alpha: float = 1.0) -> np.ndarray:
    r"""SpaGCN's histology "third coordinate" of each spot (also used by TransformerST).

    The mean RGB :math:`(c_1, c_2, c_3)` of a :math:`\beta \times \beta` full-resolution-pixel window
    around each spot is collapsed into one value, weighting channels by their variance over spots, then
    z-scored and rescaled to the spread of the spot coordinates:

    .. math:: c_i = \frac{\sum_k \operatorname{Var}(c_k)\, c_{ik}}{\sum_k \operatorname{Var}(c_k)}, \qquad
              z_i = \alpha \cdot \max(\operatorname{sd}(x), \operatorname{sd}(y)) \cdot
              \frac{c_i - \bar c}{\operatorname{sd}(c)}

    Returns
    -------
    z : (n,) float array, in the units of ``coords_px``.
    """
    rgb = colour_features(image, coords_px, scale=scale, radius=(beta - 1) / 2)
    var = rgb.var(0)
    c = (rgb * var).sum(1) / var.sum() if var.sum() > 0 else rgb.mean(1)
    sd = c.std()
    z = (c - c.mean()) / sd if sd > 0 else np.zeros_like(c)
    xy = np.asarray(coords_px, dtype=np.float64)
    return alpha * max(xy[:, 0].std(), xy[:, 1].std()) * z


def spot_tile_features(tiles, levels: int = 8) -> np.ndarray:
    """Hand-crafted colour and texture statistics per tile: a baseline for learned tile features.

    Columns (:data:`TILE_FEATURES`): mean and standard deviation of R, G, B (in [0, 1]); mean grey-level
    gradient magnitude (forward differences); and four grey-level co-occurrence (GLCM, Haralick) statistics of the
    grey image quantised to ``levels`` levels, over horizontal and vertical neighbour pairs counted both ways
    (a symmetric, normalised matrix ``P``): contrast ``sum P_ij (i - j)^2``, homogeneity
    ``sum P_ij / (1 + (i - j)^2)``, energy ``sum P_ij^2`` and correlation
    ``sum P_ij (i - mu)(j - mu) / sigma^2`` (1 for a flat tile).

    Parameters
    ----------
    tiles
        (n, H, W, 3) uint8 or (n, 3, H, W) float in [0, 1]; H, W >= 2.
    levels
        Grey levels of the co-occurrence matrix.

    Returns
    -------
    (n, 11) float64
    """
    t = _tiles_nhwc_float(tiles)
    n, h, w, _ = t.shape
    if h < 2 or w < 2:
        raise ValueError(f"tiles must be at least 2 x 2 pixels for texture features, got {h} x {w}.")
    if int(levels) != levels or levels < 2:
        raise ValueError(f"levels={levels}: need an integer >= 2.")
    levels = int(levels)
    flat = t.reshape(n, -1, 3)
    mean, std = flat.mean(1), flat.std(1)
    grey = t @ np.asarray(_GREY)
    gx = np.diff(grey, axis=2)[:, :-1, :]
    gy = np.diff(grey, axis=1)[:, :, :-1]
    gradient = np.sqrt(gx ** 2 + gy ** 2).mean((1, 2))

    q = np.minimum((grey * levels).astype(np.int64), levels - 1)
    pairs = [(q[:, :, :-1], q[:, :, 1:]), (q[:, :-1, :], q[:, 1:, :])]
    base = (np.arange(n) * levels * levels)[:, None, None]
    glcm = np.zeros(n * levels * levels)
    for a, b in pairs:                                   # both orders -> symmetric matrix
        glcm += np.bincount((base + a * levels + b).ravel(), minlength=n * levels * levels)
        glcm += np.bincount((base + b * levels + a).ravel(), minlength=n * levels * levels)
    P = glcm.reshape(n, levels, levels)
    P /= P.sum((1, 2), keepdims=True)
    i = np.arange(levels, dtype=np.float64)
    d2 = (i[:, None] - i[None, :]) ** 2
    contrast = (P * d2).sum((1, 2))
    homogeneity = (P / (1.0 + d2)).sum((1, 2))
    energy = (P ** 2).sum((1, 2))
    mu = (P.sum(2) * i).sum(1)
    var = (P.sum(2) * (i[None] - mu[:, None]) ** 2).sum(1)
    cov = (P * (i[None, :, None] - mu[:, None, None]) * (i[None, None, :] - mu[:, None, None])).sum((1, 2))
    correlation = np.where(var > 1e-12, cov / np.maximum(var, 1e-12), 1.0)
    return np.column_stack([mean, std, gradient, contrast, homogeneity, energy, correlation])


# --------------------------------------------------------------------------------------------------- augment
def to_tensor(tiles) -> Tensor:
    """(n, H, W, 3) uint8 tiles (numpy or torch) -> (n, 3, H, W) float32 tensor in [0, 1]; float NCHW passes."""
    if not torch.is_tensor(tiles):
        tiles = torch.as_tensor(np.ascontiguousarray(tiles))
    if tiles.dim() != 4:
        raise ValueError(f"tiles must be a batch (n, H, W, 3) uint8 or (n, 3, H, W) float, got {tuple(tiles.shape)}.")
    if tiles.dtype == torch.uint8:
        if tiles.shape[-1] != 3:
            raise ValueError(f"uint8 tiles must be (n, H, W, 3), got {tuple(tiles.shape)}.")
        return tiles.permute(0, 3, 1, 2).float().div(255.0).contiguous()
    if tiles.shape[1] != 3:
        raise ValueError(f"float tiles must be (n, 3, H, W), got {tuple(tiles.shape)}; "
                         f"use tiles.permute(0, 3, 1, 2) for channel-last tiles.")
    return tiles.float()


def _generator(generator) -> torch.Generator:
    if isinstance(generator, torch.Generator):
        return generator
    g = torch.Generator()
    g.manual_seed(int(generator) if generator is not None else int(torch.randint(0, 2**62, (1,)).item()))
    return g


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _grey(x: Tensor) -> Tensor:
    w = torch.tensor(_GREY, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _geometric(x: Tensor, g: torch.Generator, crop_scale, ratio, flip: bool, rotate: bool) -> Tensor:
    """Random resized crop + flips + 90-degree rotations as one affine resampling (bilinear)."""
    n, _, h, w = x.shape
    area = _uniform(n, crop_scale[0], crop_scale[1], g)
    log_r = _uniform(n, math.log(ratio[0]), math.log(ratio[1]), g)
    r = torch.exp(log_r)
    cw = torch.sqrt(area * r).clamp(max=1.0)               # crop size as a fraction of the tile
    ch = torch.sqrt(area / r).clamp(max=1.0)
    tx = (torch.rand(n, generator=g) * 2 - 1) * (1 - cw)   # crop centre in normalised [-1, 1] coordinates
    ty = (torch.rand(n, generator=g) * 2 - 1) * (1 - ch)
    fx = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0) if flip else torch.ones(n)
    fy = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0) if flip else torch.ones(n)
    if rotate:
        k = torch.randint(0, 4, (n,), generator=g) if h == w else 2 * torch.randint(0, 2, (n,), generator=g)
    else:
        k = torch.zeros(n, dtype=torch.long)
    cos = torch.tensor([1.0, 0.0, -1.0, 0.0])[k]
    sin = torch.tensor([0.0, 1.0, 0.0, -1.0])[k]
    # input = diag(cw, ch) @ R(k) @ diag(fx, fy) @ output + t
    a11, a12 = cos * fx, -sin * fy
    a21, a22 = sin * fx, cos * fy
    theta = torch.stack([torch.stack([cw * a11, cw * a12, tx], 1), torch.stack([ch * a21, ch * a22, ty], 1)], 1)
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _colour_jitter(x: Tensor, g: torch.Generator, p: float, brightness: float, contrast: float,
                   saturation: float, hue: float) -> Tensor:
    """Brightness, contrast, saturation and hue shifts (hue as a rotation of the YIQ chroma plane)."""
    n = x.shape[0]
    on = (torch.rand(n, generator=g) < p).to(x)

    def factor(s):
        return (1 + on * (_uniform(n, -s, s, g))).view(n, 1, 1, 1).to(x)

    x = (x * factor(brightness)).clamp(0, 1)
    m = _grey(x).mean((2, 3), keepdim=True)
    x = ((x - m) * factor(contrast) + m).clamp(0, 1)
    gr = _grey(x)
    x = ((x - gr) * factor(saturation) + gr).clamp(0, 1)
    angle = (on * _uniform(n, -hue, hue, g) * 2 * math.pi).to(x)
    if hue > 0:
        rgb2yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]]).to(x)
        yiq = torch.einsum("ij,njhw->nihw", rgb2yiq, x)
        c, s = torch.cos(angle).view(n, 1, 1), torch.sin(angle).view(n, 1, 1)
        i, q = yiq[:, 1], yiq[:, 2]
        yiq = torch.stack([yiq[:, 0], c * i - s * q, s * i + c * q], 1)
        x = torch.einsum("ij,njhw->nihw", torch.linalg.inv(rgb2yiq), yiq).clamp(0, 1)
    return x


def _gaussian_blur(x: Tensor, g: torch.Generator, p: float, sigma) -> Tensor:
    """Separable Gaussian blur with a per-tile sigma (tiles not chosen get a delta kernel)."""
    n, c, h, w = x.shape
    on = torch.rand(n, generator=g) < p
    s = _uniform(n, sigma[0], sigma[1], g)
    radius = max(1, min(math.ceil(3 * sigma[1]), (min(h, w) - 1) // 2))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kern = torch.exp(-t[None] ** 2 / (2 * s[:, None] ** 2))
    kern = kern / kern.sum(1, keepdim=True)
    delta = (t == 0).float().expand(n, -1)
    kern = torch.where(on[:, None], kern, delta).to(x)
    k = kern.repeat_interleave(c, 0)                            # (n*c, K)
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k.view(n * c, 1, -1, 1), groups=n * c)
    return y.reshape(n, c, h, w)


def augment(
    tiles: Tensor,
    generator: torch.Generator | int | None = None,
    *,
    crop_scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
    rotate: bool = True,
    p_jitter: float = 0.8,
    brightness: float = 0.3,
    contrast: float = 0.3,
    saturation: float = 0.3,
    hue: float = 0.05,
    p_grey: float = 0.2,
    p_blur: float = 0.5,
    blur_sigma: tuple[float, float] = (0.1, 2.0),
) -> Tensor:
    """One random SimCLR-style view of each tile (torch only; differentiable in the tiles).

    In order, each with independent random parameters per tile: a random resized crop (area fraction in
    ``crop_scale``, aspect ratio in ``ratio``, resampled bilinearly to the input size) combined with random
    horizontal/vertical flips and 90-degree rotations; with probability ``p_jitter`` a colour jitter
    (brightness, contrast and saturation factors in ``1 ± value``, hue rotated by up to ``± hue`` of a turn);
    with probability ``p_grey`` conversion to grey; with probability ``p_blur`` a Gaussian blur with
    sigma in ``blur_sigma`` pixels. Defaults are milder on colour than SimCLR's (0.8, 0.8, 0.8, 0.2) because in
    H&E the stain colour carries tissue information; ConGI uses (0.4, 0.4, 0.4, 0.1).

    Parameters
    ----------
    tiles
        (n, 3, H, W) float in [0, 1] (or (n, H, W, 3) uint8, converted by :func:`to_tensor`).
    generator
        ``torch.Generator`` or integer seed; ``None`` draws from torch's global generator.

    Returns
    -------
    (n, 3, H, W) float tensor in [0, 1].
    """
    x = to_tensor(tiles)
    if x.numel() == 0:
        return x.clone()
    if not (0 < crop_scale[0] <= crop_scale[1] <= 1):
        raise ValueError(f"crop_scale={crop_scale}: need 0 < low <= high <= 1 (fractions of the tile area).")
    if not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"ratio={ratio}: need 0 < low <= high.")
    for name, p in (("p_jitter", p_jitter), ("p_grey", p_grey), ("p_blur", p_blur)):
        if not 0 <= p <= 1:
            raise ValueError(f"{name}={p}: a probability must lie in [0, 1].")
    if not (0 < blur_sigma[0] <= blur_sigma[1]):
        raise ValueError(f"blur_sigma={blur_sigma}: need 0 < low <= high (pixels).")
    g = _generator(generator)
    x = _geometric(x, g, crop_scale, ratio, flip, rotate)
    x = _colour_jitter(x, g, p_jitter, brightness, contrast, saturation, hue)
    grey_on = (torch.rand(x.shape[0], generator=g) < p_grey).view(-1, 1, 1, 1).to(x.device)
    x = torch.where(grey_on, _grey(x).expand_as(x), x)
    if p_blur > 0 and min(x.shape[-2:]) >= 3:
        x = _gaussian_blur(x, g, p_blur, blur_sigma)
    return x.clamp(0, 1)


# --------------------------------------------------------------------------------------------------- encoders
class _Projection(nn.Module):
    """SimCLR projection head g(h) = W2 ReLU(W1 h), used in training only."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, d_in), nn.ReLU(), nn.Linear(d_in, d_out))

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h)


def train_tile_encoder(
    tiles,
    n_latent: int = 64,
    epochs: int = 50,
    batch_size: int = 256,
    lr: float = 1e-3,
    tau: float = 0.5,
    seed: int = 0,
    progress: bool = True,
    width: int = 32,
    projection_dim: int | None = 32,
    weight_decay: float = 1e-6,
    device: str | None = None,
    augment_kwargs: dict | None = None,
):
    r"""Train a :class:`stcore.nn.TileCNN` on spot tiles with SimCLR (Chen et al. 2020), no labels needed.

    Each step draws two random views of a mini-batch with :func:`augment`, encodes both, maps them through a
    small projection head :math:`g` (discarded afterwards, as in SimCLR) and minimises
    :func:`stcore.nn.info_nce`, which pulls the two views of a tile together and pushes other tiles apart:

    .. math:: \ell_i = -\log \frac{\exp(\cos(u_i, v_i)/\tau)}{\sum_{b \ne i} \exp(\cos(u_i, w_b)/\tau)}

    stMVC trains a ResNet-50 this way for 500 epochs (hours on a GPU); the small CNN here takes minutes on a CPU.

    Parameters
    ----------
    tiles
        (n, H, W, 3) uint8 or (n, 3, H, W) float in [0, 1]; H, W >= 16.
    n_latent
        Feature size of the encoder.
    epochs, batch_size, lr, weight_decay
        Adam optimisation; the last mini-batch of an epoch is dropped when it has fewer than 2 tiles.
    tau
        InfoNCE temperature (stMVC: 0.5).
    seed
        Seeds the weights, the batch order and the augmentations.
    progress
        Show a tqdm progress bar.
    width
        Channels of the first CNN block.
    projection_dim
        Output of the projection head; ``None`` applies the loss to the encoder output directly.
    device
        Torch device; default from :func:`stcore.config.get`.
    augment_kwargs
        Passed to :func:`augment` (e.g. ``{"hue": 0.0}``).

    Returns
    -------
    encoder : TileCNN
        Trained, in eval mode.
    history : dict
        ``{"info_nce": [mean loss of each epoch]}``.
    """
    from tqdm.auto import tqdm

    from stcore.nn import TileCNN, info_nce

    if int(epochs) != epochs or epochs < 1:
        raise ValueError(f"epochs={epochs}: must be a positive integer.")
    if int(batch_size) != batch_size or batch_size < 2:
        raise ValueError(f"batch_size={batch_size}: contrastive training needs at least 2 tiles per batch.")
    x = to_tensor(tiles)
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"Got {n} tile(s); contrastive training needs at least 2.")
    if device is None:
        from stcore import config
        device = config.get().device
    torch.manual_seed(seed)
    encoder = TileCNN(n_latent=n_latent, width=width).to(device)
    head = _Projection(n_latent, projection_dim).to(device) if projection_dim else nn.Identity()
    params = list(encoder.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    kwargs = augment_kwargs or {}
    history = {"info_nce": []}
    bar = tqdm(range(int(epochs)), desc="SimCLR tiles", disable=not progress)
    for _ in bar:
        encoder.train()
        head.train()
        order = torch.randperm(n, generator=g)
        total, seen = 0.0, 0
        for start in range(0, n, int(batch_size)):
            idx = order[start:start + int(batch_size)]
            if len(idx) < 2:
                continue
            batch = x[idx]
            v1 = augment(batch, g, **kwargs).to(device)
            v2 = augment(batch, g, **kwargs).to(device)
            loss = info_nce(head(encoder(v1)), head(encoder(v2)), tau=tau)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        history["info_nce"].append(total / seen)
        bar.set_postfix(info_nce=f"{history['info_nce'][-1]:.3f}")
    encoder.eval()
    return encoder, history


@torch.no_grad()
def encode_tiles(encoder: nn.Module, tiles, batch_size: int = 512) -> np.ndarray:
    """Features of each tile from a trained encoder, in eval mode and without gradients.

    Parameters
    ----------
    encoder
        Module mapping (b, 3, H, W) float in [0, 1] to (b, n_latent), e.g. from :func:`train_tile_encoder`.
    tiles
        (n, H, W, 3) uint8 or (n, 3, H, W) float in [0, 1].
    batch_size
        Tiles per forward pass.

    Returns
    -------
    (n, n_latent) float32 numpy array.
    """
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be a positive integer.")
    was_training = encoder.training
    encoder.eval()
    try:
        param = next(encoder.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        # float conversion per batch: all tiles at once as float32 would take 4x their uint8 memory
        out = [encoder(to_tensor(tiles[i:i + int(batch_size)]).to(device)).float().cpu()
               for i in range(0, len(tiles), int(batch_size))]
    finally:
        encoder.train(was_training)
    if not out:
        raise ValueError("No tiles to encode (n = 0).")
    return torch.cat(out).numpy()


def slide_tile_features(
    adata,
    tile_fullres: float = 224.0,
    *,
    n_latent: int = 64,
    epochs: int = 30,
    seed: int = 0,
    weights: str | None = None,
    encoder: nn.Module | None = None,
    library_id: str | None = None,
    min_px: int = 16,
    max_train_tiles: int = 10_000,
    progress: bool = True,
) -> np.ndarray:
    """One feature vector per spot from its H&E tile: the tile CNN shared by SpaCell, stLearn and DeepST.

    The originals pass each spot's tile through an ImageNet-pretrained CNN (ResNet-50, Inception-v3). Those
    weights cannot be downloaded here, so by default a :class:`stcore.nn.TileCNN` is trained on the slide's own
    tiles with SimCLR (:func:`train_tile_encoder`) and then encodes them (:func:`encode_tiles`). Give ``weights``
    (a ``state_dict`` file saved from a TileCNN of the same ``n_latent``) or a ready ``encoder`` to skip training.

    Tiles come from ``obsm["tiles"]`` when present (already cut from the full-resolution image), else from the
    best image in ``uns["spatial"]``: a square of ``tile_fullres`` full-resolution pixels around each spot, but at
    least ``min_px`` image pixels (on a low-resolution image a spot covers only a few pixels). On large slides the
    encoder is trained on a random ``max_train_tiles`` of the tiles and then encodes all of them, so the cost of
    training does not grow with the number of spots.

    Returns
    -------
    (n_spots, n_latent) float32 array.
    """
    from .validation import spatial_coords

    if "tiles" in getattr(adata, "obsm", {}):
        tiles = np.asarray(adata.obsm["tiles"])
    else:
        image, scale = image_and_scale(adata, library_id, resolution=None)
        size = max(int(min_px), int(round(tile_fullres * scale)))
        tiles = spot_tiles(image, spatial_coords(adata), size, scale)
    if encoder is None:
        from .nn import TileCNN

        if weights is not None:
            encoder = TileCNN(n_latent=n_latent).load_pretrained(weights)
        else:
            train = tiles
            if len(tiles) > max_train_tiles:
                pick = np.random.default_rng(seed).choice(len(tiles), int(max_train_tiles), replace=False)
                train = tiles[np.sort(pick)]
            encoder, _ = train_tile_encoder(train, n_latent=n_latent, epochs=epochs, seed=seed, progress=progress)
    return encode_tiles(encoder, tiles)
