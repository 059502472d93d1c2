"""Tests of the torch loading path: decoding, transforms, TaxonDataset, collate, loader, cache, samplers."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from taxonomist.config import Config
from taxonomist.data import load_dataset
from taxonomist.data.cache import ResizedCache, default_cache_size
from taxonomist.data.gpu_batch import batch_random_flips, batch_resize_normalize, decode_jpeg_batch_cuda
from taxonomist.data.loading import (SkippedImage, TaxonDataset, UnreadableImageError, build_loader, class_counts,
                                     collate, make_weighted_sampler, read_image)
from taxonomist.data.transforms import (build_transforms, pad_to_square, parse_randaugment, to_square)
from taxonomist.errors import ConfigError, DataError

torch.set_num_threads(1)

COLOURS = {"Cod": (200, 30, 30), "Haddock": (30, 200, 30), "Squid": (30, 30, 200)}
TAXONOMY = "concept_name,parent\nAnimalia,\nFish,Animalia\nCod,Fish\nHaddock,Fish\nSquid,Animalia\n"


def _cfg(size: int = 32, **data) -> Config:
    cfg = Config()
    cfg.data.image_size = size
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def _write_dataset(root: Path, per_class: int = 3, size: tuple[int, int] = (40, 48), context: bool = False,
                   fmt: str = "png") -> Path:
    """A tiny dataset: solid-colour images with a little noise, one colour per label."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    rows = []
    for label, colour in COLOURS.items():
        for k in range(per_class):
            h, w = size
            pixels = np.clip(np.array(colour) + rng.integers(-10, 10, (h, w, 3)), 0, 255).astype(np.uint8)
            rel = f"images/{label}_{k}.{fmt}"
            Image.fromarray(pixels).save(root / rel)
            row = {"path": rel, "label": label}
            if context:
                ctx = f"images/{label}_{k}_ctx.{fmt}"
                Image.fromarray(np.full((2 * h, 2 * w, 3), 255 - np.array(colour), np.uint8)).save(root / ctx)
                row["context_path"] = ctx
            rows.append(row)
    pd.DataFrame(rows).to_csv(root / "annotations.csv", index=False)
    (root / "taxonomy.csv").write_text(TAXONOMY)
    return root


@pytest.fixture
def data(tmp_path):
    return load_dataset(_write_dataset(tmp_path / "ds"))


# --- decoding -------------------------------------------------------------------------------------------

