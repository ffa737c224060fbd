"""Deployment: MindIR, ONNX and AIR export of the cascade, and a runner for edge apps on any of its runtimes."""
