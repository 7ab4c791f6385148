"""cudart.Runtime's calls and their errors, against a stand-in library (the real one runs in tests/gpu)."""
from __future__ import annotations

import ctypes
import types
from typing import List

import pytest

from trtserve.server.engine.backends.tensorrt import cudart


def _library(status: int, calls: List[tuple]) -> types.SimpleNamespace:
    """Functions as ctypes returns them take argtypes and restype; these record their arguments and return
    ``status``."""
    def fn(name: str):
        def call(*args):
            calls.append((name,) + args)
            if name == "cudaEventElapsedTime":
                ctypes.cast(args[0], ctypes.POINTER(ctypes.c_float))[0] = 1.5
            return status
        return call

    lib = types.SimpleNamespace(cudaMemcpyAsync=fn("cudaMemcpyAsync"), cudaEventRecord=fn("cudaEventRecord"),
                                cudaEventElapsedTime=fn("cudaEventElapsedTime"))
    lib.cudaGetErrorName = lambda status: b"cudaErrorInvalidValue" if status == 1 else None
    lib.cudaGetLastError = lambda: calls.append(("cudaGetLastError",))
    return lib


def test_calls_pass_their_arguments_and_read_the_elapsed_time() -> None:
    calls: List[tuple] = []
    rt = cudart.Runtime(_library(0, calls))
    rt.memcpy(0x1000, 0x2000, 64, cudart.HOST_TO_DEVICE, 0x30)
    rt.record(0x40, 0x30)
    assert rt.elapsed_ms(0x40, 0x50) == 1.5
    assert calls[:2] == [("cudaMemcpyAsync", 0x1000, 0x2000, 64, 1, 0x30), ("cudaEventRecord", 0x40, 0x30)]


@pytest.mark.parametrize("status, name", [(1, "cudaErrorInvalidValue"), (999, "CUDA error")])
def test_an_error_names_the_call_and_what_cuda_calls_it_and_is_cleared(status: int, name: str) -> None:
    calls: List[tuple] = []
    rt = cudart.Runtime(_library(status, calls))
    with pytest.raises(cudart.CudaCallError, match=rf"cudaMemcpyAsync failed: {name} \({status}\)"):
        rt.memcpy(1, 2, 3, cudart.DEFAULT, 4)
    assert calls[-1] == ("cudaGetLastError",)  # the next caller (TensorRT, CuPy) does not find it
    with pytest.raises(cudart.CudaCallError, match="cudaEventRecord failed"):
        rt.record(1, 2)
    with pytest.raises(cudart.CudaCallError, match="cudaEventElapsedTime failed"):
        rt.elapsed_ms(1, 2)


def test_load_says_which_libraries_it_tried(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "PyDLL", missing)
    with pytest.raises(OSError, match="none of libcudart.so.12, libcudart.so.11.0, libcudart.so could be loaded"):
        cudart.load()
