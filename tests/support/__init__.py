"""What test modules share, apart from fixtures (those are in ``tests/conftest.py``): no test module
imports another one, nor names from ``conftest``.

- :mod:`tests.support.service`: the service on uvicorn in this process (``running_service``),
  its ``/metrics``, the bundled-Triton marker. Ports and health waits: :mod:`export.fixtures.service`.
- :mod:`tests.support.images`: the service's images against diffusers' (decode, reference, tolerance).
- :mod:`tests.support.lora`: LoRA cases, the LoRA request body, diffusers' LoRA references, LoRA files.
- :mod:`tests.support.hostile`: hostile request bodies and the reference's error body.
- :mod:`tests.support.triton`: a loopback fake of Triton's HTTP API, random inputs of the tiny UNet.
- :mod:`tests.support.dockerfile`: the Dockerfile's instructions.
"""
