"""`taxonomist export`: a checkpoint to one ONNX or TorchScript file with its labels, taxonomy, preprocessing
and calibration inside (`taxonomist.deploy.export_model`)."""
from __future__ import annotations

#: deploy.FORMATS, spelled out so that `--help` imports no torch
FORMAT_CHOICES = ("onnx", "torchscript")

EXAMPLE = """\
examples:
  taxonomist export runs/demo/run --format onnx --out model.onnx
  taxonomist export RUN/checkpoints/best.safetensors --format torchscript --out model.pt
  taxonomist predict model.onnx --images photos/ --out p.csv

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
"""


def register(sub, formatter):
    p = sub.add_parser("export", help="export a checkpoint to ONNX or TorchScript",
                       description="Export a checkpoint (or a run directory's best checkpoint) to one model file.",
                       epilog=EXAMPLE, formatter_class=formatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a .safetensors checkpoint or a run directory")
    p.add_argument("--format", dest="fmt", choices=FORMAT_CHOICES, default="onnx", help="file format")
    p.add_argument("--out", required=True, metavar="FILE", help="output file (.onnx for ONNX), written atomically")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset version")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip running the exported model against PyTorch on a random batch")
    p.add_argument("--trust-code", action="store_true",
                   help="export checkpoints whose backbone imports code (module:PKG:FACTORY) or fetches it "
                        "(open_clip:hf-hub:…); only for model files you trust (refused without it)")
    p.set_defaults(func=run)


def run(args) -> int:
    from taxonomist.deploy.export import export_model

    summary = export_model(args.checkpoint, args.out, fmt=args.fmt, opset=args.opset, check=args.check,
                           trust_code=args.trust_code)
    print(summary.summary())
    return 0
