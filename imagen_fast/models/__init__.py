"""Imagen's U-Nets (base and Efficient U-Net), their blocks, and presets by name."""
from .attention import AttentionBlock
from .blocks import GroupNormAct, ResBlock
from .embeddings import AttentionPool, ScalarEmbedding, sinusoidal_embedding
from .presets import (
                      PRESETS,
                      build_unet,
                      count_parameters,
                      describe_presets,
                      preset_config,
                      unet_from_config,
)
from .unet import BaseUNet, DBlock, EfficientUNet, UBlock

__all__ = [
    "AttentionBlock", "AttentionPool", "BaseUNet", "DBlock", "EfficientUNet", "GroupNormAct",
    "PRESETS", "ResBlock", "ScalarEmbedding", "UBlock", "build_unet", "count_parameters",
    "describe_presets", "preset_config", "sinusoidal_embedding", "unet_from_config",
]
