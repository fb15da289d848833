"""What this machine has: the GPU providers (NVML, simulated), the host inventory and
host pressure.

The ``GpuProvider`` protocol and ``GpuInfo`` readings are defined in ``taskmesh.core``
(the admission decision takes them as inputs); their implementations live here. May
import ``taskmesh.core`` and ``taskmesh.state.keys`` only.
"""
