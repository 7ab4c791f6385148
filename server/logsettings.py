"""Triton's log settings (the LogSettings RPC), applied to this process's logging.

The engine holds the settings and pushes them to every front end (engine/core.py, SETTINGS), so a change made
through any front end applies to every process of the server. Keys and types are Triton's:

  log_info, log_warning, log_error   bool: records of that severity are written or dropped
  log_verbose_level                  int >= 0: > 0 writes trtserve's DEBUG records (Triton's verbose log)
  log_format                         "default" or "ISO8601" (UTC timestamps, as Triton's ISO8601 format)
  log_file                           "" (standard error) or a file every process appends to
"""
from __future__ import annotations

import logging
import time
from typing import Any, Dict, List, Optional

from trtserve.server.errors import InvalidArgument

KEYS = {"log_file": str, "log_info": bool, "log_warning": bool, "log_error": bool, "log_verbose_level": int,
        "log_format": str}
FORMATS = ("default", "ISO8601")

_LOGGER = "trtserve"  # verbose records are trtserve's own; other libraries keep the level they were given


def initial() -> Dict[str, Any]:
    """The settings the process started with (the CLI's --log-level)."""
    level = logging.getLogger().getEffectiveLevel()
    return {"log_file": "", "log_info": level <= logging.INFO, "log_warning": level <= logging.WARNING,
            "log_error": level <= logging.ERROR, "log_verbose_level": 1 if level <= logging.DEBUG else 0,
            "log_format": "default"}


def validate(updates: Dict[str, Any], current: Dict[str, Any]) -> Dict[str, Any]:
    """``current`` with ``updates`` applied; InvalidArgument naming the key for an unknown key or a bad value.
    A value of None leaves the key as it is."""
    out = dict(current)
    for key, value in updates.items():
        want = KEYS.get(key)
        if want is None:
            raise InvalidArgument(f"log setting '{key}' is unknown (known: {', '.join(KEYS)})")
        if value is None:
            continue
        if want is bool and not isinstance(value, bool):
            raise InvalidArgument(f"log setting '{key}' must be a boolean, got {value!r}")
        if want is int and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise InvalidArgument(f"log setting '{key}' must be a non-negative integer, got {value!r}")
        if want is str and not isinstance(value, str):
            raise InvalidArgument(f"log setting '{key}' must be a string, got {value!r}")
        if key == "log_format" and value not in FORMATS:
            raise InvalidArgument(f"log setting 'log_format' must be one of {', '.join(FORMATS)}, got {value!r}")
        out[key] = value
    return out


class _Severity(logging.Filter):
    """Drops the records whose severity the settings turn off."""

    def __init__(self) -> None:
        super().__init__()
        self.info = self.warning = self.error = True

    def filter(self, record: logging.LogRecord) -> bool:
        n = record.levelno
        if n >= logging.ERROR:
            return self.error
        if n >= logging.WARNING:
            return self.warning
        if n >= logging.INFO:
            return self.info
        return True  # DEBUG: the trtserve logger's level decides


class _State:
    def __init__(self) -> None:
        self.applied: Optional[Dict[str, Any]] = None
        self.captured = False  # the process's own handlers and formats are remembered
        self.severity = _Severity()
        self.console: List[logging.Handler] = []  # the handlers the process started with
        self.formats: Dict[int, logging.Formatter] = {}  # id(handler) -> its original formatter
        self.file: Optional[logging.FileHandler] = None
        self.file_path = ""


# one per process on purpose: what it configures (the logging module's handlers and levels) is process-wide
_state = _State()


def _iso8601(base: Optional[logging.Formatter]) -> logging.Formatter:
    fmt = base._fmt if base is not None and base._fmt else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    f = logging.Formatter(fmt, datefmt="%Y-%m-%dT%H:%M:%SZ")
    f.converter = time.gmtime  # type: ignore[assignment]
    return f


def apply(settings: Dict[str, Any]) -> None:
    """Makes this process log as ``settings`` say (idempotent; cheap when nothing changed). OSError when the
    log file cannot be opened."""
    s = _state
    if settings == s.applied:
        return
    if s.applied is None and settings == initial():  # as the process started: leave its logging untouched
        s.applied = dict(settings)
        return
    root = logging.getLogger()
    if not s.captured:
        s.captured = True
        s.console = [h for h in root.handlers if h is not s.file]
        for h in s.console:
            s.formats[id(h)] = h.formatter  # type: ignore[assignment]
    path = settings.get("log_file", "")
    if path != s.file_path:
        new = logging.FileHandler(path, mode="a", encoding="utf-8", delay=False) if path else None
        if s.file is not None:
            root.removeHandler(s.file)
            s.file.close()
        s.file, s.file_path = new, path
        for h in s.console:
            if new is None and h not in root.handlers:
                root.addHandler(h)
            elif new is not None:
                root.removeHandler(h)
        if new is not None:
            s.formats[id(new)] = s.formats.get(id(s.console[0])) if s.console else None  # type: ignore[assignment]
            root.addHandler(new)
    s.severity.info = bool(settings.get("log_info", True))
    s.severity.warning = bool(settings.get("log_warning", True))
    s.severity.error = bool(settings.get("log_error", True))
    iso = settings.get("log_format") == "ISO8601"
    for h in s.console + ([s.file] if s.file is not None else []):
        if s.severity not in h.filters:
            h.addFilter(s.severity)
        base = s.formats.get(id(h))
        h.setFormatter(_iso8601(base) if iso else base)  # type: ignore[arg-type]
    verbose = int(settings.get("log_verbose_level", 0)) > 0
    # INFO and up are filtered by severity (initial() turns log_info off when the process started at WARNING);
    # without verbose the trtserve logger inherits the process's level again, unless that lets DEBUG through
    logging.getLogger(_LOGGER).setLevel(logging.DEBUG if verbose else logging.INFO
                                        if s.severity.info or root.getEffectiveLevel() <= logging.DEBUG
                                        else logging.NOTSET)
    s.applied = dict(settings)
    logging.getLogger(_LOGGER + ".logsettings").debug("log settings applied in this process: %s",
                                                      ", ".join(f"{k}={v!r}" for k, v in sorted(settings.items())))
