"""Out of GPU memory in Triton's error messages: the markers the inference libraries really write.

A model that runs out of GPU memory fails its request; the client sees the backend's message in the
gRPC error and the service answers the contract's 500 "Out of memory error. Try reducing output image
resolution." (``server.errors.OutOfMemory``), then serves the next request. Each marker below is
quoted from the library that writes it, lower-cased (the match is case-insensitive):

- onnxruntime's CUDA provider, ``onnxruntime/core/providers/cuda/cuda_call.cc`` (``CudaCall``):
  ``ss << libName << " failure " << static_cast<int>(retCode) << ": " << errString`` gives
  "CUDA failure 2: out of memory ; GPU=0 ; hostname=... ; expr=cudaMalloc(...)" (2 is
  ``cudaErrorMemoryAllocation``, whose ``cudaGetErrorString`` is "out of memory"), and for cuBLAS /
  cuDNN "CUBLAS failure 3: CUBLAS_STATUS_ALLOC_FAILED", "CUDNN failure 4: CUDNN_STATUS_ALLOC_FAILED";
- onnxruntime's arena, ``onnxruntime/core/framework/bfc_arena.cc`` (``BFCArena::AllocateRawInternal``):
  "Failed to allocate memory for requested buffer of size <n>";
- TensorRT's logger (``[defaultAllocator.cpp::allocate::...]``, ``[executionContext.cpp::...]``):
  "Error Code 1: Cuda Runtime (out of memory)" and "Error Code 2: OutOfMemory (Requested size was
  <n> bytes.)"; Triton's TensorRT backend writes these to its log and answers the request with
  "unable to enqueue for inference <model>" (``tensorrt_backend/src/instance_state.cc``), which is
  not specific to memory and so stays an ordinary inference failure (also a 500);
- torch (the python-torch target): ``torch.OutOfMemoryError`` "CUDA out of memory. Tried to allocate
  <n> GiB"; CUDA's own driver name ``CUDA_ERROR_OUT_OF_MEMORY``.

The python backend passes a model's exception text through as the request's error, so these reach
the client verbatim from the python-onnx and python-torch targets.
"""

from __future__ import annotations

OOM_MARKERS: tuple[str, ...] = (
    "out of memory",  # CUDA's cudaErrorMemoryAllocation text (onnxruntime, TensorRT, torch)
    "outofmemory",  # TensorRT "Error Code 2: OutOfMemory", torch.OutOfMemoryError
    "cuda_error_out_of_memory",  # the CUDA driver API's name
    "failed to allocate memory for requested buffer",  # onnxruntime BFCArena
    "cublas_status_alloc_failed",  # onnxruntime "CUBLAS failure 3"
    "cudnn_status_alloc_failed",  # onnxruntime "CUDNN failure 4"
    "failed to allocate",  # Triton core's pinned / GPU memory pools ("failed to allocate ... memory")
)


def is_out_of_memory(message: str) -> bool:
    """Whether an inference error message says the GPU (or a memory pool) ran out of memory."""
    text = message.lower()
    return any(marker in text for marker in OOM_MARKERS)
