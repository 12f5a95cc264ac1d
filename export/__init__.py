"""The export side of triton-t2i, in subpackages by job (docs/ARCHITECTURE.md, section 2).

- :mod:`export.contract`: what the exporter and the service both read (names, I/O specs, model
  families, patterns, the repository manifest, resolution buckets and engine hosts). Imports nothing
  else of this project.
- :mod:`export.models`: the model library: model sources, weights, tokenizers, the torch modules and
  their precision, LoRA files and variants, refits. Imports :mod:`export.contract`.
- :mod:`export.toolchain`: the exporter (``t2i-export``): ONNX export, the Triton repository, TensorRT
  plans and engines, the image check. Imports contract and models.
- :mod:`export.triton_models`: what runs inside Triton's python backend, importable outside it; the
  ``model.py`` of each python-backend target is a thin binding over it. Imports contract and models.
- :mod:`export.fixtures`: tiny models and LoRA files built in code for tests and benchmarks
  (``t2i-tiny``), and the harness both start the service with (:mod:`export.fixtures.service`,
  which imports nothing of this project). Imports contract and models.
"""
