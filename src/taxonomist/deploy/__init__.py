"""Deployment: export a checkpoint to ONNX or TorchScript (metadata inside), and serve models over HTTP.

Sits around the data flow: reads checkpoints, runs `inference`, and adds no decision logic of its own.
"""
from taxonomist.deploy.export import DEFAULT_OPSET, FORMATS, ExportSummary, export_model

__all__ = ["DEFAULT_OPSET", "FORMATS", "ExportSummary", "export_model"]
