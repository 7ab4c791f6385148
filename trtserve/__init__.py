"""trtserve: a KServe v2 / Triton-compatible gRPC inference server for TensorRT engines.

The code lives in the project's fixed top-level folders and is imported as ``trtserve.server``,
``trtserve.client`` and ``trtserve.protos``. An installed wheel places those folders inside this
package; in a source checkout (and on the GPU kit, which has no pip) they sit beside it, so the
checkout root joins this package's search path and ``PYTHONPATH=<checkout>`` is all it takes.
"""
from __future__ import annotations

import pathlib as _pathlib

__version__ = "0.1.0"

_root = _pathlib.Path(__file__).resolve().parent.parent
if not (_pathlib.Path(__file__).parent / "server").is_dir() and (_root / "server" / "__init__.py").is_file():
    __path__.append(str(_root))  # type: ignore[name-defined]  # noqa: F821
