"""Histology image utilities: tiles, colour features, texture features, augmentations, SimCLR tile encoder."""

import anndata as ad
import numpy as np
import pytest
import torch
from sklearn.model_selection import cross_val_score
from sklearn.neighbors import KNeighborsClassifier

from stcore import images
from stcore.images import (
    TILE_FEATURES,
    augment,
    colour_features,
    encode_tiles,
    image_and_scale,
    spot_tile_features,
    spot_tiles,
    to_tensor,
    train_tile_encoder,
)


def _coded_image(h=120, w=150):
    """Pixel (r, c) holds (r, c, (r + 2c) % 256): every tile's content is known."""
    r, c = np.mgrid[0:h, 0:w]
    return np.stack([r, c, (r + 2 * c) % 256], axis=-1).astype(np.uint8)


def _adata_with_image(img, scalef=0.5, library_id="lib1"):
    a = ad.AnnData(np.zeros((3, 2), dtype=np.float32))
    a.obsm["spatial"] = np.array([[20.0, 30.0], [100.0, 50.0], [200.0, 150.0]])
    a.uns["spatial"] = {library_id: {"images": {"hires": img},
                                     "scalefactors": {"tissue_hires_scalef": scalef, "spot_diameter_fullres": 10}}}
    return a


# --------------------------------------------------------------------------------------------- image_and_scale
def test_image_and_scale_reads_scanpy_layout():
    img = _coded_image()
    a = _adata_with_image(img)
    out, scale = image_and_scale(a)
    assert scale == 0.5 and out.dtype == np.uint8
    np.testing.assert_array_equal(out, img)
    # scanpy.read_visium stores float images in [0, 1]; RGBA and greyscale are accepted too
    a.uns["spatial"]["lib1"]["images"]["hires"] = np.concatenate([img / 255.0, np.ones(img.shape[:2] + (1,))], -1)
    np.testing.assert_array_equal(image_and_scale(a, resolution=None)[0], img)
    a.uns["spatial"]["lib1"]["images"]["hires"] = img[..., 0]
    assert image_and_scale(a, "lib1")[0].shape == img.shape


def test_image_and_scale_errors():
    a = _adata_with_image(_coded_image())
    with pytest.raises(KeyError, match="uns\\['spatial'\\] is missing"):
        image_and_scale(ad.AnnData(np.zeros((2, 2), dtype=np.float32)))
    with pytest.raises(KeyError, match="'lowres' image.*hires"):
        image_and_scale(a, resolution="lowres")
    with pytest.raises(KeyError, match="available: \\['lib1'\\]"):
        image_and_scale(a, library_id="other")
    two = a.copy()
    two.uns["spatial"]["lib2"] = two.uns["spatial"]["lib1"]
    with pytest.raises(ValueError, match="library_id"):
        image_and_scale(two)
    del a.uns["spatial"]["lib1"]["scalefactors"]["tissue_hires_scalef"]
    with pytest.raises(KeyError, match="tissue_hires_scalef"):
        image_and_scale(a)
    a.uns["spatial"]["lib1"]["images"] = {}
    with pytest.raises(KeyError, match="no 'images'"):
        image_and_scale(a)


# --------------------------------------------------------------------------------------------- spot_tiles
def test_spot_tiles_cut_the_right_pixels():
    img = _coded_image()
    coords = np.array([[40.0, 60.0], [101.0, 33.0], [250.0, 180.0]])   # full-res; scale 0.5 -> image pixels
    tiles = spot_tiles(img, coords, size=8, scale=0.5)
    assert tiles.shape == (3, 8, 8, 3) and tiles.dtype == np.uint8
    for tile, (x, y) in zip(tiles, coords * 0.5):
        r0, c0 = int(np.floor(y + 0.5)) - 4, int(np.floor(x + 0.5)) - 4   # halves round up
        np.testing.assert_array_equal(tile, img[r0:r0 + 8, c0:c0 + 8])
    # odd size: the centre pixel is the middle of the tile
    odd = spot_tiles(img, coords, size=5, scale=0.5)
    np.testing.assert_array_equal(odd[:, 2, 2], img[[30, 17, 90], [20, 51, 125]])


