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
  <n> bytes.)". Triton's TensorRT backend allocates at LOAD (tensorrt_backend r25.01 / r25.08
  ``src/instance_state.cc``): each execution context is created with the model's allocation strategy
  (STATIC by default) and a null context fails the load with "unable to create TensorRT context: "
  followed by the TensorRT logger's last error (the out-of-memory line above, or empty); deserializing
  fails it with "unable to create TensorRT engine: <last error>" (``src/loader.cc``), and the I/O
  buffers with "unable to allocate memory for input|output '<name>' for <model>: out of memory"
  (``cudaGetErrorString``). A context's creation is its memory allocation, so that failure counts as
  out of memory whatever the last error says. A failed RUN says only "unable to enqueue for inference
  <model>": with the contexts' memory allocated at load it is not an allocation failure, so it stays
  an ordinary inference failure (also a 500);
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
    "unable to create tensorrt context",  # tensorrt_backend: createExecutionContext allocates, at load
)


def is_out_of_memory(message: str) -> bool:
    """Whether an inference error message says the GPU (or a memory pool) ran out of memory."""
    text = message.lower()
    return any(marker in text for marker in OOM_MARKERS)
