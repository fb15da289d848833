"""Real GPUs through NVML (nvidia-ml-py).

The parent worker process only ever talks to NVML, never to CUDA, so forking pool
children stays safe. With no driver or library the provider reports no GPUs and
says why in ``unavailable_reason``.
"""

from __future__ import annotations

import logging
from typing import Any

from taskmesh.core.gpus import GpuInfo, xid_takes_gpu_out

log = logging.getLogger(__name__)


class NvmlProvider:
    """Real GPUs through NVML. With no driver or library it reports none and logs why."""

    def __init__(self) -> None:
        self.unavailable_reason: str | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, driver errors
            self.unavailable_reason = f"NVML unavailable ({type(exc).__name__}: {exc})"
            log.info("no GPUs: %s", self.unavailable_reason)
            self._nvml = None
            return
        self._nvml = pynvml
        self._xid_failed: set[str] = set()
        self._events = _optional(pynvml.nvmlEventSetCreate)
        for index in range(pynvml.nvmlDeviceGetCount()):
            if self._events is not None:
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                _optional(pynvml.nvmlDeviceRegisterEvents, handle, pynvml.nvmlEventTypeXidCriticalError, self._events)

    def snapshot(self) -> tuple[GpuInfo, ...]:
        nvml = self._nvml
        if nvml is None:
            return ()
        self._poll_xid()
        gpus = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name = nvml.nvmlDeviceGetName(handle)
            gpu_uuid = nvml.nvmlDeviceGetUUID(handle)
            try:
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                cc = nvml.nvmlDeviceGetCudaComputeCapability(handle)
            except nvml.NVMLError as exc:
                log.warning("GPU %s (%s) does not answer NVML: %s", index, gpu_uuid, exc)
                gpus.append(GpuInfo(index, _text(gpu_uuid), _text(name), 0, 0, (0, 0), healthy=False))
                continue
            gpus.append(
                GpuInfo(
                    index=index,
                    uuid=_text(gpu_uuid),
                    name=_text(name),
                    memory_total_mib=memory.total // 2**20,
                    memory_used_mib=memory.used // 2**20,
                    compute_capability=(int(cc[0]), int(cc[1])),
                    healthy=_text(gpu_uuid) not in self._xid_failed,
                    utilization_percent=getattr(_optional(nvml.nvmlDeviceGetUtilizationRates, handle), "gpu", None),
                    temperature_c=_optional(nvml.nvmlDeviceGetTemperature, handle, 0),
                    power_w=(_optional(nvml.nvmlDeviceGetPowerUsage, handle) or 0) / 1000 or None,
                )
            )
        return tuple(gpus)

    def _poll_xid(self) -> None:
        """Drain critical Xid events (non-blocking).

        A GPU that reported a hardware Xid stays unhealthy for this process's life: such a GPU
        needs a reset, and a reset needs every process holding it gone, this worker included.
        Application Xids (``core.gpus.APPLICATION_XIDS``) leave it in service.
        """
        nvml = self._nvml
        while self._events is not None:
            try:
                event = nvml.nvmlEventSetWait_v2(self._events, 0)
            except nvml.NVMLError:
                return
            gpu_uuid = _text(nvml.nvmlDeviceGetUUID(event.device))
            if not xid_takes_gpu_out(int(event.eventData)):
                log.warning("GPU %s reported Xid %s, an application error; it stays in service",
                            gpu_uuid, event.eventData)
                continue
            log.error("GPU %s reported critical Xid %s; it takes no more work until it is reset and "
                      "its worker restarted", gpu_uuid, event.eventData)
            self._xid_failed.add(gpu_uuid)


def _optional(read: Any, *args: Any) -> Any:
    """An NVML reading that some GPUs do not support (power on some boards, events in containers)."""
    try:
        return read(*args)
    except Exception:
        return None


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
