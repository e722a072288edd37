"""Pipelines, stage graph, split points, ONNX export and runtimes."""
