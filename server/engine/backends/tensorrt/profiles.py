"""Optimization profiles from config.pbtxt ``parameters``, and which instance serves which profile. Pure.

Two equivalent spellings (not mixed in one config); shapes are full shapes, batch dimension first:

    parameters { key: "trtserve.profiles"
                 value { string_value: '[{"batch": [1, 4, 8]},
                                         {"batch": [9, 32, 64], "x": {"min": [9, 16], "opt": [32, 16], "max": [64, 16]}}]' } }

    parameters { key: "trtserve.profile.0.batch" value { string_value: "1;4;8" } }
    parameters { key: "trtserve.profile.1.x"     value { string_value: "9x16;32x16;64x16" } }

A profile entry gives ``batch`` (min;opt;max rows, batched models only) and/or per-input ranges (a JSON object
with min/opt/max, or the string "min;opt;max" with dims joined by 'x' or ','). An input without an explicit
range takes the profile's batch range (default 1..max_batch_size, opt max_batch_size) and its fixed config dims;
a variable (-1) non-batch dimension must be given explicitly. Without any profile parameter the model gets one
profile, batch 1..max_batch_size.

TensorRT 8.6 cannot give one profile to two live contexts, so there each instance gets its own copy of its
profile in the engine ("physical" profiles); from 10.0 instances share them (``layout``).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from trtserve.server.engine.backends.base import ShapeRange
from trtserve.server.errors import ModelLoadError

Shape = Tuple[int, ...]
ProfileSpec = Dict[str, ShapeRange]  # input name -> full-shape range

PROFILES_KEY = "trtserve.profiles"
_PER_KEY = re.compile(r"^trtserve\.profile\.(\d+)\.(.+)$")


def has_profile_parameters(parameters: Mapping[str, str]) -> bool:
    """True if the config declares profiles (then batch coverage may be split across profiles)."""
    return PROFILES_KEY in parameters or any(_PER_KEY.match(k) for k in parameters)


def _shape(text: str, where: str) -> Shape:
    parts = [p for p in re.split(r"[x,\s]+", text.strip()) if p]
    try:
        return tuple(int(p) for p in parts)
    except ValueError:
        raise ModelLoadError(f"{where}: {text!r} is not a shape (dims joined by 'x' or ',')") from None


def _triple(value: object, where: str) -> Tuple[Shape, Shape, Shape]:
    """min/opt/max from {"min":..,"opt":..,"max":..}, [min, opt, max] or "min;opt;max"."""
    if isinstance(value, str):
        parts = value.split(";")
        if len(parts) != 3:
            raise ModelLoadError(f"{where}: expected 'min;opt;max', got {value!r}")
        lo, op, hi = (_shape(p, where) for p in parts)
        return lo, op, hi
    if isinstance(value, dict):
        try:
            return tuple(tuple(int(d) for d in value[k]) for k in ("min", "opt", "max"))  # type: ignore[return-value]
        except (KeyError, TypeError, ValueError):
            raise ModelLoadError(f"{where}: expected {{'min': [..], 'opt': [..], 'max': [..]}}, got {value!r}") from None
    if isinstance(value, list) and len(value) == 3:
        try:
            return tuple(tuple(int(d) for d in (v if isinstance(v, list) else [v])) for v in value)  # type: ignore[return-value]
        except (TypeError, ValueError):
            pass
    raise ModelLoadError(f"{where}: expected min/opt/max, got {value!r}")


def _raw_entries(parameters: Mapping[str, str]) -> List[Dict[str, object]]:
    """The declared profile entries, in index order, from either spelling."""
    per_key = {k: v for k, v in parameters.items() if _PER_KEY.match(k)}
    if PROFILES_KEY in parameters and per_key:
        raise ModelLoadError(f"use either '{PROFILES_KEY}' or 'trtserve.profile.<n>.<input>' keys, not both")
    if PROFILES_KEY in parameters:
        try:
            entries = json.loads(parameters[PROFILES_KEY])
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"parameter '{PROFILES_KEY}' is not valid JSON: {e}") from None
        if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
            raise ModelLoadError(f"parameter '{PROFILES_KEY}' must be a non-empty JSON list of objects")
        return entries
    by_index: Dict[int, Dict[str, object]] = {}
    for key, value in per_key.items():
        m = _PER_KEY.match(key)
        assert m is not None
        by_index.setdefault(int(m.group(1)), {})[m.group(2)] = value
    if by_index and sorted(by_index) != list(range(len(by_index))):
        raise ModelLoadError(f"profile indices must be 0..{len(by_index) - 1} without gaps, got {sorted(by_index)}")
    return [by_index[i] for i in range(len(by_index))]


def _check_range(name: str, index: int, dims: Shape, max_batch_size: int, r: ShapeRange) -> None:
    where = f"profile {index} input '{name}'"
    batched = max_batch_size > 0
    rank = len(dims) + (1 if batched else 0)
    for label, s in (("min", r.min), ("opt", r.opt), ("max", r.max)):
        if len(s) != rank:
            raise ModelLoadError(f"{where}: {label} {list(s)} has rank {len(s)}, the input has rank {rank}")
    for i, (lo, op, hi) in enumerate(zip(r.min, r.opt, r.max)):
        if not 0 <= lo <= op <= hi:
            raise ModelLoadError(f"{where}: dim {i} needs 0 <= min <= opt <= max, got {lo}, {op}, {hi}")
    full = ((-1,) if batched else ()) + tuple(dims)
    for i, d in enumerate(full):
        if d != -1 and not (r.min[i] == r.opt[i] == r.max[i] == d):
            raise ModelLoadError(
                f"{where}: dim {i} is fixed to {d} by the config, profile gives {r.min[i]};{r.opt[i]};{r.max[i]}"
            )
    if batched and (r.min[0] < 1 or r.max[0] > max_batch_size):
        raise ModelLoadError(
            f"{where}: batch range {r.min[0]}..{r.max[0]} must lie within 1..max_batch_size ({max_batch_size})"
        )


def parse_profiles(
    parameters: Mapping[str, str], inputs: Sequence[Tuple[str, Shape]], max_batch_size: int
) -> List[ProfileSpec]:
    """Logical profiles for ``inputs`` (name, dims without the batch dimension) from the config parameters."""
    names = [n for n, _ in inputs]
    entries = _raw_entries(parameters) or [{}]
    profiles: List[ProfileSpec] = []
    for index, entry in enumerate(entries):
        unknown = sorted(set(entry) - set(names) - {"batch"})
        if unknown:
            raise ModelLoadError(f"profile {index} names unknown input(s) {unknown}; model inputs: {names}")
        batch: Optional[Tuple[int, int, int]] = None
        if "batch" in entry:
            if max_batch_size <= 0:
                raise ModelLoadError(f"profile {index}: 'batch' needs max_batch_size > 0")
            b = _triple(entry["batch"], f"profile {index} batch")
            if any(len(s) != 1 for s in b):
                raise ModelLoadError(f"profile {index} batch: expected three numbers min;opt;max, got {entry['batch']!r}")
            batch = (b[0][0], b[1][0], b[2][0])
        elif max_batch_size > 0:
            batch = (1, max_batch_size, max_batch_size)
        spec: ProfileSpec = {}
        for name, dims in inputs:
            if name in entry:
                lo, op, hi = _triple(entry[name], f"profile {index} input '{name}'")
                r = ShapeRange(lo, op, hi)
                if batch is not None and "batch" in entry and (r.min[0], r.opt[0], r.max[0]) != batch:
                    raise ModelLoadError(
                        f"profile {index} input '{name}': batch dim {r.min[0]};{r.opt[0]};{r.max[0]} "
                        f"disagrees with the profile's batch {batch[0]};{batch[1]};{batch[2]}"
                    )
            else:
                dynamic = [i for i, d in enumerate(dims) if d < 0]
                if dynamic:
                    raise ModelLoadError(
                        f"profile {index} input '{name}': dims {list(dims)} have variable dimension(s) {dynamic}; "
                        f"give its range in parameter '{PROFILES_KEY}' or 'trtserve.profile.{index}.{name}'"
                    )
                head = (batch,) if batch is not None else ()
                lo = tuple(h[0] for h in head) + tuple(dims)
                op = tuple(h[1] for h in head) + tuple(dims)
                hi = tuple(h[2] for h in head) + tuple(dims)
                r = ShapeRange(lo, op, hi)
            _check_range(name, index, tuple(dims), max_batch_size, r)
            spec[name] = r
        profiles.append(spec)
    return profiles


def batch_coverage_gap(profiles: Sequence[ProfileSpec], max_batch_size: int, every_profile: bool) -> Optional[str]:
    """Why the profiles cannot serve every batch of 1..max_batch_size rows, or None.

    ``every_profile``: each profile must reach max_batch_size (the default); otherwise their union must cover
    1..max_batch_size (the config declared split profiles on purpose)."""
    if max_batch_size <= 0 or not profiles:
        return None
    ranges = []
    for i, p in enumerate(profiles):
        if not p:
            continue
        lo = max(r.min[0] for r in p.values())
        hi = min(r.max[0] for r in p.values())
        if every_profile and hi < max_batch_size:
            return (
                f"profile {i} allows at most {hi} rows but max_batch_size is {max_batch_size} "
                f"(to split batch sizes across profiles declare them in '{PROFILES_KEY}', or for a prebuilt plan set "
                f"'trtserve.split_batch_profiles')"
            )
        ranges.append((lo, hi))
    missing = [b for b in range(1, max_batch_size + 1) if not any(lo <= b <= hi for lo, hi in ranges)]
    if missing:
        return f"no profile accepts batch size(s) {missing[:8]}{' ...' if len(missing) > 8 else ''} (max_batch_size {max_batch_size})"
    return None


@dataclass(frozen=True)
class Layout:
    """How logical profiles, engine ("physical") profiles and instances relate."""

    physical_to_logical: Tuple[int, ...]  # engine profile index -> logical profile index
    instance_to_physical: Tuple[int, ...]  # instance -> engine profile index its context is pinned to

    def instance_logical(self, instance: int) -> int:
        return self.physical_to_logical[self.instance_to_physical[instance]]

    def instances_of(self, logical: int) -> Tuple[int, ...]:
        return tuple(i for i in range(len(self.instance_to_physical)) if self.instance_logical(i) == logical)


def layout_for_build(n_logical: int, instance_count: int, share: bool) -> Layout:
    """Engine profiles to build: shared (10+) = the logical ones, instances round-robin over them; not shared
    (8.6) = one copy per instance (instance i -> logical i % n), plus any logical profile no instance took."""
    if n_logical < 1 or instance_count < 1:
        raise ValueError("need at least one profile and one instance")
    if share:
        return Layout(tuple(range(n_logical)), tuple(i % n_logical for i in range(instance_count)))
    count = max(instance_count, n_logical)
    return Layout(tuple(i % n_logical for i in range(count)), tuple(range(instance_count)))


def layout_for_plan(n_engine: int, instance_count: int, share: bool) -> Layout:
    """A prebuilt plan's profiles are fixed: shared -> round-robin; not shared -> instance i takes profile i."""
    if not share and instance_count > n_engine:
        raise ModelLoadError(
            f"the engine has {n_engine} optimization profile(s) but instance_group count is {instance_count}: "
            f"before TensorRT 10 every live execution context needs its own profile; rebuild with >= "
            f"{instance_count} profiles or lower the count"
        )
    return Layout(tuple(range(n_engine)), tuple(i % n_engine for i in range(instance_count)))


def to_jsonable(profiles: Sequence[ProfileSpec]) -> List[Dict[str, List[List[int]]]]:
    """Canonical form for cache keys and logs."""
    return [{n: [list(r.min), list(r.opt), list(r.max)] for n, r in sorted(p.items())} for p in profiles]
