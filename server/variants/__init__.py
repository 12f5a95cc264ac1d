"""LoRA variants: the base model plus overrides per LoRA set.

- :mod:`export.models.variant_build`: the pure build (LoRA files + base repository -> override files);
- :mod:`server.variants.sources`: where a LoRA id may come from (allowed folders, the Hub);
- :mod:`server.variants.cache`: the disk cache of variants and downloads under ``LORA_CACHE_GB``;
- :mod:`server.variants.residency`: in use / resident variants and the serving mode per target.
"""

from server.variants.residency import ModelPerVariant, ParameterServing, VariantManager, VariantModels

__all__ = ["ModelPerVariant", "ParameterServing", "VariantManager", "VariantModels"]
