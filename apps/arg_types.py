"""argparse types for the servers' sizes and limits: a value no server could run with (a zero batch, a negative or NaN
body limit, a port beyond 65535) is a usage error naming the flag at start, not a server that starts and then fails
every request. argparse only: importing this loads no model code."""
from __future__ import annotations

import argparse
import math


def _number(text: str, kind):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def at_least(lo: int):
    """An integer >= lo."""
    def parse(text: str) -> int:
        n = _number(text, int)
        if n < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {n}")
        return n

    return parse


def positive_float(text: str) -> float:
    """A finite number above 0 (sizes in MB)."""
    x = _number(text, float)
    if not math.isfinite(x) or x <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text!r}")
    return x


def port(lo: int = 0):
    """A TCP port, lo..65535 (0: any free one, for servers that can bind it; gradio cannot)."""
    def parse(text: str) -> int:
        n = _number(text, int)
        if not lo <= n <= 65535:
            raise argparse.ArgumentTypeError(f"must be a port number {lo}..65535, got {n}")
        return n

    return parse
