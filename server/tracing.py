"""Triton's request tracing (the TraceSetting RPC and its trace file), split the way a request is.

- ``TraceSettings`` (engine): the global settings and per-model overrides, validated as Triton names them:
  trace_file, trace_level (OFF | TIMESTAMPS), trace_rate (trace 1 of N), trace_count (-1: no limit; otherwise
  the traces still to collect, counted down), log_frequency (0: the file is written when the file setting
  changes or the server stops; N: every N traces go to ``<trace_file>.<k>``, k = 0, 1, ...). trace_file and
  log_frequency are global only. The engine pushes ``view()`` to every front end.
- ``Sampler`` (front end): decides, per request, whether it is traced (1 of trace_rate per model, or per the
  global settings' shared counter); with tracing off it is one attribute test.
- ``TraceWriter`` (engine): the one writer of the file; Triton's JSON, an array holding for each trace
  ``{"id", "model_name", "model_version", "request_id"}`` then ``{"id", "timestamps": [{"name", "ns"}, ...]}``
  with CLOCK_MONOTONIC nanoseconds (the same clock in every process of the server).
"""
from __future__ import annotations

import json
import os
import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

from trtserve.server.errors import InvalidArgument

log = logging.getLogger("trtserve.trace")

LEVELS = ("OFF", "TIMESTAMPS")
DEFAULTS: Dict[str, List[str]] = {"trace_file": [""], "trace_level": ["OFF"], "trace_rate": ["1000"],
                                  "trace_count": ["-1"], "log_frequency": ["0"]}
GLOBAL_ONLY = ("trace_file", "log_frequency")
STAMPS = ("REQUEST_START", "QUEUE_START", "COMPUTE_START", "COMPUTE_INPUT_END", "COMPUTE_OUTPUT_START",
          "COMPUTE_END", "REQUEST_END")


def _int(key: str, values: Sequence[str], low: int) -> int:
    if len(values) != 1:
        raise InvalidArgument(f"trace setting '{key}' takes one value, got {len(values)}")
    try:
        n = int(values[0])
    except ValueError:
        n = low - 1
    if n < low:
        raise InvalidArgument(f"trace setting '{key}' must be an integer >= {low}, got {values[0]!r}")
    return n


def _check(key: str, values: List[str], model: str) -> List[str]:
    if key not in DEFAULTS:
        raise InvalidArgument(f"trace setting '{key}' is unknown (known: {', '.join(DEFAULTS)})")
    if model and key in GLOBAL_ONLY:
        raise InvalidArgument(f"trace setting '{key}' is global only: set it without a model name")
    if not values:  # clears the setting (TraceSettings.update)
        return []
    if key == "trace_level":
        bad = [v for v in values if v not in LEVELS]
        if bad:
            raise InvalidArgument(f"trace setting 'trace_level' must be OFF or TIMESTAMPS (TENSORS is not "
                                  f"supported), got {bad[0]!r}")
    elif key == "trace_rate":
        _int(key, values, 1)
    elif key == "trace_count":
        _int(key, values, -1)
    elif key == "log_frequency":
        _int(key, values, 0)
    elif key == "trace_file" and len(values) != 1:
        raise InvalidArgument(f"trace setting 'trace_file' takes one value, got {len(values)}")
    return list(values)


def _on(s: Dict[str, List[str]]) -> bool:
    return "TIMESTAMPS" in s["trace_level"] and s["trace_count"] != ["0"]


