"""Kept for one release: transformers' `janus` format moved to `mmstack.formats.hf_janus`."""
from mmstack.formats.hf_janus import HF_JANUS_RULES, MAX_ALIGNER_DEPTH, read, write_parts  # noqa: F401
