"""`taxonomist serve`: serve a checkpoint or ONNX model over HTTP, with the web page for biologists
(`taxonomist.deploy.serve`)."""
from __future__ import annotations

from taxonomist.cli.predict import (DECISION_CHOICES, ENGINE_CHOICES, ENGINE_HELP, OOD_CHOICES, add_prior_arguments,
                                    decision_options)

# plain numbers, not imports of the serve modules: `taxonomist --help` stays fast (they match
# `deploy.serve.uploads.MAX_IMAGE_PIXELS`, `MAX_DECODES` and `deploy.serve.app.READ_TIMEOUT_S`, checked by a test)
MAX_IMAGE_PIXELS = 100_000_000
MAX_DECODES = 2
READ_TIMEOUT_S = 60.0
MAX_CONNECTIONS = 128

EXAMPLE = """\
examples:
  taxonomist serve runs/demo/run                                  # → http://127.0.0.1:8000/
  taxonomist serve RUN/checkpoints/best.safetensors --port 8765 --decision min-risk --candidates all
  taxonomist serve model.onnx --ood energy --ood-tpr 0.95 --max-batch 64
  taxonomist serve hf-hub:my-lab/plankton                         # from the Hugging Face Hub (or its cache)
  TAXONOMIST_TOKEN=$(openssl rand -hex 16) taxonomist serve RUN --host 0.0.0.0 --token-env TAXONOMIST_TOKEN --workers 2

  taxonomist serve runs/fathomnet2025                             # a two-stream model (ROI + context)
  taxonomist serve fn.onnx --context-scale 3                      # its context scale, when not recorded

  curl -F file=@photo.jpg http://127.0.0.1:8000/predict
  curl -F file=@a.jpg -F file=@b.jpg -H "Authorization: Bearer $TAXONOMIST_TOKEN" http://HOST:8000/predict
  curl -F file=@frame.jpg -F bbox=412,230,96,64 http://127.0.0.1:8000/predict          # a frame and a box
  curl -F file=@roi.jpg -F context=@roi_context.jpg http://127.0.0.1:8000/predict      # two-stream: a pair

  taxonomist serve RUN --priors priors.csv --decision min-risk --candidates all          # context priors
  curl -F file=@photo.jpg -F context="region=Monterey;depth=200-400" http://127.0.0.1:8000/predict

Endpoints: GET / (the page: drop images, draw a box on a frame, see decision, lineage and top 5), POST /predict
(multipart field `file`, one or several images; with a `bbox` field x,y,w,h per file, each file is a full frame
and the service cuts the box, and for two-stream models its context, as `data prepare` does; a two-stream model
takes either a `context` file per file or a `bbox` per file; with --priors, a text `context` field gives the
context the priors read, and each answer adds `priors` and `raw`, the answer without them), GET /health, GET /taxonomy, GET /metadata,
GET /openapi.json, GET /docs.
Requests arriving together are batched (up to --max-batch images, waiting at most --max-wait-ms).
The service binds 127.0.0.1; another --host needs --token-env VAR (a bearer token checked on every request
but /health and the page's static files). Bound to loopback it answers only Host: localhost, 127.0.0.1 or ::1
(a DNS-rebinding guard; --allowed-host adds a name, e.g. the one a reverse proxy passes on). It sends no CORS
headers. Decisions and OOD options are those of `taxonomist predict` (every OOD method but ensemble).
An animated or multi-page image is read as its first frame; uploads whose first frame exceeds
--max-image-pixels get 400, and at most --max-decodes such decodes run at once. Exposed beyond this machine,
put it behind a reverse proxy for TLS, slow-client timeouts and rate limits (docs/deploy.md).
"""


