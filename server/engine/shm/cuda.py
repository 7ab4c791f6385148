"""The CUDA calls the shared-memory registry makes (CuPy's runtime bindings), behind a small interface
so that the registry and its tests run without a GPU (tests substitute a fake)."""
from __future__ import annotations

import ctypes
from typing import Any, Optional

CUDA_IPC_HANDLE_BYTES = 64  # sizeof(cudaIpcMemHandle_t)


class CudaApi:
    """The CUDA calls the registry makes; the real one uses CuPy's runtime bindings.

    Every call names the device it runs on, because an IPC mapping and the copies that touch it
    must happen in that device's context.
    """

    def device_count(self) -> int:
        """GPUs visible to this process; 0 when CUDA is unusable."""
        cp = self._cupy()
        return int(cp.cuda.runtime.getDeviceCount())

    def open_handle(self, raw_handle: bytes, device_id: int) -> int:
        """Maps a peer process's allocation; returns its device pointer in this process."""
        cp = self._cupy()
        with cp.cuda.Device(device_id):
            return int(cp.cuda.runtime.ipcOpenMemHandle(bytes(raw_handle)))  # flags: cudaIpcMemLazyEnablePeerAccess

    def close_handle(self, ptr: int, device_id: int) -> None:
        cp = self._cupy()
        with cp.cuda.Device(device_id):
            cp.cuda.runtime.ipcCloseMemHandle(ptr)

    def allocation_size(self, ptr: int, device_id: int) -> Optional[int]:
        """Bytes from ``ptr`` to the end of its allocation (cuMemGetAddressRange), None if unknown.

        CuPy does not wrap cuMemGetAddressRange, so this asks the driver library directly; when
        that fails the client's byte_size is trusted, as the log says.
        """
        try:
            lib = ctypes.CDLL("libcuda.so.1")
            fn = lib.cuMemGetAddressRange_v2
            base, size = ctypes.c_uint64(0), ctypes.c_size_t(0)
            cp = self._cupy()
            with cp.cuda.Device(device_id):
                rc = fn(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr))
            if rc != 0:
                return None
            return int(base.value) + int(size.value) - ptr
        except (OSError, AttributeError):
            return None

    def copy(self, dst: int, src: int, nbytes: int, device_id: int) -> None:
        """Synchronous copy between any two addresses (unified addressing: host, device or IPC)."""
        cp = self._cupy()
        with cp.cuda.Device(device_id):
            cp.cuda.runtime.memcpy(dst, src, nbytes, cp.cuda.runtime.memcpyDefault)

    @staticmethod
    def _cupy() -> Any:
        import cupy  # lazy: only servers that see CUDA regions pay for (or need) CuPy

        return cupy


__all__ = ["CUDA_IPC_HANDLE_BYTES", "CudaApi"]
