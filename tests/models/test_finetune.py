"""Fine-tuning modes (linear probe, last N blocks, LoRA, full) and optimizer parameter groups."""
import pytest
import timm
import torch
from torch import nn

from taxonomist.config import LoraConfig, ModelConfig
from taxonomist.errors import ConfigError, ModelError
from taxonomist.models import build_model


def cfg(**kw) -> ModelConfig:
    kw.setdefault("backbone", "test_efficientnet")
    kw.setdefault("pretrained", "none")
    return ModelConfig(**kw)


def trainable_prefixes(model, depth=3):
    return sorted({".".join(n.split(".")[:depth]) for n, p in model.named_parameters() if p.requires_grad})


def bn_buffers(module):
    return {n: b.clone() for n, b in module.named_buffers() if "running" in n}


def test_linear_probe_trains_only_the_head_and_keeps_bn_statistics(ranked_taxonomy):
    model = build_model(cfg(finetune="linear"), ranked_taxonomy, image_size=32)
    assert trainable_prefixes(model, 2) == ["head.fc"]
    assert model.trainable_parameter_count() == 256 * 3 + 3
    model.train()
    assert model.training and model.head.training
    assert not any(m.training for m in model.backbone.modules())
    before = bn_buffers(model.backbone)
    weights_before = model.backbone.conv_stem.weight.clone()
    opt = torch.optim.SGD(model.param_groups(lr=0.1, weight_decay=0.0))
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32) * 3 + 1)["logits"], torch.tensor([0, 1, 2, 0]))
    loss.backward()
    opt.step()
    after = bn_buffers(model.backbone)
    assert before.keys() == after.keys() and len(before) > 0
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(model.backbone.conv_stem.weight, weights_before)
    assert model.head.fc.weight.grad.abs().sum() > 0


def test_full_finetune_updates_bn_statistics(ranked_taxonomy):
    model = build_model(cfg(finetune="full"), ranked_taxonomy, image_size=32).train()
    before = bn_buffers(model.backbone)
    model(torch.randn(4, 3, 32, 32) * 3 + 1)
    after = bn_buffers(model.backbone)
    assert not torch.equal(before["bn1.running_mean"], after["bn1.running_mean"])
    assert model.trainable_parameter_count() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("backbone, n, expected", [
    ("test_efficientnet", 2, ["backbone.blocks.3", "backbone.blocks.4", "backbone.bn2", "backbone.conv_head",
                              "head.fc"]),
    ("test_convnext", 1, ["backbone.head.norm", "backbone.stages.3", "head.fc"]),
    ("test_vit", 2, ["backbone.blocks.4", "backbone.blocks.5", "backbone.norm", "head.fc"]),
])
def test_last_n_unfreezes_the_last_blocks_and_what_follows(ranked_taxonomy, backbone, n, expected):
    model = build_model(cfg(backbone=backbone, finetune="last_n", last_n_blocks=n), ranked_taxonomy, image_size=32)
    got = sorted({".".join(name.split(".")[:3]) if name.split(".")[1] in ("blocks", "stages", "head")
                  else ".".join(name.split(".")[:2])
                  for name, p in model.named_parameters() if p.requires_grad})
    assert got == expected


def test_last_n_freezes_bn_statistics_only_in_frozen_blocks(ranked_taxonomy):
    model = build_model(cfg(finetune="last_n", last_n_blocks=1), ranked_taxonomy, image_size=32).train()
    before = bn_buffers(model.backbone)
    model(torch.randn(4, 3, 32, 32) * 3 + 1)
    after = bn_buffers(model.backbone)
    changed = {k.rsplit(".", 1)[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"blocks.4.0.bn1", "blocks.4.0.bn2", "blocks.4.0.bn3", "bn2"}


def test_last_n_out_of_range(ranked_taxonomy):
    with pytest.raises(ConfigError, match=r"model.last_n_blocks=9: backbone test_efficientnet has 5 blocks"):
        build_model(cfg(finetune="last_n", last_n_blocks=9), ranked_taxonomy, image_size=32)


def test_lora_counts_and_gradients(ranked_taxonomy):
    lora = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["qkv", "fc2"])
    model = build_model(cfg(backbone="test_vit", finetune="lora", lora=lora), ranked_taxonomy, image_size=32)
    plain = timm.create_model("test_vit", num_classes=0, img_size=32)
    targeted = [m for n, m in plain.named_modules() if n.endswith((".qkv", ".fc2"))]
    assert len(targeted) == 12 and model.lora_layers == 12
    expected = sum(4 * (m.in_features + m.out_features) for m in targeted) + 64 * 3 + 3
    assert model.trainable_parameter_count() == expected

    model.train()
    loss = nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32))["logits"], torch.tensor([0, 2]))
    loss.backward()
    for name, p in model.named_parameters():
        is_adapter_or_head = "lora_" in name or name.startswith("head.")
        assert p.requires_grad == is_adapter_or_head, name
        assert (p.grad is not None) == is_adapter_or_head, name
    # B starts at zero, so the adapted model starts exactly as the plain one; A then learns through B
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert all(float(p.detach().abs().sum()) == 0 for p in lora_b)
    assert any(float(p.grad.abs().sum()) > 0 for p in lora_b)


