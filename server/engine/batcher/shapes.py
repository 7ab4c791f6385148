"""Pure shape logic: which requests may share a batch, padded to what, on which profile.

Requests share a batch when every input has the same non-batch shape, or, for inputs the model marks
paddable (``trtserve.pad.<input>``), when the padded shape (element-wise max over the batch) still
fits one optimization profile together with the batch's total rows. A backend without profiles
(ONNX Runtime) accepts any shape within the config dims, so only max_batch_size limits it.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Mapping, Optional, Sequence, Tuple

from trtserve.server.engine.backends.base import Profile

Shape = Tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class ShapeRules:
    batches: bool  # max_batch_size > 0
    max_batch_size: int
    paddable: frozenset  # input names that may be padded
    profiles: Tuple[Profile, ...]  # empty: no shape-range limits
    # fitting() answers per (rows, shapes): the scheduler asks for the same few keys on every submit, merge and
    # placement (~10 us each with sorting); bounded, since variable dims could make the key space large
    _fits: Dict[tuple, Tuple[Profile, ...]] = dataclasses.field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def full(self, rows: int, shapes: Mapping[str, Shape]) -> Dict[str, Shape]:
        """Shapes with the batch dimension in front (as the backend sees them)."""
        return {n: ((rows,) + s if self.batches else s) for n, s in shapes.items()}

    def fitting(self, rows: int, shapes: Mapping[str, Shape]) -> Tuple[Profile, ...]:
        """Profiles that accept this batch, best (closest to opt, then smallest max batch) first."""
        if not self.profiles:
            return ()
        key = (rows, tuple(shapes.items()))
        hit = self._fits.get(key)
        if hit is not None:
            return hit
        full = self.full(rows, shapes)
        fits = [p for p in self.profiles if p.fits(full)]
        answer = tuple(sorted(fits, key=lambda p: (p.distance(full), _max_rows(p), p.index)))
        if len(self._fits) >= _FIT_CACHE_SIZE:
            self._fits.clear()
        self._fits[key] = answer
        return answer

    def accepts(self, rows: int, shapes: Mapping[str, Shape]) -> bool:
        if self.batches and rows > self.max_batch_size:
            return False
        return not self.profiles or bool(self.fitting(rows, shapes))

    def merge(self, rows: int, shapes: Mapping[str, Shape], other_rows: int,
              other: Mapping[str, Shape]) -> Optional[Tuple[int, Dict[str, Shape]]]:
        """(rows, padded shapes) of the batch with ``other`` added, or None if they cannot share one. When
        nothing pads, the shapes given are returned as they are, not copied (one merge per queued request while a
        batch forms): callers never change a batch's shapes."""
        if not self.batches:
            return None
        total = rows + other_rows
        if total > self.max_batch_size:
            return None
        if shapes == other:  # the usual case, checked once for the whole dict: nothing to pad
            return (total, shapes) if not self.profiles or self.fitting(total, shapes) else None  # type: ignore
        if set(shapes) != set(other):
            return None
        merged: Dict[str, Shape] = {}
        for name, s in shapes.items():
            o = other[name]
            if s == o:
                merged[name] = s
            elif name in self.paddable and len(s) == len(o):
                merged[name] = tuple(max(a, b) for a, b in zip(s, o))
            else:
                return None
        if self.profiles and not self.fitting(total, merged):
            return None
        return total, merged


_FIT_CACHE_SIZE = 4096


def _max_rows(p: Profile) -> int:
    return max((r.max[0] for r in p.inputs.values() if r.max), default=0)


def describe_profiles(profiles: Sequence[Profile]) -> str:
    return "; ".join(p.describe() for p in profiles) or "none"