def test_read_image_modes(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 255, (12, 20, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")
    Image.fromarray(np.dstack([rgb, np.full((12, 20), 7, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(rgb).save(tmp_path / "rgb.bmp")             # torchvision cannot: PIL fallback
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(tmp_path / "g16.png")

    assert torch.equal(read_image(tmp_path / "rgb.png"), torch.from_numpy(rgb).permute(2, 0, 1))
    grey = read_image(tmp_path / "grey.png")
    assert grey.shape == (3, 12, 20) and torch.equal(grey[0], grey[2])
    assert torch.equal(grey[1], torch.from_numpy(rgb[..., 0]))
    assert torch.equal(read_image(tmp_path / "rgba.png"), torch.from_numpy(rgb).permute(2, 0, 1))
    assert torch.equal(read_image(tmp_path / "rgb.bmp"), torch.from_numpy(rgb).permute(2, 0, 1))
    g16 = read_image(tmp_path / "g16.png")
    assert g16.dtype == torch.uint8 and torch.equal(g16[0], torch.from_numpy(rgb[..., 0]))


@pytest.mark.parametrize("content, reason", [(None, "not found"), (b"", "empty file"),
                                             (b"hello, not an image", "not an image"),
                                             ("truncated", "truncated")])
def test_read_image_errors_name_the_file(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    if content == "truncated":
        Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 90).save(tmp_path / "full.jpg")
        data = (tmp_path / "full.jpg").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(UnreadableImageError) as info:
        read_image(path)
    assert isinstance(info.value, DataError)
    assert str(info.value).startswith(str(path)) and reason in str(info.value)
    assert "\n" not in str(info.value) and ".cpp" not in str(info.value)


# --- transforms -----------------------------------------------------------------------------------------

def test_eval_transform_shape_dtype_normalisation_and_determinism():
    cfg = _cfg(32)
    t = build_transforms(cfg, train=False, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    white = t(torch.full((3, 50, 70), 255, dtype=torch.uint8))
    black = t(torch.zeros(3, 50, 70, dtype=torch.uint8))
    assert white.shape == (3, 32, 32) and white.dtype == torch.float32
    assert torch.allclose(white, torch.ones_like(white)) and torch.allclose(black, -torch.ones_like(black))
    imagenet = build_transforms(cfg, False, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    out = imagenet(torch.full((3, 40, 40), 255, dtype=torch.uint8))
    assert torch.allclose(out[:, 0, 0], torch.tensor([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224,
                                                      (1 - 0.406) / 0.225]), atol=1e-5)
    img = torch.randint(0, 256, (3, 45, 60), dtype=torch.uint8)
    assert torch.equal(t(img), t(img))


def test_eval_transform_centre_crops_after_resizing_to_size_over_crop_pct():
    cfg = _cfg(28)
    cfg.augment.crop_pct = 0.875        # 28 / 0.875 = 32: a 32×32 image is only cropped, not resampled
    img = torch.arange(32 * 32, dtype=torch.int64).remainder(251).to(torch.uint8).view(1, 32, 32).repeat(3, 1, 1)
    out = build_transforms(cfg, False)(img)
    expected = (img[:, 2:30, 2:30].float() / 255 - 0.5) / 0.5
    assert torch.allclose(out, expected, atol=1e-6)


def test_train_transform_random_but_seeded():
    cfg = _cfg(32)
    t = build_transforms(cfg, train=True)
    img = torch.randint(0, 256, (3, 60, 80), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(5)
    a = t(img)
    torch.manual_seed(5)
    b = t(img)
    c = t(img)
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(b, c)


def test_train_transform_with_everything_off_is_a_plain_crop_of_the_whole_image():
    cfg = _cfg(16)
    aug = cfg.augment
    aug.scale, aug.ratio, aug.hflip, aug.vflip = (1.0, 1.0), (1.0, 1.0), 0.0, 0.0
    aug.rotate90, aug.rotation, aug.color_jitter, aug.randaugment = False, 0.0, 0.0, ""
    img = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    out = build_transforms(cfg, True)(img)
    assert torch.allclose(out, (img.float() / 255 - 0.5) / 0.5, atol=1e-6)


def test_flips_and_rotate90_only_permute_pixels():
    cfg = _cfg(16)
    aug = cfg.augment
    aug.scale, aug.ratio, aug.hflip, aug.vflip = (1.0, 1.0), (1.0, 1.0), 1.0, 1.0
    aug.rotate90, aug.rotation, aug.color_jitter, aug.randaugment = True, 0.0, 0.0, ""
    t = build_transforms(cfg, True)
    img = torch.arange(16 * 16, dtype=torch.int64).view(1, 16, 16).repeat(3, 1, 1).to(torch.uint8)
    torch.manual_seed(0)
    outs = [t(img) for _ in range(12)]
    ref = (img.float() / 255 - 0.5) / 0.5
    flipped = ref.flip(-1).flip(-2)
    allowed = [torch.rot90(flipped, k, dims=(-2, -1)) for k in range(4)]
    for out in outs:
        assert any(torch.allclose(out, a, atol=1e-6) for a in allowed)
    assert len({tuple(o[0, 0, :2].tolist()) for o in outs}) > 1   # several rotations were drawn


def test_pad_versus_stretch_on_an_elongated_image():
    # 10 rows × 40 columns: a dark bar on a light background with a mid-grey 1-px border
    img = torch.full((3, 10, 40), 200, dtype=torch.uint8)
    img[:, 3:7, 5:35] = 20
    padded = pad_to_square(img)
    assert padded.shape == (3, 40, 40)
    assert torch.equal(padded[:, 15:25, :], img)                # centred vertically
    assert (padded[:, :15] == 200).all() and (padded[:, 25:] == 200).all()   # filled with the edge colour

    stretch = to_square(img, 20, "stretch")
    pad = to_square(img, 20, "pad")
    dark_rows = lambda x: int((x[0] < 100).any(dim=1).sum())   # noqa: E731
    # stretching blows the 4-row bar up to 8 rows of 20; letterboxing keeps its 4:30 shape (2 rows of 20)
    assert dark_rows(stretch) >= 7 and dark_rows(pad) <= 3
    cfg = _cfg(20, resize="pad")
    out = build_transforms(cfg, train=False)(img)
    assert out.shape == (3, 20, 20)
    assert torch.allclose(out[:, 0, :], torch.full((3, 20), (200 / 255 - 0.5) / 0.5), atol=0.02)


def test_pad_fill_is_the_mean_of_the_padded_edges():
    img = torch.zeros(3, 6, 2, dtype=torch.uint8)          # tall: padding goes left and right
    img[:, :, 0], img[:, :, 1] = 100, 50
    padded = pad_to_square(img)
    assert padded.shape == (3, 6, 6) and (padded[:, :, 0] == 75).all() and (padded[:, :, 5] == 75).all()


def test_grayscale_repeats_one_channel():
    cfg = _cfg(24, grayscale=True)
    img = torch.zeros(3, 30, 30, dtype=torch.uint8)
    img[0] = 255
    for train in (False, True):
        out = build_transforms(cfg, train)(img)
        assert out.shape == (3, 24, 24)
        assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


def test_randaugment_spec_parsing():
    assert parse_randaugment("rand-m9-n3-mstd0.5") == {"m": 9.0, "n": 3, "mstd": 0.5, "mmax": 10.0, "inc": 1}
    for bad in ("auto-m9", "rand-m11", "rand-x3", "rand-m9-mstd"):
        with pytest.raises(ConfigError, match="augment.randaugment"):
            parse_randaugment(bad)


def test_build_transforms_rejects_bad_settings():
    with pytest.raises(ConfigError, match="data.resize 'squash'"):
        build_transforms(_cfg(32, resize="squash"), False)
    with pytest.raises(ConfigError, match="data.image_size"):
        build_transforms(_cfg(0), False)
    cfg = _cfg(32)
    cfg.augment.scale = (0.9, 0.2)
    with pytest.raises(ConfigError, match="augment.scale"):
        build_transforms(cfg, True)
    with pytest.raises(ConfigError, match="interpolation 'cubic'"):
        build_transforms(_cfg(32), True, interpolation="cubic")
    with pytest.raises(ConfigError, match="std"):
        build_transforms(_cfg(32), True, std=(0.5, 0.0, 0.5))


# --- dataset --------------------------------------------------------------------------------------------

def test_dataset_items(data):
    t = build_transforms(_cfg(16), train=False)
    ds = TaxonDataset(data, data.annotations, t)
    assert len(ds) == 9 and ds.label_index == {"Cod": 0, "Haddock": 1, "Squid": 2}
    item = ds[4]
    assert set(item) == {"image", "target", "index"}
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert item["target"] == 1 and item["index"] == 4
    # colour survives: Haddock is green, (30, 200, 30) ± noise after normalisation with 0.5/0.5
    mean = item["image"].mean(dim=(1, 2))
    assert torch.allclose(mean, torch.tensor([30, 200, 30]) / 127.5 - 1, atol=0.06)


def test_dataset_rows_subset_unlabelled_and_label_index(data):
    rows = data.annotations.iloc[[6, 7]].copy()
    rows.loc[rows.index[1], "label"] = ""
    ds = TaxonDataset(data, rows, build_transforms(_cfg(16), False), label_index={"Squid": 5, "Cod": 0})
    assert [ds[0]["target"], ds[1]["target"]] == [5, -1]
    assert ds[1]["index"] == 1
    with pytest.raises(DataError, match=r"row 2: label 'Cod' is not one of the model's 1 labels"):
        TaxonDataset(data, data.annotations, build_transforms(_cfg(16), False), label_index={"Squid": 0})
    ds = TaxonDataset(data, data.annotations, build_transforms(_cfg(16), False), label_index={"Squid": 0},
                      allow_unknown=True)
    assert ds.targets.tolist() == [-1] * 6 + [0] * 3


def test_dataset_returns_context(tmp_path):
    data = load_dataset(_write_dataset(tmp_path / "ds", context=True))
    t = build_transforms(_cfg(16), train=False)
    ds = TaxonDataset(data, data.annotations, t, with_context=True)
    item = ds[0]
    assert item["context"].shape == (3, 16, 16)
    # context images are the complementary colour of the ROI
    assert torch.allclose(item["context"].mean(dim=(1, 2)), torch.tensor([55, 225, 225]) / 127.5 - 1, atol=0.02)
    small = TaxonDataset(data, data.annotations, t, context_transform=build_transforms(_cfg(8), False),
                         with_context=True)
    assert small[0]["context"].shape == (3, 8, 8)
    # a single-stream model on the context crops
    ctx_only = TaxonDataset(data, data.annotations, t, path_column="context_path")
    assert torch.equal(ctx_only[0]["image"], item["context"]) and "context" not in ctx_only[0]
    with pytest.raises(DataError, match="no 'context_path' column"):
        TaxonDataset(load_dataset(_write_dataset(tmp_path / "plain")), data.annotations[["path", "label"]], t,
                     with_context=True)
    rows = data.annotations.copy()
    rows.loc[2, "context_path"] = ""
    with pytest.raises(DataError, match="row 4: empty context_path"):
        TaxonDataset(data, rows, t, path_column="context_path")


def _corrupt(data, position: int = 4) -> str:
    rel = data.annotations.at[position, "path"]
    (data.root / rel).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return str(data.root / rel)


def test_corrupt_image_is_skipped_and_listed(data):
    bad = _corrupt(data)
    ds = TaxonDataset(data, data.annotations, build_transforms(_cfg(16), False))
    item = ds[4]
    assert set(item) == {"skipped"} and item["skipped"].path == bad
    assert ds.skipped == [SkippedImage(4, bad, item["skipped"].reason)]
    batch = collate([ds[i] for i in range(3, 7)])
    assert batch["image"].shape == (3, 3, 16, 16)
    assert batch["index"].tolist() == [3, 5, 6] and batch["target"].tolist() == [1, 1, 2]
    assert [s.index for s in batch["skipped"]] == [4]


def test_strict_raises_data_error_naming_the_file(data):
    bad = _corrupt(data)
    ds = TaxonDataset(data, data.annotations, build_transforms(_cfg(16), False), strict=True)
    with pytest.raises(DataError, match=str(bad).replace("\\", "\\\\")):
        ds[4]
    loader = build_loader(ds, batch_size=4, train=False, num_workers=0)
    with pytest.raises(DataError, match="cannot decode image"):
        list(loader)


def test_collate_all_skipped_and_context():
    skipped = [{"skipped": SkippedImage(i, f"{i}.jpg", "empty file")} for i in range(2)]
    batch = collate(skipped)
    assert batch["image"].shape[0] == 0 and len(batch["skipped"]) == 2
    items = [{"image": torch.ones(3, 2, 2), "context": torch.zeros(3, 4, 4), "target": 1, "index": 0},
             {"image": torch.ones(3, 2, 2), "context": torch.zeros(3, 4, 4), "target": -1, "index": 1}]
    batch = collate(items + skipped)
    assert batch["context"].shape == (2, 3, 4, 4) and batch["target"].dtype == torch.int64
    assert batch["target"].tolist() == [1, -1] and batch["skipped"][1].path == "1.jpg"


# --- loader ---------------------------------------------------------------------------------------------

def test_loader_without_workers(data):
    bad = _corrupt(data, 0)
    ds = TaxonDataset(data, data.annotations, build_transforms(_cfg(16), True))
    loader = build_loader(ds, batch_size=4, train=True, num_workers=0, seed=1)
    assert loader.drop_last and loader.num_workers == 0
    batches = list(loader)
    assert len(batches) == 2 and all("skipped" not in b for b in batches)
    assert sum(len(b["index"]) for b in batches) in (7, 8)   # 8 drawn; one may be the corrupt image
    list(loader)
    assert [s.path for s in loader.skipped] == [bad]


def test_loader_with_two_workers_is_seeded_and_collects_skips(data):
    bad = _corrupt(data, 2)
    ds = TaxonDataset(data, data.annotations, build_transforms(_cfg(16), True))

    def epoch_of(seed):
        loader = build_loader(ds, batch_size=3, train=True, num_workers=2, seed=seed)
        assert loader.persistent_workers and loader.num_workers == 2
        return loader, [b for b in loader]

    loader, a = epoch_of(7)
    _, b = epoch_of(7)
    _, c = epoch_of(8)
    assert [x["index"].tolist() for x in a] == [x["index"].tolist() for x in b]
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))
    assert [x["index"].tolist() for x in a] != [x["index"].tolist() for x in c]
    assert sorted(i for x in a for i in x["index"].tolist()) == [0, 1, 3, 4, 5, 6, 7, 8]
    assert [s.path for s in ds.skipped] == [bad] and [s.path for s in loader.skipped] == [bad]
    second = [x["index"].tolist() for x in loader]           # next epoch: new order, workers persisted
    assert second != [x["index"].tolist() for x in a]
    loader.close()                                            # workers stopped; the next epoch starts new ones
    assert loader._iterator is None and len(list(loader)) == 3


def test_loader_strict_with_workers_gives_one_line_error(data):
    bad = _corrupt(data, 1)
    ds = TaxonDataset(data, data.annotations, build_transforms(_cfg(16), False), strict=True)
    loader = build_loader(ds, batch_size=3, train=False, num_workers=2)
    with pytest.raises(DataError) as info:
        list(loader)
    assert str(info.value).startswith(bad) and "\n" not in str(info.value)


def test_loader_eval_order_and_small_train_set(data):
    ds = TaxonDataset(data, data.annotations, build_transforms(_cfg(16), False))
    batches = list(build_loader(ds, batch_size=4, train=False, num_workers=0))
    assert [b["index"].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]
    # a train set smaller than a batch still yields one batch
    assert len(list(build_loader(ds, batch_size=32, train=True, num_workers=0))) == 1
    with pytest.raises(ConfigError, match="batch_size"):
        build_loader(ds, batch_size=0, train=True)


def test_loader_sets_epoch_on_a_distributed_sampler(data):
    from torch.utils.data.distributed import DistributedSampler
    ds = TaxonDataset(data, data.annotations, build_transforms(_cfg(16), False))
    sampler = DistributedSampler(ds, num_replicas=2, rank=0, shuffle=True, seed=0)
    loader = build_loader(ds, batch_size=2, train=True, num_workers=0, sampler=sampler)
    first = [i for b in loader for i in b["index"].tolist()]
    second = [i for b in loader for i in b["index"].tolist()]
    assert len(first) == 4 and first != second and sampler.epoch == 1


# --- class balance --------------------------------------------------------------------------------------

def test_class_counts_and_weighted_sampler():
    rows = pd.DataFrame({"label": ["a"] * 6 + ["b"] * 2 + ["", "c"]})
    index = {"a": 0, "b": 1, "c": 2, "d": 3}
    assert class_counts(rows, index).tolist() == [6, 2, 1, 0]
    sampler = make_weighted_sampler(rows, index, num_samples=3000, seed=0)
    drawn = np.bincount(rows["label"].map(index).fillna(-1).to_numpy(int)[list(sampler)] + 1, minlength=4)
    assert drawn[0] == 0                                     # the unlabelled row is never drawn
    assert np.allclose(drawn[1:] / 3000, 1 / 3, atol=0.04)   # each label about equally often
    assert list(make_weighted_sampler(rows, index, seed=3)) == list(make_weighted_sampler(rows, index, seed=3))
    with pytest.raises(DataError, match="label 'z' is not in label_index"):
        class_counts(pd.DataFrame({"label": ["a", "z"]}), index)


# --- cache ----------------------------------------------------------------------------------------------

def test_cache_build_matches_direct_decode_and_is_reused(tmp_path):
    data = load_dataset(_write_dataset(tmp_path / "ds", context=True, fmt="jpg"))
    size = default_cache_size(28, 0.875)
    assert size == 32
    cache = ResizedCache.build(data, data.annotations, tmp_path / "cache", size, workers=2, progress=False)
    assert len(cache) == 18 and cache.array.shape == (18, 32, 32, 3) and cache.array.dtype == np.uint8
    rel = data.annotations.at[3, "path"]
    direct = to_square(read_image(data.root / rel), 32)
    assert (cache.get(rel).int() - direct.int()).abs().max() <= 1
    # a fresh cache is returned as it is, without decoding again
    array_files = sorted(p.name for p in (tmp_path / "cache").glob("images-*.npy"))
    again = ResizedCache.build(data, data.annotations, tmp_path / "cache", size, progress=False)
    assert again.array_name == cache.array_name and len(array_files) == 1

    cfg = _cfg(28)
    t = build_transforms(cfg, False)
    plain = TaxonDataset(data, data.annotations, t, with_context=True)
    cached = TaxonDataset(data, data.annotations, t, with_context=True, cache=again)
    for i in (0, 5):
        a, b = plain[i], cached[i]
        assert (a["image"] - b["image"]).abs().max() < 0.05 and (a["context"] - b["context"]).abs().max() < 0.05


def test_cache_detects_stale_files_and_keeps_other_rows(tmp_path):
    data = load_dataset(_write_dataset(tmp_path / "ds"))
    folder = tmp_path / "cache"
    cache = ResizedCache.build(data, data.annotations.iloc[:6], folder, 16, workers=1, progress=False)
    assert len(cache) == 6
    # change one file: new content, new size, later mtime
    rel = data.annotations.at[1, "path"]
    Image.fromarray(np.full((30, 30, 3), 7, np.uint8)).save(data.root / rel)
    os.utime(data.root / rel, ns=(10**18, 10**18))
    rebuilt = ResizedCache.build(data, data.annotations.iloc[6:], folder, 16, progress=False)
    assert len(rebuilt) == 9                                  # the first six stay, three added
    assert rebuilt.get(rel).float().mean() > 20               # still the old pixels: row 1 not asked for
    rebuilt = ResizedCache.build(data, data.annotations, folder, 16, progress=False)
    assert (rebuilt.get(rel) == 7).all() and len(rebuilt) == 9
    assert len(list(folder.glob("images-*.npy"))) == 1 and not list(folder.glob(".*tmp"))
    other = ResizedCache.build(data, data.annotations, folder, 20, progress=False)   # new size: full rebuild
    assert other.array.shape == (9, 20, 20, 3)


def test_cache_records_corrupt_images_and_dataset_skips_them(tmp_path):
    data = load_dataset(_write_dataset(tmp_path / "ds"))
    bad = _corrupt(data, 5)
    cache = ResizedCache.build(data, data.annotations, tmp_path / "cache", 16, progress=False)
    rel = data.annotations.at[5, "path"]
    assert len(cache) == 8 and rel in cache.failed and rel not in cache
    ds = TaxonDataset(data, data.annotations, build_transforms(_cfg(16), False), cache=cache)
    assert set(ds[5]) == {"skipped"} and ds.skipped[0].path == bad
    strict = TaxonDataset(data, data.annotations, build_transforms(_cfg(16), False), cache=cache, strict=True)
    with pytest.raises(DataError, match="cannot decode"):
        strict[5]
    # the file is repaired: the next build decodes it
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(data.root / rel)
    assert rel in ResizedCache.build(data, data.annotations, tmp_path / "cache", 16, progress=False)


def test_cache_pickles_without_its_array_and_rejects_bad_input(tmp_path):
    import pickle
    data = load_dataset(_write_dataset(tmp_path / "ds"))
    cache = ResizedCache.build(data, data.annotations, tmp_path / "cache", 16, progress=False)
    cache.array  # mapped
    clone = pickle.loads(pickle.dumps(cache))
    assert clone._array is None and torch.equal(clone.get(data.annotations.at[0, "path"]),
                                                cache.get(data.annotations.at[0, "path"]))
    with pytest.raises(DataError, match="no image cache here"):
        ResizedCache.open(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="data.resize"):
        ResizedCache.build(data, data.annotations, tmp_path / "c2", 16, resize="crop")
    with pytest.raises(DataError, match="no 'context_path' column"):
        ResizedCache.build(data, data.annotations, tmp_path / "c2", 16, columns=["context_path"])


def test_cache_in_pad_mode_letterboxes(tmp_path):
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    img = np.full((10, 40, 3), 200, np.uint8)
    img[3:7, 5:35] = 20
    Image.fromarray(img).save(root / "images/eel.png")
    (root / "annotations.csv").write_text("path,label\nimages/eel.png,Cod\n")
    (root / "taxonomy.csv").write_text(TAXONOMY)
    data = load_dataset(root)
    cache = ResizedCache.build(data, data.annotations, tmp_path / "cache", 20, resize="pad", progress=False)
    assert torch.equal(cache.get("images/eel.png"), to_square(read_image(root / "images/eel.png"), 20, "pad"))


# --- device-side helpers (CPU fallback) -------------------------------------------------------------------

def test_decode_batch_cpu_fallback(data, tmp_path):
    Image.fromarray(np.full((10, 12, 3), 40, np.uint8)).save(tmp_path / "a.jpg")
    paths = [tmp_path / "a.jpg", data.root / data.annotations.at[0, "path"]]
    images = decode_jpeg_batch_cuda(paths, "cpu")
    assert images[0].shape == (3, 10, 12) and images[0].device.type == "cpu"
    assert torch.equal(images[1], read_image(paths[1]))
    (tmp_path / "b.jpg").write_bytes(b"junk")
    with pytest.raises(DataError, match="b.jpg"):
        decode_jpeg_batch_cuda([tmp_path / "b.jpg"], "cpu")
    assert decode_jpeg_batch_cuda([tmp_path / "b.jpg", paths[0]], "cpu", strict=False)[0] is None


def test_batch_resize_normalize_matches_eval_transform():
    cfg = _cfg(24)
    cfg.augment.crop_pct = 0.75
    images = [torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8) for _ in range(3)]
    batch = batch_resize_normalize(images, 24, (0.5,) * 3, (0.5,) * 3, crop_pct=0.75, interpolation="bicubic")
    single = build_transforms(cfg, False)
    expected = torch.stack([single(im) for im in images])
    assert batch.shape == (3, 3, 24, 24) and torch.allclose(batch, expected, atol=1e-5)


def test_batch_random_flips_are_per_sample_and_seeded():
    batch = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4).repeat(64, 3, 1, 1)
    out = batch_random_flips(batch, generator=torch.Generator().manual_seed(0))
    again = batch_random_flips(batch, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    # every output is one of the 8 symmetries of the square, and several different ones occur
    symmetries = [torch.rot90(b, k, dims=(-2, -1)) for b in (batch[0], batch[0].flip(-1)) for k in range(4)]
    kinds = {next(j for j, s in enumerate(symmetries) if torch.equal(o, s)) for o in out}
    assert len(kinds) >= 6
    assert torch.equal(batch_random_flips(batch, 0.0, 0.0, False), batch)
