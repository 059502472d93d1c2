"""BioCLIP (and any open_clip model): zero-shot classification over a taxonomy's labels from lineage prompts,
and its image encoder as a backbone for fine-tuning (`model.backbone: open_clip:hf-hub:imageomics/bioclip`).

Needs the optional extra `[bioclip]` (open-clip-torch). Weights come from the Hugging Face hub.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from taxonomist.errors import ConfigError, ModelError
from taxonomist.taxonomy import Taxonomy

BIOCLIP = "hf-hub:imageomics/bioclip"
OPEN_CLIP_PREFIX = "open_clip:"
#: BioCLIP's training text type "taxonomic" in the CLIP template (Stevens et al. 2024, "a photo of" + the
#: names from kingdom to species epithet).
DEFAULT_TEMPLATE = "a photo of {}."


def _open_clip():
    try:
        import open_clip
    except ImportError:
        raise ModelError("BioCLIP needs open-clip-torch: pip install 'taxonomist[bioclip]'") from None
    return open_clip


def register_open_clip_config(name: str, config: dict) -> None:
    """Make `config` (open_clip's model JSON as a dict: embed_dim, vision_cfg, text_cfg) buildable as `name`,
    e.g. a tiny randomly initialised CLIP for tests or an architecture shipped with a private checkpoint."""
    _open_clip()
    if not isinstance(config, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(config):
        raise ConfigError("an open_clip config needs embed_dim, vision_cfg and text_cfg")
    from open_clip import factory
    factory._MODEL_CONFIGS[name] = dict(config)  # what open_clip.add_model_config does for a JSON file


def taxonomic_name(taxonomy: Taxonomy, node: str) -> str:
    """The node's lineage as BioCLIP writes it: names from the root down, one per rank, the species as its
    epithet after the genus ("Animalia Chordata Mammalia Carnivora Ursidae Ursus arctos"). In a ranked
    taxonomy ancestors at no Linnaean rank (e.g. a subphylum) are left out, as BioCLIP's 7-rank strings have
    none; the node itself is always named (a label such as "Tunicata" ends its own prompt).

    >>> tax = Taxonomy.from_parents({"Animalia": None, "Ursus": "Animalia", "Ursus arctos": "Ursus"},
    ...                             ranks={"Animalia": "kingdom", "Ursus": "genus", "Ursus arctos": "species"})
    >>> taxonomic_name(tax, "Ursus arctos")
    'Animalia Ursus arctos'
    """
    lineage = taxonomy.lineage(node)
    if taxonomy.has_ranks:
        kept = [n for n in lineage[:-1] if taxonomy.rank(n) is not None] + lineage[-1:]  # the node itself stays
    else:
        kept = lineage
    words: list[str] = []
    for name in kept:
        if words and name.startswith(words[-1] + " "):
            name = name[len(words[-1]) + 1:]   # "Ursus" + "Ursus arctos" → "Ursus arctos"
        words.append(name)
    return " ".join(words)


def lineage_prompts(taxonomy: Taxonomy, labels: Sequence[str] | None = None,
                    templates: Sequence[str] = (DEFAULT_TEMPLATE,)) -> list[list[str]]:
    """Per label, its prompts: each template with `{}` replaced by `taxonomic_name`."""
    templates = [templates] if isinstance(templates, str) else list(templates)
    if not templates or any("{}" not in t for t in templates):
        raise ConfigError(f"each prompt template must contain '{{}}' for the taxonomic name, got {templates!r}")
    labels = list(taxonomy.labels if labels is None else labels)
    return [[t.format(taxonomic_name(taxonomy, lab)) for t in templates] for lab in labels]


def create_open_clip(name: str, pretrained: str = "auto", image_size: int | None = None, tokenizer: bool = True):
    """(model, tokenizer, preprocessing) for an open_clip model name (`hf-hub:imageomics/bioclip`, `ViT-B-16`,
    or one registered with `register_open_clip_config`).

    `pretrained`: `auto` — an `hf-hub:` model comes with its weights; a built-in architecture takes its only
    pretrained tag; `none` — random initialisation; or a checkpoint file. A hub that cannot be reached raises a
    ModelError saying so (set HF_HUB_OFFLINE=1 to use the local cache without retries). `tokenizer=False`
    returns None for the tokenizer (an image backbone needs none).
    """
    oc = _open_clip()
    name = (name or "").strip()
    if not name:
        raise ConfigError("the open_clip model name is empty; e.g. hf-hub:imageomics/bioclip")
    hub = name.startswith("hf-hub:")
    if not hub and name not in oc.list_models():
        from taxonomist.taxonomy import suggest
        raise ModelError(f"unknown open_clip model {name!r}{suggest(name, oc.list_models())}; use hf-hub:ORG/NAME, "
                         "an open_clip architecture or one registered with register_open_clip_config")
    pretrained = (pretrained or "none").strip()
    kwargs = {"force_image_size": image_size} if image_size else {}
    tag = None
    if pretrained == "auto" and not hub:
        tags = oc.list_pretrained_tags_by_model(name)
        if len(tags) > 1:
            raise ConfigError(f"{name} has several pretrained weights ({', '.join(tags)}); pass one as "
                              f"model.pretrained or use hf-hub:ORG/NAME")
        tag = tags[0] if tags else None
    elif pretrained not in ("auto", "none"):
        if not Path(pretrained).expanduser().is_file():
            raise ModelError(f"open_clip weights {pretrained}: no such file (expected auto, none or a file)")
        tag = str(Path(pretrained).expanduser())
    try:
        model = oc.create_model(name, pretrained=tag, load_weights=pretrained != "none", **kwargs)
        # a backbone needs no tokenizer: fetching one is work (and, from the hub, settings) it does not need
        text_tokenizer = oc.get_tokenizer(name) if tokenizer else None
    except RuntimeError as e:
        if hub:
            raise ModelError(f"cannot load {name} from the Hugging Face hub ({str(e).splitlines()[0][:200]}); "
                             "it needs the network once (then the local cache), or pass model.pretrained=PATH "
                             "with an architecture name") from None
        raise ModelError(f"cannot build open_clip model {name}: {e}") from None
    pcfg = getattr(model.visual, "preprocess_cfg", {}) or {}
    size = pcfg.get("size", getattr(model.visual, "image_size", 224))
    pre = {"mean": tuple(float(v) for v in pcfg.get("mean", oc.OPENAI_DATASET_MEAN)),
           "std": tuple(float(v) for v in pcfg.get("std", oc.OPENAI_DATASET_STD)),
           "interpolation": "bicubic" if pcfg.get("interpolation", "bicubic") == "bicubic" else "bilinear",
           "image_size": int(size[0] if isinstance(size, (tuple, list)) else size)}
    return model.eval(), text_tokenizer, pre


class ZeroShotClassifier(nn.Module):
    """CLIP zero-shot over fixed class texts: logits = exp(logit_scale) · cos(image, text), text embeddings the
    normalised mean over each class's prompts (as pybioclip's CustomLabelsClassifier). `{"logits", "features"}`
    like a TaxonModel; features are the normalised image embeddings."""

    def __init__(self, clip_model: nn.Module, tokenizer, prompts: Sequence[Sequence[str]], batch_size: int = 256):
        super().__init__()
        self.clip = clip_model.eval()
        with torch.inference_mode():
            device = next(self.clip.parameters()).device
            flat = [p for group in prompts for p in group]
            emb = torch.cat([self.clip.encode_text(tokenizer(flat[s:s + batch_size]).to(device)).float()
                             for s in range(0, len(flat), batch_size)])
            emb = nn.functional.normalize(emb, dim=-1)
            sizes = torch.tensor([len(g) for g in prompts], device=device)
            owner = torch.repeat_interleave(torch.arange(len(prompts), device=device), sizes)
            text = torch.zeros(len(prompts), emb.shape[1], device=device).index_add_(0, owner, emb)
            text = nn.functional.normalize(text / sizes[:, None], dim=-1)
        self.register_buffer("text_features", text.clone(), persistent=False)

    def forward(self, image):
        feats = nn.functional.normalize(self.clip.encode_image(image).float(), dim=-1)
        scale = self.clip.logit_scale.exp().float()
        return {"logits": scale * feats @ self.text_features.T, "features": feats}


class OpenCLIPImageEncoder(nn.Module):
    """An open_clip image tower as a backbone: images → embeddings (B, embed_dim). `blocks` are its transformer
    blocks (for `finetune=last_n` and layer-wise lr decay)."""

    def __init__(self, visual: nn.Module, preprocessing: dict):
        super().__init__()
        self.visual = visual
        self.num_features = int(visual.output_dim)
        self.preprocessing = {k: preprocessing[k] for k in ("mean", "std", "interpolation")}

    @property
    def blocks(self):
        # a property, not a submodule: registering the blocks twice would save every weight twice
        trunk = getattr(self.visual, "transformer", None)   # open_clip's own ViT
        if trunk is not None and getattr(trunk, "resblocks", None) is not None:
            return trunk.resblocks
        return getattr(getattr(self.visual, "trunk", None), "blocks", None)  # a timm trunk (TimmModel)

    def forward(self, image):
        return self.visual(image)


def open_clip_backbone(name: str, image_size: int, pretrained: str = "none") -> OpenCLIPImageEncoder:
    """The image encoder of open_clip model `name` (`model.backbone: open_clip:NAME`); the text tower is dropped."""
    model, _, pre = create_open_clip(name, pretrained, image_size=image_size, tokenizer=False)
    return OpenCLIPImageEncoder(model.visual, pre)
