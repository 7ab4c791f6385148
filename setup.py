"""Maps the fixed top-level folders onto one import namespace: server/ -> trtserve.server,
client/ -> trtserve.client, protos/ -> trtserve.protos (metadata lives in pyproject.toml)."""
import pathlib

from setuptools import setup

ROOT = pathlib.Path(__file__).parent
FOLDERS = {"trtserve": "trtserve", "trtserve.server": "server", "trtserve.client": "client", "trtserve.protos": "protos"}


def _packages():
    names = []
    for package, folder in FOLDERS.items():
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            rel = init.parent.relative_to(ROOT / folder).parts
            names.append(".".join((package,) + rel))
    return names


setup(packages=_packages(), package_dir=FOLDERS)
