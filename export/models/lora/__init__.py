"""LoRA files -> low-rank factors per module -> merged weights -> ONNX graphs with merged initializers.

A LoRA variant of a model (docs/ARCHITECTURE.md section 5) is the base model with
``W' = W + sum_i weight_i * scale_i * (B_i @ A_i)`` merged into the weights its LoRAs touch, the
same weights diffusers computes with ``load_lora_weights`` + ``set_adapters`` + ``fuse_lora``.
By job:

1. :mod:`~export.models.lora.files`: :func:`load_lora` reads and checks a ``.safetensors`` file (or a
   folder holding one) in either layout:

   - diffusers / PEFT: ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (older files:
     ``.lora.down/up.weight``, ``.lora_linear_layer.down/up.weight``, attention-processor
     ``.processor.to_q_lora.down.weight``; prefixes ``unet.``, ``transformer.``, ``text_encoder.``,
     ``text_encoder_2.``; no prefix means the UNet). The scale is PEFT's ``lora_alpha / r``
     (``rank_pattern`` / ``alpha_pattern`` / ``use_rslora`` honoured) from the adapter metadata that
     diffusers' ``save_lora_weights`` writes into the safetensors header
     (``lora_adapter_metadata``: JSON with ``unet.r``, ``unet.lora_alpha``, ...); else from
     ``<module>.alpha`` tensors (``alpha / rank``); else 1, diffusers' convention for files
     without alphas.
   - kohya-ss / A1111: ``lora_unet_<module_with_underscores>.lora_down.weight`` / ``.lora_up.weight``
     / ``.alpha`` (scale ``alpha / rank``; no alpha means scale 1), ``lora_te_`` / ``lora_te1_`` for
     the first text encoder and ``lora_te2_`` for the second; sd-scripts' FLUX files (BFL names under
     ``lora_unet_``) for the transformer.

2. :mod:`~export.models.lora.layers`: :meth:`LoraWeights.resolve` maps the layer names to the base
   model's module names; kohya SD / SDXL names (SGM block names included) through diffusers' own
   converters (``diffusers.loaders.lora_conversion_utils``), so they are the modules diffusers loads.

3. :mod:`~export.models.lora.merge`: :func:`plan_merge` resolves and checks every shape;
   :func:`merged_weight` adds a parameter's LoRA terms to its base weight in float32, and
   :func:`merge_deltas` does both for a whole state dict, returning only the changed parameters.

4. :mod:`~export.models.lora.graphs`: :func:`write_merged_onnx` puts those parameters into a copy of
   the exported ONNX graph (:func:`initializer_map`, :func:`onnx_state`, :func:`load_graph`).

What is taken from diffusers and what is ours, and why, is said in each module's docstring. Every
problem with a LoRA raises a :class:`LoraError`: :class:`LoraNotFound` or :class:`LoraIncompatible`,
whose messages are the ones operators grep for (docs/ARCHITECTURE.md section 3). Importing this package
imports neither torch nor diffusers (the service imports it at start).
"""

from export.models.lora.files import load_lora
from export.models.lora.graphs import (
    OnnxGraph,
    OnnxWeightsError,
    initializer_map,
    load_graph,
    onnx_state,
    write_merged_onnx,
)
from export.models.lora.layers import (
    COMPONENTS,
    DIFFUSERS_WEIGHT_NAME,
    METADATA_KEY,
    ONNX_PREFIXES,
    LoraComponent,
    LoraError,
    LoraFormat,
    LoraIncompatible,
    LoraLayer,
    LoraNotFound,
    LoraWeights,
)
from export.models.lora.merge import (
    MergeTerms,
    check_components,
    load_base_state,
    merge_deltas,
    merged_weight,
    plan_merge,
)

__all__ = [
    "COMPONENTS",
    "DIFFUSERS_WEIGHT_NAME",
    "METADATA_KEY",
    "ONNX_PREFIXES",
    "LoraComponent",
    "LoraError",
    "LoraFormat",
    "LoraIncompatible",
    "LoraLayer",
    "LoraNotFound",
    "LoraWeights",
    "MergeTerms",
    "OnnxGraph",
    "OnnxWeightsError",
    "check_components",
    "initializer_map",
    "load_base_state",
    "load_graph",
    "load_lora",
    "merge_deltas",
    "merged_weight",
    "onnx_state",
    "plan_merge",
    "write_merged_onnx",
]
