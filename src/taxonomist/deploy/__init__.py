"""Deployment: export a checkpoint to ONNX or TorchScript (metadata inside), and serve models over HTTP.

Sits around the data flow: reads checkpoints, runs `inference`, and adds no decision logic of its own.
"""
__all__ = ["DEFAULT_OPSET", "FORMATS", "ExportSummary", "export_model"]


def __getattr__(name: str):
    """The export API, imported on first use: `taxonomist push` and the Hub helpers need no torch."""
    if name in __all__:
        from taxonomist.deploy import export
        return getattr(export, name)
    raise AttributeError(f"module 'taxonomist.deploy' has no attribute {name!r}")