def test_spot_tiles_reflect_at_the_border():
    img = _coded_image()
    tiles = spot_tiles(img, np.array([[0.0, 1.0], [149.0, 119.0]]), size=6)
    padded = np.pad(img, ((3, 3), (3, 3), (0, 0)), mode="reflect")
    np.testing.assert_array_equal(tiles[0], padded[1:7, 0:6])          # rows -2..3, cols -3..2
    np.testing.assert_array_equal(tiles[1], padded[119:125, 149:155])
    assert tiles[0, 0, 3, 0] == 2 and tiles[0, 2, 3, 0] == 0              # row -2 reflects row 2


def test_spots_outside_the_image_are_an_error():
    img = _coded_image()
    coords = np.array([[10.0, 10.0], [500.0, 10.0], [10.0, -30.0], [100.0, 100.0]])
    with pytest.raises(ValueError, match=r"2 of 4 spots fall outside.*scale factor.*library_id"):
        spot_tiles(img, coords, size=8)
    with pytest.raises(ValueError, match="2 of 4 spots"):
        colour_features(img, coords)
    # the same spots fit once the right scale factor is used
    assert spot_tiles(img, np.abs(coords), size=8, scale=0.2).shape == (4, 8, 8, 3)
    with pytest.raises(ValueError, match="scale"):
        spot_tiles(img, coords, size=8, scale=0)
    with pytest.raises(ValueError, match="\\(n, 2\\)"):
        spot_tiles(img, coords[:, :1], size=8)
    with pytest.raises(ValueError, match="size"):
        spot_tiles(img, np.abs(coords) * 0.1, size=0)


# --------------------------------------------------------------------------------------------- colour_features
def test_colour_features_equal_brute_force_mean():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(90, 110, 3), dtype=np.uint8)
    coords = np.column_stack([rng.uniform(0, 219, 40), rng.uniform(0, 179, 40)])
    coords[:4] = [[0, 0], [219, 179], [0, 179], [219, 0]]                # windows clipped at the corners
    scale, radius = 0.5, 13.0
    got = colour_features(img, coords, scale=scale, radius=radius)
    r = round(radius * scale)
    for (x, y), feat in zip(coords * scale, got):
        row, col = min(int(np.floor(y + 0.5)), 89), min(int(np.floor(x + 0.5)), 109)
        win = img[max(row - r, 0):row + r + 1, max(col - r, 0):col + r + 1].reshape(-1, 3)
        np.testing.assert_allclose(feat, win.mean(0), rtol=1e-12)
    # radius 0 reads the centre pixel; SpaGCN's b = 49 window is radius 24 at full resolution
    inner = coords[4:]
    np.testing.assert_allclose(colour_features(img, inner, scale, radius=0),
                               img[np.floor(inner[:, 1] * scale + 0.5).astype(int),
                                   np.floor(inner[:, 0] * scale + 0.5).astype(int)])


def test_colour_features_large_window_is_whole_image_mean():
    img = np.random.default_rng(1).integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
    got = colour_features(img, np.array([[20.0, 15.0]]), radius=100)
    np.testing.assert_allclose(got[0], img.reshape(-1, 3).mean(0))


