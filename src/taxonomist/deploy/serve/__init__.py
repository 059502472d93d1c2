"""`taxonomist serve`: an HTTP API (FastAPI) with micro-batching and a web page for biologists.

`create_app(model, …)` builds the app; `Predictor` is the model with its decision and OOD steps; `MicroBatcher`
gathers concurrent requests into one forward pass. FastAPI, uvicorn and python-multipart are the `[serve]` extra;
importing this package needs none of them until `create_app` is called.
"""
from taxonomist.deploy.serve.app import create_app, require_serve_dependencies
from taxonomist.deploy.serve.batcher import MicroBatcher
from taxonomist.deploy.serve.predictor import Predictor, ServeOptions
from taxonomist.deploy.serve.uploads import MAX_IMAGE_PIXELS, UploadError, decode_upload

__all__ = ["MAX_IMAGE_PIXELS", "MicroBatcher", "Predictor", "ServeOptions", "UploadError", "create_app",
           "decode_upload", "require_serve_dependencies"]
