"""The HTTP service: a FastAPI app over one `Predictor` and one `MicroBatcher`, plus the page for biologists.

`create_app(model, …)` builds it; `taxonomist serve` runs it with uvicorn. Bad input never reaches the model:
every refusal is a 4xx answer `{"error": "…"}`. No endpoint reads a server path or fetches a URL; the page is
plain files from `static/` and the Content-Security-Policy keeps it from loading anything from elsewhere.

Each upload is checked and decoded before it joins a batch, within a pixel budget per upload and a budget of
pixels decoded at once (`DecodeBudget`); a batch that still fails runs again request by request, so only the
request at fault gets an error. Bound to loopback, the service answers only requests whose `Host` is a loopback
name (DNS rebinding); it sends no CORS headers, so pages of other origins cannot read its answers.
"""

import asyncio
import hmac
import json
import logging
import math
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from taxonomist.deploy.serve.batcher import BatcherStopped, MicroBatcher
from taxonomist.deploy.serve.boxes import parse_bbox
from taxonomist.deploy.serve.predictor import Predictor, ServeOptions, WithContext
from taxonomist.deploy.serve.uploads import (
    MAX_DECODES,
    MAX_IMAGE_PIXELS,
    MAX_PIXEL_OPTION,
    DecodeBudget,
    UploadError,
    check_image_header,
    decode_upload,
    upload_pixels,
)

log = logging.getLogger("taxonomist.serve")

STATIC = Path(__file__).parent / "static"
#: Environment variable through which `taxonomist serve --workers N` hands its settings to each worker process.
CONFIG_ENV = "TAXONOMIST_SERVE_CONFIG"
#: Paths answered without the bearer token: the health probe (load balancers), and the page and its files,
#: which hold no data — the page asks for the token and sends it with every API call.
PUBLIC_PATHS = ("/health", "/", "/favicon.ico")
PUBLIC_PREFIXES = ("/static/",)
CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")

#: `Host` names a loopback-bound service answers (plus the bound address and --allowed-host names).
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
#: Longest a request may take to send its body (`--read-timeout`); a slower client gets 408.
READ_TIMEOUT_S = 60.0
#: Largest values the time and size options take: beyond them a typo (or `inf`) would disable the limit.
MAX_WAIT_MS_LIMIT = 60_000.0
MAX_UPLOAD_MB_LIMIT = 4096.0

SERVE_EXTRA_HINT = ("taxonomist serve needs FastAPI, uvicorn and python-multipart: "
                    "pip install 'taxonomist[serve]'")


def require_serve_dependencies() -> None:
    """Raise a `ConfigError` with the install command when the `[serve]` extra is missing."""
    import importlib.util

    from taxonomist.errors import ConfigError

    missing = [name for name, module in (("fastapi", "fastapi"), ("uvicorn", "uvicorn"),
                                         ("python-multipart", "python_multipart"))
               if importlib.util.find_spec(module) is None]
    if missing:
        raise ConfigError(f"{SERVE_EXTRA_HINT} (missing: {', '.join(missing)})")


class _TooLarge(Exception):
    pass


def check_limits(max_batch: int, max_wait_ms: float, max_upload_mb: float, max_files: int,
                 max_image_pixels: int = MAX_IMAGE_PIXELS, max_decodes: int = MAX_DECODES,
                 read_timeout: float = READ_TIMEOUT_S) -> None:
    """Raise a `ConfigError` naming the option and its valid range when a service limit is out of range (a
    negative, NaN or infinite value included: `inf` would turn a limit off or stop the batching thread)."""
    from taxonomist.errors import ConfigError

    for value, name in ((max_batch, "--max-batch"), (max_files, "--max-files"), (max_decodes, "--max-decodes")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} {value!r}: must be a positive integer")
    if isinstance(max_image_pixels, bool) or not isinstance(max_image_pixels, int) \
            or not 1 <= max_image_pixels <= MAX_PIXEL_OPTION:
        raise ConfigError(f"--max-image-pixels {max_image_pixels!r}: must be an integer in 1‥{MAX_PIXEL_OPTION:,}")
    for value, name, low, high, unit in ((max_wait_ms, "--max-wait-ms", 0.0, MAX_WAIT_MS_LIMIT, " ms"),
                                         (max_upload_mb, "--max-upload-mb", 0.0, MAX_UPLOAD_MB_LIMIT, " MB"),
                                         (read_timeout, "--read-timeout", 0.0, 3600.0, " s")):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or not low <= value <= high or (value == 0 and name != "--max-wait-ms"):
            lower = "≥ 0" if name == "--max-wait-ms" else "> 0"
            raise ConfigError(f"{name} {value!r}: must be a finite number {lower} and at most {high:g}{unit}")


