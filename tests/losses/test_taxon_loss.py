"""`TaxonLoss` / `build_loss`: terms per config, multirank levels, consistency, two-stream, soft targets."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from taxonomist.config import LossConfig
from taxonomist.errors import ConfigError, DataError, ModelError
from taxonomist.losses import STREAM_WEIGHT, TaxonLoss, build_loss
from taxonomist.taxonomy import Taxonomy, lca_distance

torch.set_num_threads(1)


@pytest.fixture
def tax():
    # R ─ G1 ─ A, B ;  R ─ G2 ─ C ; G2 is itself a label (a genus-level annotation)
    return Taxonomy.from_parents({"R": None, "G1": "R", "G2": "R", "A": "G1", "B": "G1", "C": "G2"},
                                 labels=["A", "B", "C", "G2"])


@pytest.fixture
def dist(tax):
    return lca_distance(tax)


def _outputs(seed=0, batch=3, rank=True, streams=False, grad=False):
    g = torch.Generator().manual_seed(seed)
    out = {"logits": torch.randn(batch, 4, generator=g)}
    if rank:
        out["rank_logits"] = {"depth1": torch.randn(batch, 2, generator=g),
                              "depth2": torch.randn(batch, 3, generator=g)}
    if streams:
        out["stream_logits"] = {"roi": torch.randn(batch, 4, generator=g),
                                "context": torch.randn(batch, 4, generator=g)}
    if grad:
        for t in _tensors(out):
            t.requires_grad_(True)
    return out


def _tensors(out):
    yield out["logits"]
    for key in ("rank_logits", "stream_logits"):
        yield from out.get(key, {}).values()


def test_fixture_distance_and_levels(tax, dist):
    np.testing.assert_array_equal(dist, [[0, 2, 4, 3], [2, 0, 4, 3], [4, 4, 0, 1], [3, 3, 1, 0]])
    assert [lv.name for lv in tax.levels()] == ["depth1", "depth2"]
    assert tax.levels()[1].label_to_node.tolist() == [0, 1, 2, -1]


def test_ce_with_distance_term_matches_hand_computation(tax, dist):
    loss = build_loss(LossConfig(name="ce", label_smoothing=0.1, distance_weight=0.5), tax, dist)
    out = _outputs(rank=False)
    target = torch.tensor([0, 3, 1])
    total, parts = loss(out, target)
    ce = F.cross_entropy(out["logits"], target, label_smoothing=0.1)
    p = out["logits"].softmax(dim=1)
    d = torch.tensor(dist, dtype=torch.float32) / 4.0  # normalised by max D
    distance = (p * d[target]).sum(dim=1).mean()
    assert parts["ce"] == pytest.approx(float(ce), rel=1e-6)
    assert parts["distance"] == pytest.approx(float(distance), rel=1e-6)
    assert parts["total"] == pytest.approx(float(ce + 0.5 * distance), rel=1e-6)
    assert float(total) == pytest.approx(parts["total"])
    assert all(isinstance(v, float) for v in parts.values())
    assert set(parts) == {"ce", "distance", "total"}


def test_class_weights_scale_each_sample(tax, dist):
    counts = np.array([1, 3, 4, 0])
    cfg = LossConfig(name="ce", label_smoothing=0.0, class_weights="inverse")
    loss = build_loss(cfg, tax, dist, counts)
    w = torch.tensor([1.894737, 0.631579, 0.473684, 1.0])
    torch.testing.assert_close(loss.class_weight, w, atol=1e-6, rtol=0)
    out = _outputs(rank=False)
    target = torch.tensor([0, 2, 3])
    per_sample = F.cross_entropy(out["logits"], target, reduction="none")
    _, parts = loss(out, target)
    assert parts["ce"] == pytest.approx(float((per_sample * w[target]).mean()), rel=1e-5)
    # effective numbers go through the same door
    eff = build_loss(LossConfig(class_weights="effective", effective_beta=0.9), tax, dist, counts)
    torch.testing.assert_close(eff.class_weight, torch.tensor([1.807462, 0.666960, 0.525578, 1.0]),
                               atol=1e-6, rtol=0)


def test_focal_and_soft_label_names(tax, dist):
    out = _outputs(rank=False)
    target = torch.tensor([0, 3, 1])
    focal = build_loss(LossConfig(name="focal", focal_gamma=0.0, focal_alpha=0.5, label_smoothing=0.1), tax, dist)
    _, parts = focal(out, target)
    ce = F.cross_entropy(out["logits"], target, label_smoothing=0.1)
    assert parts["focal"] == pytest.approx(0.5 * float(ce), rel=1e-6)

    soft = build_loss(LossConfig(name="soft_labels", soft_label_temperature=2.0), tax, dist)
    _, parts = soft(out, target)
    q = np.exp(-dist / 2.0)
    q /= q.sum(axis=1, keepdims=True)
    logp = torch.log_softmax(out["logits"], dim=1).numpy()
    assert parts["soft_labels"] == pytest.approx(float(-(q[target.numpy()] * logp).sum(axis=1).mean()), rel=1e-5)


def test_multirank_terms_ignore_labels_without_a_node_and_match_torch(tax, dist):
    cfg = LossConfig(name="ce", label_smoothing=0.1, rank_weights={"depth2": 2.0}, consistency_weight=0.3)
    loss = build_loss(cfg, tax, dist)
    out = _outputs()
    target = torch.tensor([0, 3, 2])  # A, G2 (no node at depth2), C
    _, parts = loss(out, target)
    # depth1 nodes (G1, G2): A→G1, G2→G2, C→G2 ; depth2 nodes (A, B, C): G2 → ignored
    r1 = F.cross_entropy(out["rank_logits"]["depth1"], torch.tensor([0, 1, 1]), label_smoothing=0.1)
    r2 = F.cross_entropy(out["rank_logits"]["depth2"], torch.tensor([0, -1, 2]), ignore_index=-1,
                         label_smoothing=0.1)
    assert parts["rank/depth1"] == pytest.approx(float(r1), rel=1e-6)
    assert parts["rank/depth2"] == pytest.approx(float(r2), rel=1e-6)
    expected_total = (parts["ce"] + parts["rank/depth1"] + 2.0 * parts["rank/depth2"]
                      + 0.3 * parts["consistency"])
    assert parts["total"] == pytest.approx(expected_total, rel=1e-6)
    # a batch with no sample at a level contributes exactly 0 there
    _, parts = loss(_outputs(batch=1), torch.tensor([3]))
    assert parts["rank/depth2"] == 0.0


def test_multirank_class_weights_apply_per_sample_at_each_level(tax, dist):
    counts = np.array([1, 3, 4, 2])
    loss = build_loss(LossConfig(label_smoothing=0.0, class_weights="inverse"), tax, dist, counts)
    out = _outputs()
    target = torch.tensor([0, 3, 2])
    _, parts = loss(out, target)
    w = loss.class_weight[target]
    per = F.cross_entropy(out["rank_logits"]["depth2"], torch.tensor([0, -1, 2]), ignore_index=-1, reduction="none")
    # Σ w_i CE_i over the two samples with a node, divided by their count
    assert parts["rank/depth2"] == pytest.approx(float((w[0] * per[0] + w[2] * per[2]) / 2), rel=1e-6)


def test_consistency_is_zero_when_heads_agree_and_a_kl_otherwise(tax, dist):
    loss = build_loss(LossConfig(), tax, dist)
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]])
    agree = {"logits": p.log(), "rank_logits": {
        "depth1": torch.stack([p[:, 0] + p[:, 1], p[:, 2] + p[:, 3]], dim=1).log(),
        # depth2 has no node for G2: the head agrees with p renormalised over A, B, C
        "depth2": (p[:, :3] / p[:, :3].sum(dim=1, keepdim=True)).log() + 5.0}}
    _, parts = loss(agree, torch.tensor([0, 1]))
    assert abs(parts["consistency"]) < 1e-6

    # one sample, one level: label head aggregates to (0.5, 0.5), level head says (0.8, 0.2)
    level = next(lv for lv in tax.levels() if lv.name == "depth1")
    single = TaxonLoss(dist, levels=[level])
    out = {"logits": torch.tensor([[0.25, 0.25, 0.0, 0.5]]).clamp(min=1e-30).log(),
           "rank_logits": {"depth1": torch.tensor([[0.8, 0.2]]).log()}}
    _, parts = single(out, torch.tensor([0]))
    assert parts["consistency"] == pytest.approx(0.8 * math.log(1.6) + 0.2 * math.log(0.4), rel=1e-5)


def test_consistency_skips_samples_whose_probability_has_no_node_at_the_level(tax, dist):
    level = next(lv for lv in tax.levels() if lv.name == "depth2")
    loss = TaxonLoss(dist, levels=[level])
    # sample 1 puts all its probability on G2, which has no depth2 node: it carries no weight there
    logits = torch.tensor([[0.0, 0.0, 0.0, -80.0], [-80.0, -80.0, -80.0, 0.0]])
    level_logits = torch.tensor([[0.0, 0.0, 0.0], [9.0, -9.0, 0.0]])
    _, parts = loss({"logits": logits, "rank_logits": {"depth2": level_logits}}, torch.tensor([0, 3]))
    assert abs(parts["consistency"]) < 1e-6


def test_two_stream_aux_terms(tax, dist):
    loss = build_loss(LossConfig(name="ce", label_smoothing=0.1, distance_weight=1.0), tax, dist)
    out = _outputs(rank=False, streams=True)
    target = torch.tensor([0, 1, 2])
    _, parts = loss(out, target)
    roi = F.cross_entropy(out["stream_logits"]["roi"], target, label_smoothing=0.1)
    ctx = F.cross_entropy(out["stream_logits"]["context"], target, label_smoothing=0.1)
    assert parts["stream/roi"] == pytest.approx(float(roi), rel=1e-6)
    assert parts["stream/context"] == pytest.approx(float(ctx), rel=1e-6)
    assert STREAM_WEIGHT == 0.5
    assert parts["total"] == pytest.approx(parts["ce"] + parts["distance"] + 0.5 * (float(roi) + float(ctx)), rel=1e-6)


@pytest.mark.parametrize("name", ["ce", "focal", "soft_labels"])
def test_one_hot_soft_targets_give_the_hard_target_loss(tax, dist, name):
    cfg = LossConfig(name=name, distance_weight=0.7, class_weights="effective", effective_beta=0.9)
    loss = build_loss(cfg, tax, dist, np.array([1, 3, 4, 2]))
    out = _outputs(rank=True, streams=True)
    hard = torch.tensor([0, 3, 2])
    _, parts_hard = loss(out, hard)
    _, parts_soft = loss(out, F.one_hot(hard, 4).float())
    assert parts_hard.keys() == parts_soft.keys()
    for key in parts_hard:
        assert parts_soft[key] == pytest.approx(parts_hard[key], rel=1e-5, abs=1e-7), key


def test_mixup_target_mixes_the_supervised_terms(tax, dist):
    cfg = LossConfig(name="ce", label_smoothing=0.0, distance_weight=1.0, consistency_weight=0.0)
    loss = build_loss(cfg, tax, dist)
    out = _outputs(batch=1)
    a, b = loss(out, torch.tensor([0]))[1], loss(out, torch.tensor([2]))[1]
    _, mixed = loss(out, torch.tensor([[0.3, 0.0, 0.7, 0.0]]))
    # CE and the expected distance are linear in the target
    for key in ("ce", "distance", "rank/depth1", "rank/depth2"):
        assert mixed[key] == pytest.approx(0.3 * a[key] + 0.7 * b[key], rel=1e-5), key
    # half of this target (G2) has no depth2 node: depth2 only sees the A part, at full weight
    _, half = loss(out, torch.tensor([[0.5, 0.0, 0.0, 0.5]]))
    assert half["rank/depth2"] == pytest.approx(a["rank/depth2"], rel=1e-5)


@pytest.mark.parametrize("cfg", [
    LossConfig(name="ce", distance_weight=1.0, class_weights="inverse"),
    LossConfig(name="focal", focal_gamma=0.5, distance_weight=0.3),
    LossConfig(name="soft_labels", distance_weight=0.3, rank_weights={"depth1": 0.5}),
])
def test_every_term_backpropagates_finite_gradients(tax, dist, cfg):
    loss = build_loss(cfg, tax, dist, np.array([2, 1, 1, 3]))
    out = _outputs(rank=True, streams=True, grad=True)
    with torch.no_grad():
        out["logits"][0, 0] = 80.0  # a near-certain sample
    total, parts = loss(out, torch.tensor([0, 3, 1]))
    total.backward()
    for t in _tensors(out):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
    assert math.isfinite(parts["total"])


def test_bf16_autocast_logits_get_a_float32_loss(tax, dist):
    loss = build_loss(LossConfig(distance_weight=1.0), tax, dist)
    out = _outputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf = {"logits": out["logits"].bfloat16(),
              "rank_logits": {k: v.bfloat16() for k, v in out["rank_logits"].items()}}
        total, _ = loss(bf, torch.tensor([0, 3, 2]))
    assert total.dtype == torch.float32


def test_ranked_taxonomy_levels_and_rank_weights():
    tax = Taxonomy.from_parents({"Fungi": None, "Amanita": "Fungi", "Boletus": "Fungi", "A. muscaria": "Amanita",
                                 "A. phalloides": "Amanita", "B. edulis": "Boletus"},
                                ranks={"Fungi": "kingdom", "Amanita": "genus", "Boletus": "genus",
                                       "A. muscaria": "species", "A. phalloides": "species", "B. edulis": "species"})
    d = lca_distance(tax)
    loss = build_loss(LossConfig(rank_weights={"genus": 2.0}), tax, d)
    assert loss.rank_weights == {"kingdom": 1.0, "genus": 2.0, "species": 1.0}
    with pytest.raises(ConfigError, match="unknown level 'family'; levels are kingdom, genus, species"):
        build_loss(LossConfig(rank_weights={"family": 1.0}), tax, d)


def test_configuration_errors_are_one_line(tax, dist):
    with pytest.raises(ConfigError, match="unknown loss.name 'hinge'; choose one of ce, focal, soft_labels"):
        build_loss(LossConfig(name="hinge"), tax, dist)
    with pytest.raises(ConfigError, match="choose one of none, inverse, effective"):
        build_loss(LossConfig(class_weights="sqrt"), tax, dist, np.ones(4))
    with pytest.raises(ConfigError, match="needs the training class counts"):
        build_loss(LossConfig(class_weights="inverse"), tax, dist)
    with pytest.raises(ConfigError, match="3×3 but there are 4 labels"):
        build_loss(LossConfig(), tax, dist[:3, :3])
    with pytest.raises(ConfigError, match="distance_weight must be a finite number >= 0"):
        build_loss(LossConfig(distance_weight=-1.0), tax, dist)
    with pytest.raises(ConfigError, match="rank_weights.depth1 must be"):
        build_loss(LossConfig(rank_weights={"depth1": -0.5}), tax, dist)
    with pytest.raises(ConfigError, match=r"class counts have shape \(3,\)"):
        build_loss(LossConfig(class_weights="inverse"), tax, dist, np.ones(3))
    with pytest.raises(ConfigError) as info:
        build_loss(LossConfig(name="x"), tax, dist)
    assert "\n" not in str(info.value)


def test_forward_errors_name_the_output(tax, dist):
    loss = build_loss(LossConfig(), tax, dist)
    with pytest.raises(ModelError, match="'logits' entry"):
        loss({"scores": torch.zeros(2, 4)}, torch.tensor([0, 1]))
    with pytest.raises(ModelError, match="logits has 5 columns but there are 4 classes"):
        loss({"logits": torch.zeros(2, 5)}, torch.tensor([0, 1]))
    with pytest.raises(ModelError, match="unknown level 'genus'"):
        loss({"logits": torch.zeros(2, 4), "rank_logits": {"genus": torch.zeros(2, 2)}}, torch.tensor([0, 1]))
    with pytest.raises(ModelError, match=r"rank_logits\['depth2'\] has 2 columns"):
        loss({"logits": torch.zeros(2, 4), "rank_logits": {"depth2": torch.zeros(2, 2)}}, torch.tensor([0, 1]))
    with pytest.raises(DataError, match="index 4 is out of range"):
        loss({"logits": torch.zeros(2, 4)}, torch.tensor([0, 4]))
