"""BioCLIP without the network: lineage prompts, zero-shot logits and the open_clip image encoder as a backbone,
on a tiny randomly initialised open_clip model registered from a config dict."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from taxonomist.cli.main import main
from taxonomist.errors import ConfigError, ModelError
from taxonomist.models.bioclip import (ZeroShotClassifier, create_open_clip, lineage_prompts, register_open_clip_config,
                                       taxonomic_name)
from taxonomist.models.backbones import backbone_blocks, create_backbone

TINY = "taxonomist-test-clip"
TINY_CONFIG = {"embed_dim": 16,
               "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
               "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module", autouse=True)
def tiny_clip():
    register_open_clip_config(TINY, TINY_CONFIG)


def test_taxonomic_name_follows_bioclip(ranked_taxonomy):
    assert taxonomic_name(ranked_taxonomy, "Sebastes alutus") == "Animalia Chordata Sebastes alutus"
    assert taxonomic_name(ranked_taxonomy, "Actinia") == "Animalia Cnidaria Actinia"
    prompts = lineage_prompts(ranked_taxonomy, templates=["a photo of {}.", "{}"])
    assert prompts[0] == ["a photo of Animalia Chordata Sebastes alutus.", "Animalia Chordata Sebastes alutus"]
    with pytest.raises(ConfigError, match="must contain"):
        lineage_prompts(ranked_taxonomy, templates=["a photo"])


def test_taxonomic_name_skips_unranked_ancestors_but_names_the_node():
    from taxonomist.taxonomy import Taxonomy
    parent_of = {"Animalia": None, "Chordata": "Animalia", "Tunicata": "Chordata", "Ascidiacea": "Tunicata",
                 "Pyura": "Ascidiacea", "Pyura spinifera": "Pyura"}
    ranks = {"Animalia": "kingdom", "Chordata": "phylum", "Tunicata": None, "Ascidiacea": "class",
             "Pyura": "genus", "Pyura spinifera": "species"}
    tax = Taxonomy.from_parents(parent_of, labels=["Pyura spinifera", "Tunicata"], ranks=ranks)
    assert taxonomic_name(tax, "Pyura spinifera") == "Animalia Chordata Ascidiacea Pyura spinifera"
    assert taxonomic_name(tax, "Tunicata") == "Animalia Chordata Tunicata"
    # a parent table without ranks: every node of the lineage
    flat = Taxonomy.from_parents({"Plankton": None, "Diatoms": "Plankton", "Chaetoceros": "Diatoms"})
    assert taxonomic_name(flat, "Chaetoceros") == "Plankton Diatoms Chaetoceros"


def test_zero_shot_logits_are_scaled_cosines(ranked_taxonomy):
    torch.manual_seed(0)
    model, tokenizer, pre = create_open_clip(TINY, pretrained="none")
    assert pre["image_size"] == 32 and len(pre["mean"]) == 3
    prompts = lineage_prompts(ranked_taxonomy, templates=["a photo of {}.", "a {} in the sea."])
    clf = ZeroShotClassifier(model, tokenizer, prompts)
    image = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        out = clf(image)
        img = torch.nn.functional.normalize(model.encode_image(image), dim=-1)
        text = torch.stack([torch.nn.functional.normalize(
            torch.nn.functional.normalize(model.encode_text(tokenizer(p)), dim=-1).mean(0), dim=0) for p in prompts])
        expected = model.logit_scale.exp() * img @ text.T
    assert out["logits"].shape == (3, 3) and out["features"].shape == (3, 16)
    np.testing.assert_allclose(out["logits"].numpy(), expected.numpy(), atol=1e-4)


def test_open_clip_image_encoder_is_a_backbone(tmp_path):
    bb = create_backbone(f"open_clip:{TINY}", image_size=32, pretrained="none")
    assert bb.kind == "open_clip" and bb.num_features == 16
    assert bb.module(torch.rand(2, 3, 32, 32)).shape == (2, 16)
    assert len(backbone_blocks(bb.module)) == 2          # last_n fine-tuning and layer-wise decay find the blocks
    with pytest.raises(ModelError, match="unknown open_clip model"):
        create_backbone("open_clip:no-such-clip", image_size=32)


def test_hub_unreachable_is_one_clear_error(monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network in CI: fail fast
    with pytest.raises(ModelError, match="cannot load hf-hub:imageomics/bioclip from the Hugging Face hub"):
        create_open_clip("hf-hub:imageomics/bioclip", pretrained="auto")


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory):
    from taxonomist.data.split import split_dataset
    from taxonomist.data.synth import synthesize
    data = tmp_path_factory.mktemp("bioclip") / "data"
    synthesize(data, n_taxa=6, per_class=6, image_size=32, seed=3)
    split_dataset(data, val=0.2, test=0.3, ood_taxa=1, seed=0)
    return data


def test_cli_bioclip_baseline_writes_a_run_directory(synth_data, tmp_path, capsys):
    out = tmp_path / "bioclip"
    assert main(["baseline", "bioclip", "--model", TINY, "--pretrained", "none", "--data", str(synth_data),
                 "--out", str(out), "--device", "cpu", "--num-workers", "0", "--no-report"]) == 0
    assert "zero-shot" in capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    for key in ("mhd", "top1", "log_loss", "macro_f1", "hierarchical_accuracy", "per_rank", "ece", "n"):
        assert key in m
    assert m["baseline"]["kind"] == "bioclip" and m["baseline"]["example_prompts"][0].startswith("a photo of ")
    assert (out / "config.yaml").read_text().startswith("# bioclip baseline")
    assert {"msp", "energy"} <= set(m["ood"]) and (out / "predictions.csv").is_file()


def test_bioclip_backbone_fine_tunes_and_reloads(synth_data, tmp_path):
    from taxonomist.config import load_config
    from taxonomist.train import train
    from taxonomist.train.checkpoint import load_checkpoint

    run = tmp_path / "run"
    cfg = load_config(None, [f"data.root={synth_data}", f"out={run}", "data.image_size=32", "data.num_workers=0",
                             f"model.backbone=open_clip:{TINY}", "model.pretrained=none", "train.batch_size=8",
                             "train.epochs=1", "train.device=cpu", "train.tensorboard=false", "augment.randaugment=",
                             "model.finetune=last_n", "model.last_n_blocks=1"])
    train(cfg, progress=False, log=lambda *_: None)
    model, meta, _ = load_checkpoint(run, device="cpu")
    assert meta["backbone"] == f"open_clip:{TINY}"
    assert model(torch.rand(2, 3, 32, 32))["logits"].shape == (2, len(meta["labels"]))
