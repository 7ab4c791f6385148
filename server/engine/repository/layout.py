"""Scans a Triton-layout model repository: ``<repo>/<model>/config.pbtxt`` and ``<model>/<N>/<file>``."""
from __future__ import annotations

import hashlib
import pathlib
import re
from typing import Dict, List, Optional, Sequence, Tuple

from trtserve.protos import model_config_pb2 as mc
from trtserve.server.errors import NotFound

_MODEL_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def model_names(repo: pathlib.Path) -> List[str]:
    """Every folder in the repository that looks like a model (has a config or a version folder)."""
    names = []
    for p in sorted(repo.iterdir()) if repo.is_dir() else ():
        if p.is_dir() and not p.name.startswith(".") and _MODEL_NAME.match(p.name):
            if (p / "config.pbtxt").is_file() or any(v.is_dir() and v.name.isdigit() for v in p.iterdir()):
                names.append(p.name)
    return names


def model_dir(repo: pathlib.Path, name: str) -> pathlib.Path:
    """The folder of ``name``; NotFound for unknown names (and for anything that would leave the repo)."""
    if not _MODEL_NAME.match(name) or name in (".", ".."):
        raise NotFound(f"model '{name}' is not in the repository")
    path = repo / name
    try:
        found = path.is_dir()
    except OSError:  # e.g. ENAMETOOLONG: a name no folder can have
        found = False
    if not found:
        raise NotFound(f"model '{name}' is not in the repository {repo}")
    return path


def available_versions(path: pathlib.Path) -> List[int]:
    """Numeric version folders, ascending."""
    return sorted(int(v.name) for v in path.iterdir() if v.is_dir() and v.name.isdigit())


def select_versions(available: Sequence[int], policy: Optional[mc.ModelVersionPolicy]) -> List[int]:
    """Applies a ModelVersionPolicy message (latest{num_versions} / all / specific{versions}); None, as a config
    without one, keeps the latest version, Triton's default."""
    choice = policy.WhichOneof("policy_choice") if policy is not None else None
    if choice == "all":
        return list(available)
    if choice == "specific":
        return [v for v in available if v in set(policy.specific.versions)]
    n = policy.latest.num_versions if choice == "latest" and policy.latest.num_versions > 0 else 1
    return list(available)[-n:]


def stamp(path: pathlib.Path) -> Tuple[tuple, Dict[str, tuple]]:
    """What a repository poll compares (blocking: walks the folder): (the model's own files outside its version
    folders: config.pbtxt, label files, warm-up data; {version folder: its files}). A file is (path, size, mtime);
    files outside version folders are small, so their contents count too (an edit within the same mtime tick)."""
    own: List[tuple] = []
    versions: Dict[str, tuple] = {}
    try:
        entries = sorted(path.iterdir())
    except OSError:
        return (), {}
    for p in entries:
        if p.is_dir() and p.name.isdigit():
            versions[str(int(p.name))] = tuple(_files(p))
        else:
            own.extend(_files(p, contents=True))
    return tuple(own), versions


def _files(path: pathlib.Path, contents: bool = False) -> List[tuple]:
    out: List[tuple] = []
    try:
        if path.is_dir():
            for p in sorted(path.rglob("*")):
                if p.is_file():
                    out.extend(_files(p, contents))
            return out
        st = path.stat()
        entry: tuple = (str(path), st.st_size, st.st_mtime_ns)
        if contents and st.st_size <= (1 << 20):
            entry += (hashlib.sha1(path.read_bytes()).hexdigest(),)
        out.append(entry)
    except OSError:  # removed while it was read: the next poll sees the change settled
        out.append((str(path), -1, -1))
    return out
