"""`taxonomist export`: a checkpoint to one ONNX or TorchScript file with its labels, taxonomy, preprocessing
and calibration inside, or to a folder for the Hugging Face Hub (`taxonomist.deploy.export_model`)."""
from __future__ import annotations

#: deploy.FORMATS, spelled out so that `--help` imports no torch
FORMAT_CHOICES = ("onnx", "torchscript", "hf")

EXAMPLE = """\
examples:
  taxonomist export runs/demo/run --format onnx --out model.onnx
  taxonomist export RUN/checkpoints/best.safetensors --format torchscript --out model.pt
  taxonomist predict model.onnx --images photos/ --out p.csv
  taxonomist export runs/demo/run --format hf --out hub/plankton --repo-id my-lab/plankton --license cc-by-4.0
  taxonomist push hub/plankton my-lab/plankton
  taxonomist export hf-hub:my-lab/plankton --format onnx --out plankton.onnx

ONNX (needs `pip install 'taxonomist[onnx]'`): inputs `image` (and `context` for two-stream models), a
normalised float batch (B, 3, S, S) with a dynamic batch size; outputs `logits` (over the labels) and
`features`. The labels, the taxonomy (CSV text), the preprocessing (image size, mean, std, interpolation,
resize, crop), the temperature and the checkpoint's metadata are stored in the file's metadata_props
(TorchScript: in its extra files). The OOD statistics, when the checkpoint has them, are copied beside the
file as FILE.ood.safetensors. The export is checked against PyTorch on a random batch unless --no-check.

The model and its OOD statistics replace an earlier export as a pair: after a kill, the old pair, the new pair
or a model without statistics (refused when OOD is asked for), never a mix. --out may not be a file of the
checkpoint. A checkpoint naming a backbone that imports code is refused unless --trust-code; the exported
ONNX file runs in onnxruntime and never imports it.

hf: a folder for the Hugging Face Hub: model.safetensors (the checkpoint's weights, byte for byte) and
model.json (its metadata), model.ood.safetensors when calibrated, config.json (the model card's data),
taxonomy.csv, and README.md, the model card: a YAML header the Hub reads (library, tags, licence, metrics,
model-index), the metrics and their split (the run's metrics.json when it evaluated this checkpoint, else the
validation metrics of the epoch that chose it), the taxonomy, intended use and limits, and the exact predict
command (naming hf-hub:ORG/NAME when --repo-id is given). An earlier export at --out is replaced; any other
non-empty folder is refused. Upload it with `taxonomist push DIR ORG/NAME`.

MODEL may also be a Hub folder or hf-hub:ORG/NAME[@REVISION] (downloaded into the Hugging Face cache;
HF_HUB_OFFLINE=1 reads the cache only).
"""


def register(sub, formatter):
    p = sub.add_parser("export", help="export a checkpoint to ONNX, TorchScript or a Hugging Face Hub folder",
                       description="Export a checkpoint (or a run directory's best checkpoint) to one model file, "
                                   "or to a folder for the Hugging Face Hub.",
                       epilog=EXAMPLE, formatter_class=formatter)
    p.add_argument("checkpoint", metavar="MODEL",
                   help="a .safetensors checkpoint, a run directory, a Hub folder or hf-hub:ORG/NAME[@REVISION]")
    p.add_argument("--format", dest="fmt", choices=FORMAT_CHOICES, default="onnx",
                   help="file format; hf = a folder for the Hugging Face Hub")
    p.add_argument("--out", required=True, metavar="FILE_OR_DIR",
                   help="output file (.onnx for ONNX) or, for hf, folder; written atomically")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset version")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip running the exported model against PyTorch on a random batch")
    p.add_argument("--trust-code", action="store_true",
                   help="export checkpoints whose backbone imports code (module:PKG:FACTORY) or fetches it "
                        "(open_clip:hf-hub:…); only for model files you trust (refused without it)")
    p.add_argument("--repo-id", metavar="ORG/NAME", default=None,
                   help="hf: the Hub repository the folder is for; the card's commands name hf-hub:ORG/NAME")
    p.add_argument("--license", metavar="ID", default=None,
                   help="hf: the licence of the weights as a Hub licence id (apache-2.0, cc-by-4.0, …); default: "
                        "not stated, and the card says so")
    p.set_defaults(func=run)


def run(args) -> int:
    from taxonomist.deploy.export import export_model
    from taxonomist.errors import ConfigError

    card = None
    if args.fmt == "hf":
        from taxonomist.deploy.hub_card import CardOptions

        card = CardOptions(repo_id=args.repo_id, license=args.license)
    elif args.repo_id or args.license:
        raise ConfigError(f"--repo-id and --license describe a Hub folder; they need --format hf, not {args.fmt}")
    summary = export_model(args.checkpoint, args.out, fmt=args.fmt, opset=args.opset, check=args.check,
                           trust_code=args.trust_code, card=card)
    print(summary.summary())
    return 0
