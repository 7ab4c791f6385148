"""Regenerates the Python stubs beside the .proto files (``python -m trtserve.protos.generate``).

The stubs are committed so that the GPU kit (no pip, Python 3.9) can import them; tests/test_protos.py
regenerates into a temporary folder and fails when the committed files are stale.

Two deterministic edits follow protoc:
- imports become package-qualified (``from trtserve.protos import model_config_pb2``), since protoc
  writes bare ``import model_config_pb2`` for files in one folder;
- the files register in trtserve's own descriptor pool (``_pool.POOL``) instead of the process-wide
  default one. tritonclient registers the same ``inference.*`` symbols in the default pool, and a
  client or test process that imports both would otherwise fail with "duplicate symbol".
"""
from __future__ import annotations

import argparse
import pathlib
import re
import shutil
import sys
import tempfile
from typing import Dict

HERE = pathlib.Path(__file__).resolve().parent
PROTOS = ("model_config.proto", "grpc_service.proto")
GRPC_TOOLS_VERSION = "1.80.0"  # generated code requires grpcio >= this at run time; the GPU kit has 1.80


def _rewrite(text: str) -> str:
    text = re.sub(r"^import (\w+_pb2) as (\w+)$", r"from trtserve.protos import \1 as \2", text, flags=re.M)
    text = text.replace(
        "from google.protobuf import descriptor_pool as _descriptor_pool\n",
        "from google.protobuf import descriptor_pool as _descriptor_pool  # noqa: F401\n"
        "from trtserve.protos import _pool\n",
    )
    return text.replace("_descriptor_pool.Default()", "_pool.POOL")


def generate() -> Dict[str, str]:
    """Runs protoc over protos/*.proto and returns {file name: rewritten source}."""
    import grpc_tools
    from grpc_tools import protoc

    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as out:
        args = ["protoc", f"-I{HERE}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}"]
        if protoc.main(args + [str(HERE / p) for p in PROTOS]) != 0:
            raise RuntimeError("protoc failed")
        files = {}
        for path in sorted(pathlib.Path(out).glob("*.py")):
            if path.name.startswith("model_config_pb2_grpc"):
                continue  # no services in model_config.proto
            files[path.name] = _rewrite(path.read_text())
        return files


def main(argv: "list[str] | None" = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed stubs are stale")
    ns = parser.parse_args(argv)
    files = generate()
    stale = [n for n, t in files.items() if not (HERE / n).exists() or (HERE / n).read_text() != t]
    if ns.check:
        for n in stale:
            print(f"stale: protos/{n}", file=sys.stderr)
        return 1 if stale else 0
    for n, t in files.items():
        (HERE / n).write_text(t)
    print(f"wrote {len(files)} files into {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