def create_app(model: str | Path | Predictor, options: ServeOptions | None = None, max_batch: int = 32,
               max_wait_ms: float = 5.0, max_upload_mb: float = 20.0, token: str | None = None,
               max_files: int = 64, max_image_pixels: int = MAX_IMAGE_PIXELS, max_decodes: int = MAX_DECODES,
               allowed_hosts: list[str] | tuple[str, ...] | None = None, read_timeout: float = READ_TIMEOUT_S):
    """The FastAPI app serving `model` (a checkpoint, run directory, `.onnx` file or a loaded `Predictor`).

    Args:
        options: the decision options (rule, candidates, OOD method, …) and the device (`ServeOptions`).
        max_batch: most images per forward pass; `max_wait_ms`: how long a batch that is not full waits.
        max_upload_mb: limit on one request's body (413 above it); `max_files`: images per request.
        token: when set, every request but `/health` and the page's files needs `Authorization: Bearer TOKEN`.
        max_image_pixels: width × height of an upload's first frame above which it is refused (400), read
            from the header before decoding; `max_decodes`: how many such full-budget decodes run at once
            (smaller images share the budget by their pixel count), so decoding takes at most about
            max_decodes × max_image_pixels × 5 bytes.
        allowed_hosts: when set, requests whose `Host` header names another host get 400 (`taxonomist serve`
            sets the loopback names when it binds loopback: a DNS-rebinding guard).
        read_timeout: seconds a client may take to send its request body (408 after).

    >>> app = create_app("runs/demo/run")                                   # doctest: +SKIP
    >>> TestClient(app).post("/predict", files={"file": open("a.jpg", "rb")}).json()   # doctest: +SKIP
    """
    require_serve_dependencies()
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.formparsers import MultiPartException, MultiPartParser

    from taxonomist import __version__
    from taxonomist.errors import ConfigError

    check_limits(max_batch, max_wait_ms, max_upload_mb, max_files, max_image_pixels, max_decodes, read_timeout)
    if token is not None and not token.strip():
        raise ConfigError("the token is empty; set the variable named by --token-env to a secret string")
    predictor = model if isinstance(model, Predictor) else Predictor.load(model, options)
    batcher = MicroBatcher(predictor.predict_images, max_batch=max_batch, max_wait_ms=max_wait_ms)
    budget = DecodeBudget(max_decodes * max_image_pixels)
    limit = int(max_upload_mb * 1024 * 1024)

    @asynccontextmanager
    async def lifespan(_app) -> AsyncIterator[None]:
        yield
        batcher.close()

    app = FastAPI(title="taxonomist", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Hierarchical image classification of organisms. The generated OpenAPI schema is "
                              "at /openapi.json and an offline reference at /docs.")
    app.state.predictor, app.state.batcher, app.state.decode_budget = predictor, batcher, budget
    app.state.limits = {"max_batch": max_batch, "max_wait_ms": max_wait_ms, "max_upload_mb": max_upload_mb,
                        "max_files": max_files, "max_image_pixels": max_image_pixels, "max_decodes": max_decodes,
                        "read_timeout": read_timeout,
                        "allowed_hosts": list(allowed_hosts) if allowed_hosts is not None else None}

    def error(status: int, message: str, headers: dict | None = None):
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    # ------------------------------------------------------------------------------------ errors as JSON
    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc):
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            message = "not found: the service answers /, /health, /predict, /taxonomy, /metadata, /openapi.json, /docs"
        return error(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, exc):
        return error(400, f"invalid request: {exc.errors()[:3]}")

    @app.exception_handler(Exception)
    async def internal_error(_request, exc):  # a bug, not the client's fault: no details leak out
        return error(500, f"internal error ({type(exc).__name__}); see the server log")

    app.add_middleware(_Guard, token=token, allowed_hosts=allowed_hosts)

    def stopped():
        return error(503, f"the service cannot answer: {batcher.failure or 'the batching thread is not running'}; "
                          "restart it (see the server log)")

    # ------------------------------------------------------------------------------------ endpoints
    @app.get("/health", summary="Liveness and the model served")
    async def health():
        if not batcher.alive:
            return JSONResponse({"status": "error", "error": batcher.failure or "the batching thread is not running",
                                 "model": predictor.info["model"]}, status_code=503)
        return {"status": "ok", "model": predictor.info["model"], "decision": predictor.decision.decision,
                "auth": token is not None, "inputs": predictor.inputs(), "batching": batcher.stats.as_dict(),
                **predictor.priors_info()}

    @app.get("/taxonomy", summary="The model's taxonomy: nodes with parent and rank, and its labels")
    async def taxonomy():
        return predictor.taxonomy_table()

    @app.get("/metadata", summary="The model's metadata and the service's settings")
    async def metadata():
        return {**predictor.metadata(), "limits": app.state.limits}

    upload_schema = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file"],
        "properties": {
            "file": {"type": "array", "items": {"type": "string", "format": "binary"},
                     "description": "one or several images (repeat the field): crops, or full frames with 'bbox'"},
            "context": {"type": "array", "items": {"type": "string"},
                        "description": "a file: a two-stream model's context crop of each 'file', in the same "
                                       "order. Text (a service started with --priors): where the images were "
                                       "taken, e.g. region=Monterey;depth=200-400, once for every file or once "
                                       "per file; each answer then adds 'priors' and 'raw', the answer without "
                                       "them"},
            "bbox": {"type": "array", "items": {"type": "string", "example": "120,80,64,48"},
                     "description": "x,y,w,h in pixels of each 'file' (a full frame), in the same order: the "
                                    "service cuts the ROI and, for two-stream models, the context as `data "
                                    "prepare` does; the answer echoes it"}}}}}}}

    @app.post("/predict", openapi_extra=upload_schema, summary="Identify the organisms in one or several images",
              responses={400: {"description": "empty, corrupt or oversized-dimension image, a malformed form, "
                                               "a bad bbox, or files and contexts/bboxes that do not pair up"},
                         401: {"description": "missing or wrong bearer token"},
                         408: {"description": "request body not received within --read-timeout"},
                         413: {"description": "request body over --max-upload-mb"},
                         415: {"description": "not multipart/form-data, or a file that is not an image"},
                         422: {"description": "the model could not process this request's images (the other "
                                              "requests of its batch were answered)"},
                         503: {"description": "the batching thread has stopped; /health says why"}})
    async def predict(request: Request):
        if not batcher.alive:
            return stopped()
        ctype = request.headers.get("content-type", "")
        if not ctype.lower().startswith("multipart/form-data"):
            return error(415, f"send the images as multipart/form-data in the field 'file' (got content type "
                              f"{ctype or 'none'!r})")
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                return error(400, f"invalid Content-Length {declared!r}")
            if int(declared) > limit:
                return error(413, f"request body of {int(declared):,} bytes exceeds the limit of "
                                  f"{max_upload_mb:g} MB (--max-upload-mb)")

        async def limited() -> AsyncIterator[bytes]:
            seen = 0
            async for chunk in request.stream():
                seen += len(chunk)
                if seen > limit:
                    raise _TooLarge()
                yield chunk

        # a two-stream request carries a context file or a bbox field beside each image
        parser = MultiPartParser(request.headers, limited(), max_files=2 * max_files, max_fields=max_files + 16,
                                 max_part_size=64 * 1024)
        try:
            form = await asyncio.wait_for(parser.parse(), read_timeout)
        except TimeoutError:
            return error(408, f"request body not received within {read_timeout:g} s (--read-timeout)")
        except _TooLarge:
            return error(413, f"request body exceeds the limit of {max_upload_mb:g} MB (--max-upload-mb)")
        except MultiPartException as e:
            return error(400, f"malformed multipart form: {e}")
        try:
            jobs = await _read_form(form, predictor, max_files)
            inputs = []
            for job in jobs:  # each upload is checked and decoded before any joins a batch
                pixels = await _job_pixels(job, max_image_pixels)
                async with budget.reserve(pixels):
                    prepared = await run_in_threadpool(_prepare, predictor, job, max_image_pixels)
                    inputs.append(prepared if job.prior_context is None else WithContext(prepared, job.prior_context))
                job.data = job.context_data = b""  # the bytes are done with: free them while the batch waits
        except UploadError as e:
            return error(e.status, e.message)
        finally:
            await form.close()
        try:
            answers = await asyncio.wrap_future(batcher.submit(inputs))
        except BatcherStopped:
            return stopped()
        except Exception as exc:  # noqa: BLE001 — run alone (the batcher retries), so this request's own input
            log.error("the model failed on %s", ", ".join(job.filename for job in jobs), exc_info=exc)
            names = ", ".join(repr(job.filename) for job in jobs[:3]) + (" …" if len(jobs) > 3 else "")
            return error(422, f"{names}: the model could not process this request's images "
                              f"({type(exc).__name__}); the other requests were answered")
        return {"predictions": [job.answer(answer) for job, answer in zip(jobs, answers)]}

    # ------------------------------------------------------------------------------------ the page
    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return FileResponse(STATIC / "api.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


class _Guard:
    """ASGI middleware: the bearer-token check (when a token is set) and the security headers of every answer.
    Plain ASGI rather than `@app.middleware("http")`, which costs a task and a stream per request."""

    def __init__(self, app, token: str | None, allowed_hosts=None):
        self.app, self.token = app, token.encode() if token is not None else None
        self.allowed = None if allowed_hosts is None else {h.strip().strip("[]").lower() for h in allowed_hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.datastructures import MutableHeaders

        if self.allowed is not None:
            host = dict(scope["headers"]).get(b"host")
            name = None if host is None else host_name(host.decode("latin-1"))
            if name is not None and name not in self.allowed:
                from fastapi.responses import JSONResponse

                shown = host.decode("latin-1")[:100]
                response = JSONResponse({"error": f"Host {shown!r} is not served here: this service answers "
                                                  f"{', '.join(sorted(self.allowed))} (a guard against DNS "
                                                  "rebinding; add a name with --allowed-host)"}, status_code=400)
                return await response(scope, receive, send)
        path = scope["path"]
        if self.token is not None and path not in PUBLIC_PATHS and not path.startswith(PUBLIC_PREFIXES):
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, value = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(value.strip(), self.token):
                from fastapi.responses import JSONResponse

                response = JSONResponse({"error": "missing or wrong bearer token (send the header "
                                                  "Authorization: Bearer TOKEN)"},
                                        status_code=401, headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("Content-Security-Policy", CSP)
                headers.setdefault("X-Content-Type-Options", "nosniff")
            await send(message)

        await self.app(scope, receive, send_with_headers)


@dataclass
class _Job:
    """One image of a request: its file, and its context file or its box when sent."""

    filename: str
    data: bytes
    context_name: str | None = None
    context_data: bytes | None = None
    bbox: tuple[float, float, float, float] | None = None
    prior_context: str | None = None          # a text `context` field: the keys the priors read

    def answer(self, answer: dict) -> dict:
        extra = {"bbox": list(self.bbox)} if self.bbox is not None else {}
        if self.context_name is not None:
            extra["context"] = self.context_name
        return {"filename": self.filename, **extra, **answer}


async def _read_form(form, predictor: Predictor, max_files: int) -> list[_Job]:
    """The request's images paired with their `context` files or `bbox` fields (by order); an `UploadError`
    (400) naming the field for every way they do not fit together or the model."""
    files, boxes = form.getlist("file"), form.getlist("bbox")
    contexts = [v for v in form.getlist("context") if not isinstance(v, str)]     # context crops (two-stream)
    keys = [v for v in form.getlist("context") if isinstance(v, str)]             # context keys (--priors)
    if not files:
        raise UploadError(400, "no image: send one or more files in the multipart field 'file'")
    if any(isinstance(v, str) for v in files):
        raise UploadError(400, "the field 'file' must carry files, not text (a path or URL is not fetched)")
    if len(files) > max_files:
        raise UploadError(400, f"{len(files)} files in the field 'file' exceed the limit of {max_files} images per "
                               "request (--max-files)")
    if keys and predictor.decision.priors is None:
        raise UploadError(400, "field 'context': text is the context the priors read (e.g. region=Monterey), and this "
                               "service was started without --priors; send context crops as files, or start it with "
                               "--priors PRIORS.csv")
    if len(keys) not in (0, 1, len(files)):
        raise UploadError(400, f"field 'context': {len(keys)} texts for {len(files)} files in 'file'; send one context "
                               "for every file, or one per file in the same order")
    if any(not isinstance(v, str) for v in boxes):
        raise UploadError(400, "the field 'bbox' must be text x,y,w,h (pixels of the frame), not a file")
    if contexts and boxes:
        raise UploadError(400, "send either 'context' files (crops) or 'bbox' fields (full frames), not both")
    if contexts and not predictor.two_stream:
        raise UploadError(400, f"field 'context': this model takes one image per example, not a context image "
                               f"({len(contexts)} sent); send 'file' alone, or a frame in 'file' with its 'bbox'")
    for name, given in (("context", contexts), ("bbox", boxes)):
        if given and len(given) != len(files):
            raise UploadError(400, f"field '{name}': {len(given)} given for {len(files)} files in 'file'; send "
                                   f"one '{name}' per file, in the same order")
    if predictor.two_stream and not contexts and not boxes:
        raise UploadError(400, "this two-stream model needs each image's context: send the ROI crop in 'file' and "
                               "its context crop in 'context', or the full frame in 'file' and the organism's box "
                               "in 'bbox' (x,y,w,h in pixels)")
    if boxes:
        predictor.require_context_scale("field 'bbox'")
    jobs = []
    for k, upload in enumerate(files):
        job = _Job(upload.filename or f"file{k + 1}", await upload.read())
        if boxes:
            job.bbox = parse_bbox(boxes[k], f"field 'bbox' of {job.filename!r} (image {k + 1})")
        if contexts:
            job.context_name = contexts[k].filename or f"context{k + 1}"
            job.context_data = await contexts[k].read()
        if keys:
            job.prior_context = keys[0] if len(keys) == 1 else keys[k]
        jobs.append(job)
    return jobs


async def _job_pixels(job: _Job, max_pixels: int) -> int:
    """The pixels decoding `job` will take (its file's first frame, plus its context's), from the headers; an
    `UploadError` when either exceeds `max_pixels`. PIL reads the header only for formats `declared_size` does
    not know (TIFF, BMP, …), in a thread."""
    from starlette.concurrency import run_in_threadpool

    total = 0
    for data, name, field in ((job.data, job.filename, None), (job.context_data, job.context_name, "context")):
        if data is None:
            continue
        try:
            pixels = upload_pixels(data, name, max_pixels) if data else None
            if pixels is None:
                width, height = await run_in_threadpool(check_image_header, data, name, max_pixels)
                pixels = width * height
        except UploadError as e:
            raise UploadError(e.status, f"field 'context': {e.message}" if field else e.message) from None
        total += pixels
    return total


def _prepare(predictor: Predictor, job: _Job, max_pixels: int):
    """Decode and preprocess one image of a request (and its context), cutting a frame by its box (in a
    thread-pool thread, off the event loop)."""
    image = decode_upload(job.data, job.filename, max_pixels)
    if job.bbox is not None:
        return predictor.crops(image, job.bbox, f"field 'bbox' of {job.filename!r}")
    if job.context_data is not None:
        try:
            context = decode_upload(job.context_data, job.context_name, max_pixels)
        except UploadError as e:
            raise UploadError(e.status, f"field 'context': {e.message}") from None
        return predictor.preprocess(image, context)
    return predictor.preprocess(image)


# ------------------------------------------------------------------------------------------ workers
def settings_to_environment(model: str | Path, options: ServeOptions, **app_kwargs) -> str:
    """Serialise what `app_from_environment` needs into the value of `CONFIG_ENV` (the token itself is not
    included: workers read it from the environment variable named by `token_env`)."""
    return json.dumps({"model": str(model), "options": options.to_dict(), "app": app_kwargs})


def app_from_environment():
    """uvicorn factory for `--workers N`: each worker process builds its own app from `CONFIG_ENV`."""
    from taxonomist.errors import ConfigError

    raw = os.environ.get(CONFIG_ENV)
    if not raw:
        raise ConfigError(f"{CONFIG_ENV} is not set; start the service with `taxonomist serve`")
    settings = json.loads(raw)
    app_kwargs = dict(settings["app"])
    token_env = app_kwargs.pop("token_env", None)
    token = os.environ.get(token_env) if token_env else None
    return create_app(settings["model"], ServeOptions.from_dict(settings["options"]), token=token, **app_kwargs)


# ------------------------------------------------------------------------------------------ binding
def host_name(header: str) -> str:
    """The host name of a `Host` header, lower case, without its port or IPv6 brackets.

    >>> host_name("LocalHost:8000"), host_name("[::1]:8000"), host_name("127.0.0.1")
    ('localhost', '::1', '127.0.0.1')
    """
    text = header.strip().lower()
    if text.startswith("["):
        return text[1:].split("]", 1)[0]
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback addresses (127.0.0.0/8, ::1); anything else reaches a network."""
    import ipaddress

    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to any interface


def bind_token(host: str, token_env: str | None, environ=None) -> str | None:
    """The bearer token the service requires, read from the variable `token_env`; a `ConfigError` when a
    non-loopback `host` is given without one, or the variable is unset or empty."""
    from taxonomist.errors import ConfigError

    environ = os.environ if environ is None else environ
    if token_env is None:
        if not is_loopback(host):
            raise ConfigError(f"--host {host} is not a loopback address: serving beyond this machine needs a "
                              "bearer token; put a secret in an environment variable and pass --token-env VAR")
        return None
    token = environ.get(token_env, "")
    if not token.strip():
        raise ConfigError(f"--token-env {token_env}: the environment variable {token_env} is "
                          f"{'empty' if token_env in environ else 'not set'}; export {token_env}=<a secret> first")
    return token.strip()
