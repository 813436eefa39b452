"""Kept for one release: the generation config sections moved to `mmstack.part_configs`, the heads to
`mmstack.generation.heads`, and the official readers / writers / key rules to `mmstack.formats`."""
from mmstack.formats.multi_modality import FLOW_SETTINGS, VQ_SETTINGS
from mmstack.part_configs import FlowGenerationConfig, VQGenerationConfig

from .heads import FlowHead, VQHead

__all__ = ["FlowGenerationConfig", "VQGenerationConfig", "FlowHead", "VQHead", "FLOW_SETTINGS", "VQ_SETTINGS"]
