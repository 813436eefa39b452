"""`mmstack.engine`: continuous batching over preallocated cache rows, used by every caller (the Python API,
the batch jobs, the demo and `mmstack serve`). See `engine.py` for the step and `slots.py` for the rows."""
from ..errors import EngineBusy
from .engine import Engine, EngineConfig
from .requests import Event, FlowImageRequest, Handle, RequestResult, TextRequest, VQImageRequest

__all__ = ["Engine", "EngineConfig", "EngineBusy", "Event", "Handle", "RequestResult", "TextRequest",
           "VQImageRequest", "FlowImageRequest"]
