"""The ``config.pbtxt`` of each Triton model, generated from Triton's ``ModelConfig`` protobuf.

Batched I/O from the model's spec, the dynamic batcher on, and the target's backend: the python
backend (onnxruntime or torch) or a ``tensorrt_plan`` engine
(:func:`export.toolchain.tensorrt_plan.engine_config`).
"""

from __future__ import annotations

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from export.contract.specs import ModelSpec, TensorSpec
from export.toolchain.options import RepositoryOptions
from export.toolchain.tensorrt_plan import engine_config

_DTYPES = {"float32": mc.TYPE_FP32, "float16": mc.TYPE_FP16, "int32": mc.TYPE_INT32, "int64": mc.TYPE_INT64}


def model_config(spec: ModelSpec, options: RepositoryOptions, profiles: int = 1) -> mc.ModelConfig:
    """The Triton config of one model: batched I/O from the spec and the dynamic batcher on.

    ``profiles`` is the number of optimisation profiles of a tensorrt engine."""
    # No ``name``: Triton names the model after its folder, so the service can serve several models'
    # repositories from one folder of links under prefixed names (server/triton/scoped.py).
    config = mc.ModelConfig(max_batch_size=spec.max_batch_size)
    if options.target == "python-onnx":
        config.backend = "python"
        config.parameters["onnx_file"].string_value = "model.onnx"
        config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    elif options.target == "python-torch":
        config.backend = "python"
        for key, value in options.torch.parameters().items():
            config.parameters[key].string_value = value
        # Inputs may stay in GPU memory (DLPack hands them to torch as they are).
        config.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value = "no"
        # One instance per GPU where there are GPUs, else one on CPU.
        config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_AUTO, count=1)
    elif options.target == "tensorrt":
        engine_config(config, spec, profiles, options.engine)
    for t in spec.inputs:
        _tensor(config.input.add(), t)
    for t in spec.outputs:
        _tensor(config.output.add(), t)
    config.dynamic_batching.max_queue_delay_microseconds = options.max_queue_delay_us
    return config


def _tensor(message: mc.ModelInput | mc.ModelOutput, t: TensorSpec) -> None:
    message.name = t.name
    message.data_type = _DTYPES[t.dtype]
    dims = [-1 if isinstance(a, str) else a for a in t.shape[1:]]
    if dims:
        message.dims.extend(dims)
    else:
        # A per-row scalar ([batch] only): Triton needs a non-empty shape, so clients send [batch, 1]
        # and the backend sees [batch].
        message.dims.append(1)
        message.reshape.SetInParent()


def config_text(config: mc.ModelConfig) -> str:
    return text_format.MessageToString(config)
