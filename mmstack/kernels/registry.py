"""The kernel seam: one signature per operation, a plain PyTorch reference, faster backends behind it.

A backend registers with a predicate over the call's arguments (device, dtype, shapes). At call time the
first registered backend whose predicate holds runs, unless a backend is forced, either for a block of
code with `use_backend("moe", "loop")` or for the process with the environment variable
`MMSTACK_KERNELS="moe=loop,attention=reference"`. The reference is always available as "reference".
"""
from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from typing import Callable, Optional

_forced = threading.local()


@dataclass
class _Backend:
    name: str
    fn: Callable
    predicate: Optional[Callable]
    priority: int


class Kernel:
    """A dispatchable operation with a reference implementation and optional faster backends."""

    def __init__(self, name: str, reference: Callable):
        self.name = name
        self.reference = reference
        self._backends: list[_Backend] = [_Backend("reference", reference, None, -(10**9))]
        self.__doc__ = reference.__doc__

    def register(self, backend: str, predicate: Optional[Callable] = None, priority: int = 0):
        """Decorator: register `fn` as backend `backend`, used when `predicate(*args, **kwargs)` holds."""

        def deco(fn: Callable) -> Callable:
            self._backends = [b for b in self._backends if b.name != backend]
            self._backends.append(_Backend(backend, fn, predicate, priority))
            self._backends.sort(key=lambda b: -b.priority)
            return fn

        return deco

    @property
    def backends(self) -> list[str]:
        return [b.name for b in self._backends]

    def get(self, backend: str) -> Callable:
        for b in self._backends:
            if b.name == backend:
                return b.fn
        raise KeyError(f"kernel {self.name!r} has no backend {backend!r} (have {self.backends})")

    def _forced_name(self) -> Optional[str]:
        stack = getattr(_forced, "stack", None)
        if stack:
            for mapping in reversed(stack):
                if self.name in mapping:
                    return mapping[self.name]
        return _env_choice().get(self.name)

    def __call__(self, *args, **kwargs):
        # hot path (a dozen calls per decoded token): look for a forced backend only when something is forced
        if getattr(_forced, "stack", None) or os.environ.get(_ENV):
            forced = self._forced_name()
            if forced is not None:
                return self.get(forced)(*args, **kwargs)
        for b in self._backends:
            if b.predicate is None or b.predicate(*args, **kwargs):
                return b.fn(*args, **kwargs)
        return self.reference(*args, **kwargs)  # pragma: no cover - reference has no predicate

    def select(self, *args, **kwargs) -> str:
        """The backend name a call with these arguments would use (for tests and benchmarks)."""
        forced = self._forced_name()
        if forced is not None:
            return forced
        for b in self._backends:
            if b.predicate is None or b.predicate(*args, **kwargs):
                return b.name
        return "reference"


KERNELS: dict[str, Kernel] = {}


def kernel(name: str) -> Callable[[Callable], Kernel]:
    """Decorator turning a reference implementation into a dispatchable `Kernel`."""

    def deco(fn: Callable) -> Kernel:
        k = Kernel(name, fn)
        KERNELS[name] = k
        return k

    return deco


_ENV = "MMSTACK_KERNELS"


def _env_choice() -> dict:
    # read on every call (tests and users change it at run time, ~1 us); parsed once per distinct value
    raw = os.environ.get(_ENV)
    parsed = _PARSED.get(raw)
    if parsed is None:
        parsed = _PARSED[raw] = _parse_env(raw or "")
    return parsed


_PARSED: dict[str, dict] = {}  # memo of _parse_env (pure)


def _parse_env(raw: str) -> dict:
    out = {}
    for item in filter(None, (p.strip() for p in raw.split(","))):
        if "=" not in item:
            raise ValueError(f"MMSTACK_KERNELS entry {item!r} is not of the form kernel=backend")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


@contextlib.contextmanager
def use_backend(kernel_name: str, backend: str):
    """Force `backend` for `kernel_name` inside the block (thread-local)."""
    if kernel_name not in KERNELS:
        raise KeyError(f"unknown kernel {kernel_name!r} (have {sorted(KERNELS)})")
    KERNELS[kernel_name].get(backend)  # validate now, not at first call
    stack = getattr(_forced, "stack", None)
    if stack is None:
        stack = _forced.stack = []
    stack.append({kernel_name: backend})
    try:
        yield
    finally:
        stack.pop()
