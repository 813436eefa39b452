"""gradio as the demo modules import it: a local demo should not phone home, so usage analytics are off unless
GRADIO_ANALYTICS_ENABLED says otherwise (gradio reads it when first imported, hence this one place)."""
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

__all__ = ["gr"]
