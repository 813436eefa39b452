"""Kept for one release: the config writers moved to `mmstack.formats` (one module per format)."""
from .errors import ExportError
from .formats import export_formats, write_config
from .formats.common import Written

__all__ = ["ExportError", "Written", "export_formats", "write_config"]
