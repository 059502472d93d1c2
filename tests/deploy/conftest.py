"""Shared fixtures of the deployment tests."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def served_run(tmp_path_factory):
    """A tiny calibrated run on synthetic data (6 taxa, one held out as OOD): (run directory, dataset)."""
    from taxonomist.config import load_config
    from taxonomist.data.split import split_dataset
    from taxonomist.data.synth import synthesize
    from taxonomist.inference import calibrate_run
    from taxonomist.train import train

    base = tmp_path_factory.mktemp("serve")
    data, run = base / "synth", base / "run"
    synthesize(data, n_taxa=6, per_class=8, image_size=32, seed=3)
    split_dataset(data, val=0.2, test=0.2, ood_taxa=1, seed=0)
    cfg = load_config(None, [f"data.root={data}", f"out={run}", "data.image_size=32", "data.num_workers=0",
                             "model.backbone=test_efficientnet", "model.pretrained=none", "train.batch_size=8",
                             "train.epochs=1", "train.lr=3e-3", "train.device=cpu", "train.tensorboard=false",
                             "augment.randaugment=", "train.seed=0"])
    train(cfg, progress=False, log=lambda *_: None)
    calibrate_run(run, device="cpu", num_workers=0)
    return run, data


@pytest.fixture(scope="session")
def two_stream_run(tmp_path_factory):
    """A tiny two-stream run trained on what `data prepare --context 1,3 --format png` cut from synthetic frames
    (two organisms per 112×84 PNG frame, one box of each frame running off its edge, one with fractional
    coordinates): (run, prepared dataset, frames folder, {annotation_id: (frame file, COCO bbox)})."""
    import json

    import numpy as np
    import pandas as pd
    from PIL import Image

    from taxonomist.config import load_config
    from taxonomist.data.coco import prepare_coco
    from taxonomist.data.split import split_dataset
    from taxonomist.data.synth import synthesize
    from taxonomist.train import train

    base = tmp_path_factory.mktemp("serve_two")
    synth, frames, data, run = base / "synth", base / "frames", base / "prepared", base / "run"
    synthesize(synth, n_taxa=4, per_class=8, image_size=32, seed=5, context=False)
    rows = pd.read_csv(synth / "annotations.csv", keep_default_na=False)
    labels = sorted(set(rows["label"]))
    rng = np.random.default_rng(0)
    frames.mkdir()
    images, annotations, boxes = [], [], {}
    for f, start in enumerate(range(0, len(rows), 2)):
        frame = rng.integers(40, 90, (84, 112, 3), dtype=np.uint8)
        file_name = f"dive{f % 2}/frame{f:02d}.png"
        for k, row in enumerate(rows.iloc[start:start + 2].itertuples()):
            roi = np.asarray(Image.open(synth / row.path).convert("RGB"))
            x, y = (2, 10) if k == 0 else (70 + f % 5, 44)
            frame[y:y + 32, x:x + 32] = roi
            ann_id = 100 + start + k
            bbox = [-3.0, 6.0, 38.0, 39.0] if k == 0 else [x - 1.5, 42.25, 35.0, 36.5]
            annotations.append({"id": ann_id, "image_id": f, "bbox": bbox, "category_id": labels.index(row.label)})
            boxes[str(ann_id)] = (file_name, bbox)
        (frames / file_name).parent.mkdir(exist_ok=True)
        Image.fromarray(frame).save(frames / file_name)
        images.append({"id": f, "file_name": file_name, "width": 112, "height": 84})
    coco = base / "coco.json"
    coco.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": i, "name": n} for i, n in enumerate(labels)]}))
    prepare_coco(coco, frames, data, context="1,3", taxonomy=synth / "taxonomy.csv", image_format="png",
                 workers=1)
    split_dataset(data, val=0.25, test=0.25, seed=0)
    cfg = load_config(None, [f"data.root={data}", f"out={run}", "data.image_size=32", "data.num_workers=0",
                             "model.backbone=test_efficientnet", "model.pretrained=none", "model.head=two_stream",
                             "train.batch_size=8", "train.epochs=4", "train.lr=2e-2", "train.device=cpu",
                             "train.tensorboard=false", "augment.randaugment=", "train.seed=0"])
    train(cfg, progress=False, log=lambda *_: None)
    return run, data, frames, boxes