def test_lora_starts_as_the_plain_model(ranked_taxonomy):
    torch.manual_seed(0)
    plain = build_model(cfg(backbone="test_efficientnet"), ranked_taxonomy, image_size=32).eval()
    torch.manual_seed(0)
    adapted = build_model(cfg(backbone="test_efficientnet", finetune="lora", lora=LoraConfig(r=2)),
                          ranked_taxonomy, image_size=32).eval()
    assert adapted.lora_layers == 6  # conv_pw ×2 and conv_pwl ×4 in test_efficientnet
    adapted.train()  # frozen BatchNorm layers keep their statistics under LoRA too
    assert not any(m.training for m in adapted.backbone.modules() if isinstance(m, nn.BatchNorm2d))
    adapted.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(plain(x)["logits"], adapted(x)["logits"], atol=1e-6)


def test_lora_errors(ranked_taxonomy):
    no_match = r"match no Linear/Conv layer of backbone test_vit; its layers are named .*qkv"
    with pytest.raises(ModelError, match=no_match):
        build_model(cfg(backbone="test_vit", finetune="lora", lora=LoraConfig(r=4, target_modules=["q_proj"])),
                    ranked_taxonomy, image_size=32)
    with pytest.raises(ConfigError, match="model.finetune=lora needs model.lora.r"):
        build_model(cfg(finetune="lora"), ranked_taxonomy, image_size=32)
    with pytest.raises(ConfigError, match="model.lora.r=4 only applies with model.finetune=lora"):
        build_model(cfg(finetune="full", lora=LoraConfig(r=4)), ranked_taxonomy, image_size=32)


def test_param_groups_head_lr_layer_decay_and_no_weight_decay(ranked_taxonomy):
    model = build_model(cfg(), ranked_taxonomy, image_size=32)  # 5 blocks: layers 0 (stem) … 6 (conv_head)
    groups = model.param_groups(lr=1e-3, head_lr=1e-2, layer_decay=0.5, weight_decay=0.05)
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters()) and len(seen) == len(set(seen))
    by_name = {g["name"]: g for g in groups}
    for k in range(7):
        assert by_name[f"backbone.layer{k}.no_decay"]["lr"] == pytest.approx(1e-3 * 0.5 ** (6 - k))
    assert by_name["backbone.layer0"]["params"][0] is model.backbone.conv_stem.weight
    assert by_name["head"]["lr"] == 1e-2 and by_name["head"]["params"] == [model.head.fc.weight]
    assert by_name["head.no_decay"]["params"] == [model.head.fc.bias]
    for g in groups:
        assert g["weight_decay"] == (0.0 if g["name"].endswith("no_decay") else 0.05)
        assert all((p.ndim <= 1) == g["name"].endswith("no_decay") for p in g["params"])

    flat = model.param_groups(lr=1e-3)
    assert [(g["name"], g["lr"]) for g in flat] == [("backbone", 1e-3), ("backbone.no_decay", 1e-3),
                                                   ("head", 1e-3), ("head.no_decay", 1e-3)]
    torch.optim.AdamW(flat)  # the groups are what AdamW takes


def test_param_groups_follow_timm_no_weight_decay_and_frozen_params(ranked_taxonomy):
    model = build_model(cfg(backbone="test_vit"), ranked_taxonomy, image_size=32)
    groups = model.param_groups(lr=1e-3, weight_decay=0.1)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(model.backbone.pos_embed) in no_decay and id(model.backbone.cls_token) in no_decay

    probe = build_model(cfg(finetune="linear"), ranked_taxonomy, image_size=32)
    assert [g["name"] for g in probe.param_groups(lr=1e-3, layer_decay=0.7)] == ["head", "head.no_decay"]
    with pytest.raises(ConfigError, match="train.lr must be > 0"):
        model.param_groups(lr=0.0)
    with pytest.raises(ConfigError, match=r"train.layer_decay must be in \[0, 1\]"):
        model.param_groups(lr=1e-3, layer_decay=1.5)


def test_two_backbones_are_both_frozen_for_a_probe(ranked_taxonomy):
    model = build_model(cfg(head="two_stream", shared_backbone=False, finetune="linear"), ranked_taxonomy, 32)
    assert trainable_prefixes(model, 3) == ["head.heads.context", "head.heads.roi"]
    model.train()
    assert not model.backbone.training and not model.context_backbone.training