class TraceSettings:
    """The engine's settings: ``update(model, {key: [values]})`` (an empty list clears: a model's override goes,
    a global setting returns to its default), ``get(model)``, ``view()`` for the front ends."""

    def __init__(self) -> None:
        self.global_: Dict[str, List[str]] = {k: list(v) for k, v in DEFAULTS.items()}
        self.models: Dict[str, Dict[str, List[str]]] = {}

    def get(self, model: str = "") -> Dict[str, List[str]]:
        out = {k: list(v) for k, v in self.global_.items()}
        out.update({k: list(v) for k, v in self.models.get(model, {}).items()})
        return out

    def update(self, model: str, updates: Dict[str, List[str]]) -> None:
        checked = {k: _check(k, list(v), model) for k, v in updates.items()}  # all or nothing
        target = self.models.setdefault(model, {}) if model else self.global_
        for key, values in checked.items():
            if values:
                target[key] = values
            elif model:
                target.pop(key, None)
            else:
                target[key] = list(DEFAULTS[key])
        if model and not target:
            self.models.pop(model, None)

    def owner(self, model: str, key: str) -> Dict[str, List[str]]:
        """The settings dict that holds ``key`` for ``model`` (its override, or the global one)."""
        o = self.models.get(model)
        return o if o is not None and key in o else self.global_

    def view(self) -> Tuple[Optional[Tuple[bool, int]], Dict[str, Tuple[bool, int]]]:
        """What front ends sample with: ((on, rate) of the global settings, {model: (on, rate)} for models with
        an override). Nothing is traced without a trace file."""
        if not self.global_["trace_file"][0]:
            return None, {}
        g = self.global_
        models = {}
        for name in self.models:
            s = self.get(name)
            models[name] = (_on(s), int(s["trace_rate"][0]))
        return (_on(g), int(g["trace_rate"][0])), models


class Sampler:
    """Front end: ``sample(model)`` is True for the requests to trace."""

    __slots__ = ("active", "_global", "_models", "_counts")

    def __init__(self) -> None:
        self.active = False
        self._global: Optional[Tuple[bool, int]] = None
        self._models: Dict[str, Tuple[bool, int]] = {}
        self._counts: Dict[str, int] = {}

    def update(self, view: Any) -> None:
        g, models = view
        self._global, self._models = (tuple(g) if g else None), dict(models)
        self.active = bool(self._global) and (self._global[0] or any(on for on, _ in self._models.values()))

    def sample(self, model: str) -> bool:
        if not self.active:
            return False
        on, rate = self._models.get(model) or self._global  # type: ignore[misc]
        if not on:
            return False
        key = model if model in self._models else ""
        n = self._counts.get(key, 0) + 1
        self._counts[key] = n
        return n % rate == 0


class TraceWriter:
    """Engine: collects finished traces and writes them as Triton does."""

    def __init__(self, settings: TraceSettings) -> None:
        self.settings = settings
        self._next_id = 1
        self._pending: List[Tuple[int, str, str, str, List[Tuple[str, int]]]] = []
        self._file = ""
        self._index = 0

    def add(self, model: str, version: str, request_id: str, stamps: List[Tuple[str, int]]) -> bool:
        """Records one trace unless its trace_count is spent; True when a count reached 0 (the front ends should
        hear that tracing stopped)."""
        owner = self.settings.owner(model, "trace_count")
        count = int(owner["trace_count"][0])
        if count == 0 or not self.settings.global_["trace_file"][0]:
            return False
        self._file = self.settings.global_["trace_file"][0]
        self._pending.append((self._next_id, model, version, request_id, stamps))
        self._next_id += 1
        frequency = int(self.settings.global_["log_frequency"][0])
        if frequency and len(self._pending) >= frequency:
            self._write(f"{self._file}.{self._index}")
            self._index += 1
        if count > 0:
            owner["trace_count"] = [str(count - 1)]
            return count == 1
        return False

    def flush(self) -> None:
        """Writes what is collected: to ``trace_file`` (log_frequency 0) or its next numbered file."""
        if not self._pending:
            return
        frequency = int(self.settings.global_["log_frequency"][0])
        if frequency:
            self._write(f"{self._file}.{self._index}")
            self._index += 1
        else:
            self._write(self._file)

    def restart_numbering(self) -> None:
        """A new trace file: its numbered files start at 0 (what was collected went to the old one: flush)."""
        self._index = 0

    def _write(self, path: str) -> None:
        records: List[Dict[str, Any]] = []
        for trace_id, model, version, request_id, stamps in self._pending:
            records.append({"id": trace_id, "model_name": model,
                            "model_version": int(version) if version.isdigit() else -1,
                            "request_id": request_id})
            records.append({"id": trace_id, "timestamps": [{"name": n, "ns": ns} for n, ns in stamps]})
        self._pending = []
        try:  # written beside it, then renamed: a reader never sees a file half written
            partial = f"{path}.partial"
            with open(partial, "w", encoding="utf-8") as f:
                json.dump(records, f)
            os.replace(partial, path)
        except OSError as e:
            log.error("cannot write the trace file %s: %s (%d traces lost)", path, e, len(records) // 2)
