# triton-t2i on a GPU host: the official Triton server image (TensorRT, onnxruntime and python
# backends) with the service and the export toolchain installed into the image's Python.
#
#   docker build -t triton-t2i .
#   docker run --rm --gpus all -v t2i-models:/models triton-t2i \
#       t2i-export stabilityai/sdxl-turbo --target tensorrt --out /models/repository   # engines, ahead of time
#   docker run -d --gpus all -p 8000:8000 -v t2i-models:/models -e MODEL_ID=stabilityai/sdxl-turbo triton-t2i
#
# One CUDA major in the whole image (CUDA_MAJOR): the base image's CUDA, the TensorRT bindings, torch
# and onnxruntime-gpu are all CUDA 13 builds. `make check-image` resolves what the pip lines below install
# (for the image's Python and platform) and fails on any CUDA library of another major. What each pin
# rests on:
# - TRITON_IMAGE 25.08: the first Triton release on CUDA 13 (release notes rel-25-08: "based on CUDA
#   13.0.0.044"; server r25.07 build.py links libcublasLt.so.12, r25.08 libcublasLt.so.13). Triton
#   2.60.0 (TRITON_VERSION at r25.08), onnxruntime backend 1.23.0 (build.py ort_version), Ubuntu 24.04
#   with Python 3.12.3 (the service needs >= 3.11). The RUN below checks CUDA_VERSION against CUDA_MAJOR.
# - TENSORRT_VERSION 10.13.2.6: the 25.08 image's TensorRT, the first TensorRT with CUDA 13 builds
#   (tensorrt-cu13 on PyPI starts at 10.13.2.6). The bindings wheel (a real wheel on PyPI, no download
#   stub) is installed without its tensorrt-cu13-libs dependency, so it runs on the image's own
#   libnvinfer: the RUN below fails the build unless that library reports exactly this version.
#   Engines are tied to it: their fingerprint records it, and the service refuses others.
# - TORCH_VERSION 2.13.0: PyPI's Linux wheel requires cuda-toolkit==13.0.3 and nvidia-*-cu13 (CUDA 13;
#   driver >= 580). torch is the export's ONNX tracer and the engine check's buffers.
# - ONNXRUNTIME_GPU_VERSION 1.31.1: PyPI's wheel requires nvidia-cuda-runtime~=13.0 (CUDA 13); the
#   engine check's reference runs on it. Same version as the CPU wheel pinned in pyproject.toml.
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:25.08-py3
FROM ${TRITON_IMAGE}

ARG CUDA_MAJOR=13
ARG TENSORRT_VERSION=10.13.2.6
ARG TORCH_VERSION=2.13.0
ARG ONNXRUNTIME_GPU_VERSION=1.31.1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Ubuntu 24.04's Python is "externally managed" (PEP 668); this image is the environment, so the
# service goes into the image's Python itself, as the issue asks, not into a venv.
# CUDA_DEVICE_ORDER: CUDA numbers GPUs as NVML does (PCI bus order), so the indices of t2i-export --gpus,
# Triton's instance groups and the service's NVML check name the same GPUs.
ENV PIP_BREAK_SYSTEM_PACKAGES=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    CUDA_DEVICE_ORDER=PCI_BUS_ID

WORKDIR /opt/triton-t2i

# Dependencies first (cached while only the sources change).
COPY pyproject.toml README.md ./
# The base image is the CUDA major the rest is pinned for, and its libnvinfer is TENSORRT_VERSION
# (getInferLibVersion: major * 10000 + minor * 100 + patch).
# hadolint ignore=DL3013
RUN { test "${CUDA_VERSION%%.*}" = "${CUDA_MAJOR}" \
        || { echo "base image CUDA_VERSION=${CUDA_VERSION:-unset}, not CUDA ${CUDA_MAJOR}" >&2; exit 1; }; } \
    && pip install "torch==${TORCH_VERSION}" \
    && pip install --no-deps "tensorrt-cu${CUDA_MAJOR}-bindings==${TENSORRT_VERSION}" \
    && python3 -c "import ctypes, sys; v = ctypes.CDLL('libnvinfer.so.10').getInferLibVersion(); \
want = tuple(map(int, sys.argv[1].split('.')[:3])); got = (v // 10000, v // 100 % 100, v % 100); \
assert got == want, f'libnvinfer {got} != TENSORRT_VERSION {want}'; print('libnvinfer', got)" \
        "${TENSORRT_VERSION}"

COPY export ./export
COPY server ./server
COPY model_repository/python_onnx ./model_repository/python_onnx
COPY model_repository/python_torch ./model_repository/python_torch
# The service and the export toolchain (no [triton] extra: the image's own tritonserver is used).
# open_clip_torch only for its BPE vocabulary (tiny models' tokenizers), without its dependencies.
# DL3013: "." is this project; its dependencies are pinned in pyproject.toml.
# onnxruntime-gpu replaces the CPU wheel (same module): the engine check runs the reference on CUDA.
# hadolint ignore=DL3013
RUN pip install ".[export]" \
    && pip uninstall -y onnxruntime \
    && pip install "onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}" \
    && pip install --no-deps "open_clip_torch==3.3.0" \
    && python3 -c "import server.app, export.toolchain.cli"

# A user without privileges; /models is the volume for the Hugging Face cache, the engines and the
# service's state.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin t2i \
    && mkdir -p /models \
    && chown 10001:10001 /models
USER 10001

# The settings the service reads (server/settings.py); tests/test_docker.py checks that every name
# here is one of them and that the HEALTHCHECK and CMD below are the ones those settings give.
ENV MODEL_DIR=/models \
    MODEL_REPOSITORY=/models/repository \
    STATE_DIR=/models/state \
    HOST=0.0.0.0 \
    PORT=8000 \
    TRITONSERVER=/opt/tritonserver/bin/tritonserver \
    HF_HOME=/models/huggingface

VOLUME ["/models"]
EXPOSE 8000

# Orchestrators poll /health every 5 s too; unhealthy when it does not answer or says ERROR (no
# engines, engines from another GPU, Triton gone): the reason is in the container's log.
HEALTHCHECK --interval=5s --timeout=3s --start-period=600s --retries=3 \
    CMD ["t2i-healthcheck"]

# No ENTRYPOINT: `docker run IMAGE t2i-export ...` runs the export with the same image.
CMD ["t2i-serve"]
