"""Tests that need CUDA, CuPy and TensorRT; each module skips itself, with the reason, when they are missing."""