def register(sub, formatter):
    p = sub.add_parser("serve", help="serve a model over HTTP: JSON API and a web page",
                       description="Serve a checkpoint or an exported ONNX model over HTTP (FastAPI + uvicorn).",
                       epilog=EXAMPLE, formatter_class=formatter)
    p.add_argument("model", metavar="MODEL",
                   help="a checkpoint, a run directory (its best checkpoint), an .onnx file, a Hub folder or "
                        "hf-hub:ORG/NAME[@REVISION]")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; not loopback → --token-env required")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--decision", choices=DECISION_CHOICES, default="argmax", help="decision rule")
    add_prior_arguments(p, "the text `context` field of each request (one for all its files, or one per file)")
    p.add_argument("--candidates", metavar="FILE|all|fathomnet2025", default=None,
                   help="names an answer may take (default: the training labels for argmax/min-risk; every node "
                        "for the others)")
    p.add_argument("--thresholds", metavar="RANK=P,…", default=None,
                   help="backoff thresholds, or rollup/common-ancestor's one number (as predict)")
    p.add_argument("--selective-threshold", type=float, default=None, metavar="P",
                   help="selective: answer the deepest node with P(node) >= P (default 0.5)")
    p.add_argument("--top-k", type=int, default=None, metavar="N",
                   help="rollup and common-ancestor: how many of the most probable labels count (default 5 and 15)")
    methods = tuple(m for m in OOD_CHOICES if m != "ensemble")  # one model: no ensemble disagreement
    p.add_argument("--ood", choices=methods, default=None, metavar="METHOD",
                   help=f"flag unknown taxa with an OOD score: {', '.join(methods)} (odin and mc-dropout run the "
                        "PyTorch model again per batch)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--ood-threshold", type=float, default=None, metavar="T", help="flag when the OOD score >= T")
    group.add_argument("--ood-tpr", type=float, default=None, metavar="0.95",
                       help="threshold keeping this share of known validation images unflagged (default 0.95)")
    p.add_argument("--ood-fallback", default="auto", metavar="RANK|depthN|P",
                   help="answer a flagged image with its ancestor at this rank (min-risk, backoff, selective)")
    p.add_argument("--max-batch", type=int, default=32, metavar="N", help="most images per forward pass")
    p.add_argument("--max-wait-ms", type=float, default=5.0, metavar="MS",
                   help="how long a batch that is not full waits for more requests")
    p.add_argument("--max-upload-mb", type=float, default=20.0, metavar="MB", help="request size limit (413 above)")
    p.add_argument("--max-files", type=int, default=64, metavar="N", help="images per request")
    p.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS, metavar="N",
                   help="pixels (width × height of the first frame) above which an upload is refused with 400")
    p.add_argument("--max-decodes", type=int, default=MAX_DECODES, metavar="N",
                   help="full-size decodes at once (smaller images share this budget by pixel count): decoding "
                        "memory ≈ N × --max-image-pixels × 5 bytes")
    p.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS, metavar="N",
                   help="concurrent connections per worker; beyond it uvicorn answers 503 at once")
    p.add_argument("--timeout-keep-alive", type=int, default=5, metavar="S",
                   help="close an idle keep-alive connection after S seconds")
    p.add_argument("--read-timeout", type=float, default=READ_TIMEOUT_S, metavar="S",
                   help="seconds a client may take to send its request body (408 after)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="also answer this Host name (repeat); bound to loopback, only loopback names are answered")
    p.add_argument("--token-env", default=None, metavar="VAR",
                   help="environment variable holding the bearer token the clients must send")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="uvicorn worker processes, each with its own copy of the model")
    p.add_argument("--context-scale", default=None, metavar="S|full",
                   help="the context a frame + bbox gives a two-stream model: S × the box's longer side, or the "
                        "whole frame (default: the scale the model recorded at training; `data prepare --context`)")
    p.add_argument("--device", default="auto", help="auto (cuda → mps → cpu), cpu, cuda or mps")
    p.add_argument("--engine", choices=ENGINE_CHOICES, default="auto", help=ENGINE_HELP)
    p.add_argument("--trust-code", action="store_true",
                   help="load a checkpoint whose backbone imports code (module:PKG:FACTORY) or fetches it "
                        "(open_clip:hf-hub:…); only for model files you trust (refused without it)")
    p.add_argument("--access-log", action="store_true", help="log every request (off: one line per request is "
                                                            "costly under load)")
    p.set_defaults(func=run)


def run(args) -> int:
    import os
    import socket
    import sys

    from taxonomist.deploy.serve.app import (
        CONFIG_ENV,
        LOOPBACK_HOSTS,
        bind_token,
        is_loopback,
        check_limits,
        create_app,
        require_serve_dependencies,
        settings_to_environment,
    )
    from taxonomist.deploy.serve.predictor import Predictor, ServeOptions
    from taxonomist.errors import ConfigError

    require_serve_dependencies()
    token = bind_token(args.host, args.token_env)
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port}: must lie in 1‥65535")
    if args.workers < 1:
        raise ConfigError(f"--workers {args.workers}: must be ≥ 1")
    for value, name in ((args.max_connections, "--max-connections"), (args.timeout_keep_alive, "--timeout-keep-alive")):
        if not 1 <= value <= 100_000:
            raise ConfigError(f"{name} {value}: must lie in 1‥100000")
    allowed = [h.strip() for h in args.allowed_host]
    if any(not h or any(c in h for c in "/ ,") for h in allowed):
        raise ConfigError(f"--allowed-host {next(h for h in allowed if not h or any(c in h for c in '/ ,'))!r}: "
                          "give one host name per flag (no scheme, path or port)")
    if is_loopback(args.host):  # a DNS-rebinding page reaches loopback under its own name: refuse other names
        allowed = [*LOOPBACK_HOSTS, args.host, *allowed]
    options = ServeOptions(decision_options(args), device=args.device, context_scale=args.context_scale,
                           trust_code=args.trust_code, engine=args.engine)
    app_kwargs = dict(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_upload_mb=args.max_upload_mb,
                      max_files=args.max_files, max_image_pixels=args.max_image_pixels, max_decodes=args.max_decodes,
                      read_timeout=args.read_timeout)
    check_limits(**app_kwargs)
    app_kwargs["allowed_hosts"] = allowed or None
    from taxonomist.deploy.hub import resolve_model_source

    args.model = str(resolve_model_source(args.model))  # hf-hub:… → the cached copy, for every worker
    # load once here, so that a bad model or option is one `error:` line before anything binds
    predictor = Predictor.load(args.model, options)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((args.host.strip("[]"), args.port))
        except OSError as e:
            raise ConfigError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None

    import uvicorn

    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {predictor.model_path} ({predictor.decision.decision}) on http://{shown}:{args.port}/ "
          f"— the page at /, the API at /predict, the reference at /docs"
          f"{'; bearer token required' if token else ''}", file=sys.stderr, flush=True)
    # uvicorn's own guards: idle keep-alive connections close, connections beyond the cap get 503 at once,
    # oversized request heads are refused, and a stop waits at most 10 s for requests in flight
    common = dict(host=args.host.strip("[]"), port=args.port, access_log=args.access_log, log_level="info",
                  timeout_keep_alive=args.timeout_keep_alive, limit_concurrency=args.max_connections,
                  h11_max_incomplete_event_size=16 * 1024, timeout_graceful_shutdown=10)
    if args.workers == 1:
        app = create_app(predictor, token=token, **app_kwargs)
        uvicorn.run(app, **common)
        return 0
    del predictor  # each worker process loads its own copy
    os.environ[CONFIG_ENV] = settings_to_environment(args.model, options, token_env=args.token_env, **app_kwargs)
    uvicorn.run("taxonomist.deploy.serve.app:app_from_environment", factory=True, workers=args.workers, **common)
    return 0
