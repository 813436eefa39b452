"""Key tables: checkpoint names of each source format <-> mmstack's internal parameter names.

A table is data: an ordered list of `Rule`s. A rule maps one source pattern to one internal pattern,
optionally as a slice of a stacked tensor (per-expert weights stacked on dim 0; gate/up fused on dim 1).
The same table drives loading (source -> internal) and export / manifest checks (internal -> source).

Patterns use `{i}` (layer), `{j}` (expert) and `{rest}` (any suffix) placeholders.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Iterable, Iterator, Optional


@dataclass(frozen=True)
class Rule:
    src: str
    dst: str
    stack: bool = False  # source key carries {j}: internal dst[j] (dim 0)
    part: Optional[tuple[int, int]] = None  # (k, n): chunk k of n along the slice's first dim
    squeeze: Optional[int] = None  # the source stores the internal tensor with this (size-1) dim removed

    @cached_property
    def src_re(self) -> re.Pattern:
        return _compile(self.src)

    @cached_property
    def dst_re(self) -> re.Pattern:
        return _compile(self.dst)


def _compile(pattern: str) -> re.Pattern:
    out, pos = [], 0
    for m in re.finditer(r"\{(i|j|rest)\}", pattern):
        out.append(re.escape(pattern[pos : m.start()]))
        out.append(r"(?P<rest>.+)" if m.group(1) == "rest" else rf"(?P<{m.group(1)}>\d+)")
        pos = m.end()
    out.append(re.escape(pattern[pos:]))
    return re.compile("".join(out) + r"\Z")


@dataclass(frozen=True)
class Slot:
    """Where a source tensor goes: internal `name`, expert index, part (k, n), squeezed dim (or None)."""

    name: str
    expert: Optional[int] = None
    part: Optional[tuple[int, int]] = None
    squeeze: Optional[int] = None


class KeyTable:
    def __init__(self, name: str, rules: Iterable[Rule], ignore: Iterable[str] = ()):
        self.name = name
        self.rules = list(rules)
        self.ignore = [re.compile(p) for p in ignore]  # source keys dropped on purpose (none by default)

    def __repr__(self) -> str:
        return f"KeyTable({self.name!r}, {len(self.rules)} rules)"

    def extend(self, rules: Iterable[Rule], first: bool = True) -> "KeyTable":
        """A new table with extra rules (tried before the existing ones when `first`)."""
        rules = list(rules)
        return KeyTable(self.name, rules + self.rules if first else self.rules + rules)

    # source -> internal
    def to_internal(self, key: str) -> Optional[Slot]:
        for rule in self.rules:
            m = rule.src_re.match(key)
            if m is None:
                continue
            g = m.groupdict()
            name = rule.dst.format(**{k: v for k, v in g.items() if k != "j"})
            return Slot(name, int(g["j"]) if rule.stack else None, rule.part, rule.squeeze)
        return None

    def is_ignored(self, key: str) -> bool:
        return any(p.match(key) for p in self.ignore)

    def squeezed(self, name: str) -> Optional[int]:
        """The dim a source format drops from internal tensor `name` (e.g. a [1, N, D] position table)."""
        for rule in self.rules:
            if rule.squeeze is not None and rule.dst_re.match(name):
                return rule.squeeze
        return None

    # internal -> source: yields (source key, expert, part) for one internal tensor of `shape`
    def to_source(self, name: str, shape: tuple) -> Iterator[tuple[str, Optional[int], Optional[tuple[int, int]]]]:
        specific = [r for r in self.rules if "{rest}" not in r.dst and r.dst_re.match(name)]
        for rule in specific:
            g = rule.dst_re.match(name).groupdict()
            if rule.stack:
                for j in range(shape[0]):
                    yield rule.src.format(j=j, **g), j, rule.part
            else:
                yield rule.src.format(**g), None, rule.part
        if specific:
            return
        for rule in self.rules:
            m = rule.dst_re.match(name)
            if m is not None:
                yield rule.src.format(**m.groupdict()), None, rule.part
                return


def export_names(table: KeyTable, shapes: dict[str, tuple]) -> dict[str, tuple]:
    """Source-format names and shapes for internal `shapes` (name -> shape), through `table`."""
    out = {}
    for name, shape in shapes.items():
        for key, expert, part in table.to_source(name, tuple(shape)):
            s = list(shape[1:]) if expert is not None else list(shape)
            if part is not None:
                s[0] //= part[1]
            sq = table.squeezed(name)
            if sq is not None:
                del s[sq]
            out[key] = tuple(s)
    return out
