"""The model library: sources, weights, tokenizers, torch modules, LoRA files and variants, refits.

Imports :mod:`export.contract`; the service imports it too."""
