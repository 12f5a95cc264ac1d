# triton-t2i on a GPU host: the official Triton server image (TensorRT, onnxruntime and python
# backends) with the service and the export toolchain installed into the image's Python.
#
#   docker build -t triton-t2i .
#   docker run --rm --gpus all -v t2i-models:/models triton-t2i \
#       t2i-export stabilityai/sdxl-turbo --target tensorrt --out /models/repository   # engines, ahead of time
#   docker run -d --gpus all -p 8000:8000 -v t2i-models:/models -e MODEL_ID=stabilityai/sdxl-turbo triton-t2i
#
# 25.01 is Triton 2.54 with TensorRT 10.8.0.43, CUDA 12.8, Ubuntu 24.04 and Python 3.12 (the service
# needs Python >= 3.11, which rules out the 24.xx images on Ubuntu 22.04). Engines are tied to this
# TensorRT version: the engines' fingerprint records it, and the service refuses others.
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:25.01-py3
FROM ${TRITON_IMAGE}

# The TensorRT Python API for the export (its version must equal the image's libnvinfer, 10.8.0.43),
# and torch for the export's ONNX tracing (the PyPI Linux wheel is the CUDA build).
ARG TENSORRT_VERSION=10.8.0.43
ARG TORCH_VERSION=2.13.0

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Ubuntu 24.04's Python is "externally managed" (PEP 668); this image is the environment, so the
# service goes into the image's Python itself, as the issue asks, not into a venv.
ENV PIP_BREAK_SYSTEM_PACKAGES=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/triton-t2i

# Dependencies first (cached while only the sources change).
COPY pyproject.toml README.md ./
RUN pip install "torch==${TORCH_VERSION}" "tensorrt-cu12==${TENSORRT_VERSION}" \
    && python3 -c "import tensorrt, torch; print('TensorRT', tensorrt.__version__, 'torch', torch.__version__)"

COPY export ./export
COPY server ./server
COPY model_repository/python_onnx ./model_repository/python_onnx
# The service and the export toolchain (no [triton] extra: the image's own tritonserver is used).
# open_clip_torch only for its BPE vocabulary (tiny models' tokenizers), without its dependencies.
# DL3013: "." is this project; its dependencies are pinned in pyproject.toml.
# onnxruntime-gpu replaces the CPU wheel (same module): the engine check runs the reference on CUDA.
# hadolint ignore=DL3013
RUN pip install ".[export]" \
    && pip uninstall -y onnxruntime \
    && pip install "onnxruntime-gpu==1.31.1" \
    && pip install --no-deps "open_clip_torch==3.3.0" \
    && python3 -c "import server.app, export.cli"

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
