"""`taxonomist benchmark`: ceiling, taxonomist and baseline throughput in one run → table + JSON
(`taxonomist.benchmark.run_benchmark`)."""
from __future__ import annotations

EXAMPLE = """\
examples:
  taxonomist benchmark --device cpu --out b.json
  taxonomist benchmark --device cpu --steps 6 --warmup 1 --rounds 3 --out b.json
  taxonomist benchmark --device cpu --images frames --out frames.json
  taxonomist benchmark --device cpu --ceiling-threads policy --out quick.json
  taxonomist benchmark --device cuda --model convnext_tiny --image-size 288 --batch-size 128 --steps 20 --out gpu.json

Measures, with the same model, batch size, image size and device:
  ceiling     model-only train step (fwd + bwd + AdamW) and inference on synthetic tensors on the device,
              on CPU at every torch thread count of --ceiling-threads (default 1…N usable cores): the
              ceiling is the best of them, so a thread policy that leaves cores idle falls short of it
  taxonomist  the project's train and predict paths from ROI JPEGs it writes to a temp folder:
              train()'s loader and transforms + train.step.TrainStep (the step train() runs; bf16
              autocast and channels_last on CUDA); predict = infer_rows (as `taxonomist predict`)
              + the min-risk decision. On CUDA also nvJPEG decode + GPU crop/resize/flips. Torch threads
              as the project sets them (configure_threads); the output says which predict timing ran.
  baseline    PIL + torchvision.transforms v1 in a DataLoader with the same workers, default torch threads
and min-risk over --decision-candidates × --decision-images. The summary and the JSON report the targets
(CPU: train ≥ 0.9× ceiling and ≥ 1.0× baseline, predict ≥ 1.0× baseline; CUDA: train and predict ≥ 0.9×
ceiling and ≥ 2× baseline) as met or not; the exit code does not depend on them. See docs/performance.md.
"""


def register(sub, formatter):
    p = sub.add_parser("benchmark", help="throughput against the model-only ceiling and a naive baseline",
                       description="Measure train/predict img/s: model-only ceiling, taxonomist, naive baseline.",
                       epilog=EXAMPLE, formatter_class=formatter)
    p.add_argument("--model", default="tf_efficientnet_lite0", help="timm backbone name")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to run")
    p.add_argument("--image-size", type=int, default=224, help="input side in pixels")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch")
    p.add_argument("--steps", type=int, default=3, help="timed batches per measurement")
    p.add_argument("--warmup", type=int, default=1, help="untimed batches before the timed ones")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat ceiling → taxonomist → baseline; img/s pooled, ratio per round in the JSON")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (as train.compile=true)")
    p.add_argument("--skip-baseline", action="store_true",
                   help="measure ceiling and taxonomist only (faster; no baseline figures or vs_baseline)")
    p.add_argument("--ceiling-threads", default="all", metavar="all|max|policy|N,N…",
                   help="torch thread counts at which the CPU ceiling is measured, each round: all = 1…N usable "
                        "cores (default), max = N only, policy = the project's own count only (fastest, but "
                        "then the ceiling cannot show a better count), or a list such as 1,2; the ceiling is the "
                        "best of them. Every count adds one ceiling measurement per round: on many cores give a "
                        "few, e.g. 1,4,8,16. Ignored on CUDA")
    p.add_argument("--images", default="rois", choices=("rois", "frames"),
                   help="files to read: ROI crops (256–640 px sides) or 1920×1080 video frames")
    p.add_argument("--workers", type=int, default=-1, help="loader workers; -1 = chosen for the machine")
    p.add_argument("--decision-images", type=int, default=100_000, help="images for the min-risk timing")
    p.add_argument("--decision-candidates", type=int, default=10_000, help="candidates for the min-risk timing")
    p.add_argument("--out", metavar="FILE.json", default=None, help="also write the figures as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    import sys
    from pathlib import Path

    from taxonomist.benchmark import BenchmarkConfig, format_table, run_benchmark
    from taxonomist.utils.files import atomic_write_text

    bc = BenchmarkConfig(model=args.model, device=args.device, image_size=args.image_size,
                         batch_size=args.batch_size, steps=args.steps, warmup=args.warmup, rounds=args.rounds,
                         compile=args.compile, images=args.images,
                         baseline=not args.skip_baseline, ceiling_threads=args.ceiling_threads,
                         num_workers=args.workers, decision_images=args.decision_images,
                         decision_candidates=args.decision_candidates)
    result = run_benchmark(bc, log=lambda msg: print(msg, file=sys.stderr))
    print(format_table(result))
    if args.out:
        atomic_write_text(Path(args.out), json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0
