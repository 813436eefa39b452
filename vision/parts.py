"""Kept for one release: the understanding config sections moved to `mmstack.part_configs` and the official
readers / writers / key rules to `mmstack.formats` (one module per checkpoint format)."""
from mmstack.formats.multi_modality import SIGLIP
from mmstack.part_configs import ImageProcessingConfig, LayoutConfig, ProjectorConfig, VisionTowerConfig

__all__ = ["ImageProcessingConfig", "LayoutConfig", "ProjectorConfig", "VisionTowerConfig", "SIGLIP"]
