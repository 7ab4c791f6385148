"""Per-GPU gauges under Triton's names (``nv_gpu_*``, label ``gpu_uuid``), read from NVML at scrape time.

Triton samples DCGM every ``--metrics-interval-ms``; reading NVML when Prometheus scrapes gives the same
series with no background thread. ``pynvml`` (package ``nvidia-ml-py``) is imported only here and only
when asked for, so a CPU box without it exports no ``nv_gpu_*`` series and logs one line.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Iterator, List, Optional, Tuple

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_log = logging.getLogger(__name__)


def nvml_collector(nvml: Any = None) -> Optional[GpuCollector]:
    """A started ``GpuCollector``, or None when NVML (the module, the driver or any GPU) is missing.

    ``nvml`` is the ``pynvml`` module, or a stand-in in tests.
    """
    if nvml is None:
        try:
            import pynvml as nvml  # type: ignore[import-not-found,no-redef]
        except ImportError:
            _log.info("GPU metrics off: nvidia-ml-py (pynvml) is not installed")
            return None
    try:
        nvml.nvmlInit()
    except Exception as e:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...: no GPU here
        _log.info("GPU metrics off: NVML did not start (%s)", e)
        return None
    try:
        count = nvml.nvmlDeviceGetCount()
        if count == 0:
            _log.info("GPU metrics off: NVML sees no GPU")
            nvml.nvmlShutdown()
            return None
        return GpuCollector(nvml, [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)])
    except Exception as e:
        _log.warning("GPU metrics off: NVML failed to list GPUs (%s)", e)
        nvml.nvmlShutdown()
        return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class GpuCollector(Collector):
    """Reads each GPU at scrape time; a query a GPU does not support (power on some boards) is left out."""

    def __init__(self, nvml: Any, handles: List[Any]) -> None:
        self._nvml = nvml
        self._gpus: List[Tuple[str, Any]] = [(_text(nvml.nvmlDeviceGetUUID(h)), h) for h in handles]
        # Triton's nv_energy_consumption counts joules since the server started; NVML counts since driver load.
        self._energy_start_mj: Dict[str, int] = {}
        for uuid, h in self._gpus:
            mj = self._try(nvml.nvmlDeviceGetTotalEnergyConsumption, h)
            if mj is not None:
                self._energy_start_mj[uuid] = mj
        self._closed = False

    def close(self) -> None:
        """Balances ``nvmlInit`` (NVML counts them)."""
        if not self._closed:
            self._closed = True
            self._nvml.nvmlShutdown()

    def _try(self, fn: Any, handle: Any) -> Any:
        try:
            return fn(handle)
        except self._nvml.NVMLError:
            return None

    def collect(self) -> Iterator[Metric]:
        if self._closed:
            return
        nvml = self._nvml
        util = GaugeMetricFamily("nv_gpu_utilization", "GPU utilization rate [0.0 - 1.0)", labels=["gpu_uuid"])
        mem_total = GaugeMetricFamily("nv_gpu_memory_total_bytes", "GPU total memory, in bytes", labels=["gpu_uuid"])
        mem_used = GaugeMetricFamily("nv_gpu_memory_used_bytes", "GPU used memory, in bytes", labels=["gpu_uuid"])
        power = GaugeMetricFamily("nv_gpu_power_usage", "GPU power usage in watts", labels=["gpu_uuid"])
        limit = GaugeMetricFamily("nv_gpu_power_limit", "GPU power management limit in watts", labels=["gpu_uuid"])
        energy = Metric("nv_energy_consumption", "GPU energy consumption in joules since the server started",
                        "counter")
        for uuid, h in self._gpus:
            rates = self._try(nvml.nvmlDeviceGetUtilizationRates, h)
            if rates is not None:
                util.add_metric([uuid], rates.gpu / 100.0)
            mem = self._try(nvml.nvmlDeviceGetMemoryInfo, h)
            if mem is not None:
                mem_total.add_metric([uuid], float(mem.total))
                mem_used.add_metric([uuid], float(mem.used))
            mw = self._try(nvml.nvmlDeviceGetPowerUsage, h)
            if mw is not None:
                power.add_metric([uuid], mw / 1000.0)
            mw = self._try(nvml.nvmlDeviceGetEnforcedPowerLimit, h)
            if mw is not None:
                limit.add_metric([uuid], mw / 1000.0)
            mj = self._try(nvml.nvmlDeviceGetTotalEnergyConsumption, h)
            if mj is not None and uuid in self._energy_start_mj:
                energy.add_sample("nv_energy_consumption", {"gpu_uuid": uuid},
                                  (mj - self._energy_start_mj[uuid]) / 1000.0)
        for family in (util, mem_total, mem_used, power, limit, energy):
            if family.samples:
                yield family