# --------------------------------------------------------------------------------------------- tile features
def test_spot_tile_features_hand_computed():
    flat = np.full((1, 8, 8, 3), 128, dtype=np.uint8)
    board = (np.indices((8, 8)).sum(0) % 2 * 255).astype(np.uint8)
    board = np.repeat(board[None, ..., None], 3, axis=-1)
    f = spot_tile_features(np.concatenate([flat, board]), levels=2)
    assert f.shape == (2, len(TILE_FEATURES))
    feats = dict(zip(TILE_FEATURES, f.T))
    np.testing.assert_allclose(feats["mean_r"], [128 / 255, 0.5])
    np.testing.assert_allclose(feats["std_g"], [0, 0.5], atol=1e-12)
    np.testing.assert_allclose(feats["grey_gradient"], [0, np.sqrt(2)], rtol=1e-6)
    # checkerboard: every neighbour pair differs -> P = [[0, .5], [.5, 0]]
    np.testing.assert_allclose(feats["glcm_contrast"], [0, 1])
    np.testing.assert_allclose(feats["glcm_homogeneity"], [1, 0.5])
    np.testing.assert_allclose(feats["glcm_energy"], [1, 0.5])
    np.testing.assert_allclose(feats["glcm_correlation"], [1, -1])
    # float (n, 3, H, W) input gives the same numbers
    f2 = spot_tile_features(to_tensor(np.concatenate([flat, board])), levels=2)
    np.testing.assert_allclose(f2, f, atol=1e-6)
    with pytest.raises(ValueError, match="levels"):
        spot_tile_features(board, levels=1)


# --------------------------------------------------------------------------------------------- augment
@pytest.fixture(scope="module")
def batch():
    return to_tensor(np.random.default_rng(0).integers(0, 256, size=(16, 20, 20, 3), dtype=np.uint8))


def test_augment_shape_range_and_determinism(batch):
    out = augment(batch, 0)
    assert out.shape == batch.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    torch.testing.assert_close(augment(batch, 0), out)
    assert not torch.allclose(augment(batch, 1), out)
    g = torch.Generator().manual_seed(5)
    first = augment(batch, g)
    assert not torch.allclose(augment(batch, g), first)            # the generator advances
    # uint8 (n, H, W, 3) in, float (n, 3, H, W) out
    assert augment((batch * 255).round().byte().permute(0, 2, 3, 1), 0).shape == batch.shape


def test_augment_identity_and_exact_geometry(batch):
    off = {"crop_scale": (1, 1), "ratio": (1, 1), "p_jitter": 0, "p_grey": 0, "p_blur": 0}
    torch.testing.assert_close(augment(batch, 0, flip=False, rotate=False, **off), batch, atol=1e-5, rtol=0)
    rot = augment(batch, 0, flip=False, **off)
    flips = augment(batch, 0, rotate=False, **off)
    for i in range(len(batch)):
        assert min(float((rot[i] - torch.rot90(batch[i], k, (1, 2))).abs().max()) for k in range(4)) < 1e-5
        assert min(float((flips[i] - batch[i].flip(d)).abs().max()) for d in [(), (1,), (2,), (1, 2)]) < 1e-5


def test_augment_colour_and_blur(batch):
    geo = {"crop_scale": (1, 1), "ratio": (1, 1), "flip": False, "rotate": False}
    grey = augment(batch, 0, p_jitter=0, p_grey=1, p_blur=0, **geo)
    torch.testing.assert_close(grey[:, 0], grey[:, 1])
    blur = augment(batch, 0, p_jitter=0, p_grey=0, p_blur=1, blur_sigma=(1.5, 1.5), **geo)
    torch.testing.assert_close(blur.mean((2, 3)), batch.mean((2, 3)), atol=0.02, rtol=0)
    assert blur.std() < 0.6 * batch.std()                           # white noise loses most of its variance
    jit = augment(batch, 0, p_jitter=1, p_grey=0, p_blur=0, brightness=0.5, contrast=0, saturation=0, hue=0, **geo)
    ratio = jit.sum((1, 2, 3)) / batch.sum((1, 2, 3))
    assert ratio.min() < 0.95 and ratio.max() > 1.05
    with pytest.raises(ValueError, match="crop_scale"):
        augment(batch, 0, crop_scale=(0, 1))
    with pytest.raises(ValueError, match="p_blur"):
        augment(batch, 0, p_blur=2)


