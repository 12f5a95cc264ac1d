"""The exporter (``t2i-export``): ONNX graphs, Triton repositories, TensorRT plans and engines.

Imports :mod:`export.contract` and :mod:`export.models`; nothing in the service imports it."""
