"""The bundled example repository (``trtserve serve`` with no --model-repository serves it)."""
from __future__ import annotations

import pathlib

REPOSITORY = pathlib.Path(__file__).resolve().parent / "models"