# --------------------------------------------------------------------------------------------- SimCLR encoder
def _two_textures(n=128, size=16, seed=0):
    """Fine pixel noise vs coarse 4x4 blocks, each tile with a random tint (a nuisance the encoder must ignore)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    tiles = np.empty((n, size, size, 3))
    for i in range(n):
        pattern = rng.choice([-1.0, 1.0], size=(size, size)) if y[i] == 0 else \
            np.kron(rng.choice([-1.0, 1.0], size=(size // 4, size // 4)), np.ones((4, 4)))
        tiles[i] = np.clip(rng.uniform(0.2, 0.8, size=3) + 0.15 * pattern[..., None], 0, 1)
    return np.rint(tiles * 255).astype(np.uint8), y


def test_train_tile_encoder_learns_texture_over_tint():
    from stcore.nn import TileCNN

    torch.set_num_threads(1)
    tiles, y = _two_textures()
    # strong colour jitter makes the tint useless for telling views apart, so the encoder must learn texture
    kw = {"p_blur": 0, "brightness": 0.6, "contrast": 0.5, "saturation": 0.8, "hue": 0.25, "p_jitter": 1.0,
          "p_grey": 0.5, "crop_scale": (0.8, 1)}
    enc, hist = train_tile_encoder(tiles, n_latent=16, width=8, epochs=30, batch_size=64, lr=3e-3, seed=0,
                                   progress=False, augment_kwargs=kw)
    loss = hist["info_nce"]
    assert len(loss) == 30 and np.mean(loss[-3:]) < np.mean(loss[:3]) - 0.2
    assert not enc.training

    def knn_accuracy(z):
        return cross_val_score(KNeighborsClassifier(5), z, y, cv=4).mean()

    torch.manual_seed(0)
    z_random = encode_tiles(TileCNN(n_latent=16, width=8), tiles)
    z = encode_tiles(enc, tiles, batch_size=50)
    assert z.shape == (128, 16) and z.dtype == np.float32
    assert knn_accuracy(z) > 0.9 and knn_accuracy(z) > knn_accuracy(z_random) + 0.15
    # repeatable on CPU
    enc2, hist2 = train_tile_encoder(tiles[:32], n_latent=8, width=4, epochs=2, batch_size=16, seed=3, progress=False)
    enc3, hist3 = train_tile_encoder(tiles[:32], n_latent=8, width=4, epochs=2, batch_size=16, seed=3, progress=False)
    assert hist2 == hist3
    np.testing.assert_array_equal(encode_tiles(enc2, tiles[:8]), encode_tiles(enc3, tiles[:8]))


def test_train_tile_encoder_errors():
    tiles, _ = _two_textures(n=4)
    with pytest.raises(ValueError, match="batch_size"):
        train_tile_encoder(tiles, batch_size=1, progress=False)
    with pytest.raises(ValueError, match="at least 2"):
        train_tile_encoder(tiles[:1], progress=False)
    with pytest.raises(ValueError, match="epochs"):
        train_tile_encoder(tiles, epochs=0, progress=False)


def test_module_exports():
    assert set(images.__all__) >= {"image_and_scale", "spot_tiles", "colour_features", "spot_tile_features",
                                   "augment", "train_tile_encoder", "encode_tiles"}


def test_slide_tile_features_trains_or_loads(tmp_path):
    from stcore.data import synthetic
    from stcore.nn import TileCNN

    adata = synthetic.toy_domains(n_spots=60, n_genes=20, n_domains=2, seed=0)
    feats = images.slide_tile_features(adata, tile_fullres=100, n_latent=8, epochs=1, progress=False,
                                       max_train_tiles=40)
    assert feats.shape == (60, 8) and feats.dtype == np.float32 and np.isfinite(feats).all()
    model = TileCNN(n_latent=8)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    loaded = images.slide_tile_features(adata, tile_fullres=100, n_latent=8, weights=tmp_path / "w.pt")
    _, scale = images.image_and_scale(adata, resolution=None)
    tiles = images.spot_tiles(images.image_and_scale(adata, resolution=None)[0], adata.obsm["spatial"],
                              max(16, round(100 * scale)), scale)
    np.testing.assert_allclose(loaded, images.encode_tiles(model, tiles), rtol=1e-5, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="Pretrained downloads"):
        images.slide_tile_features(adata, weights=tmp_path / "missing.pt")
