"""The NVML provider: on a real GPU (``-m gpu`` on a lent GPU machine) and without one."""

from __future__ import annotations

import pytest

from taskmesh import NvmlProvider
from taskmesh.core.gpus import xid_takes_gpu_out

PROVIDER = NvmlProvider()
NO_GPU = PROVIDER.unavailable_reason or ("" if PROVIDER.snapshot() else "NVML found no GPU")


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")
def test_without_a_driver_the_provider_reports_no_gpu_and_says_why():
    assert PROVIDER.snapshot() == ()
    assert "NVML" in NO_GPU


@pytest.mark.gpu
@pytest.mark.skipif(bool(NO_GPU), reason=f"no GPU here: {NO_GPU}")
def test_real_gpus_are_keyed_by_uuid_with_memory_and_compute_capability():
    gpus = PROVIDER.snapshot()
    assert gpus and all(g.uuid.startswith(("GPU-", "MIG-")) for g in gpus)
    assert len({g.uuid for g in gpus}) == len(gpus)
    for gpu in gpus:
        assert gpu.memory_total_mib > 1024 and 0 <= gpu.memory_used_mib <= gpu.memory_total_mib
        assert gpu.compute_capability >= (3, 0) and gpu.healthy


@pytest.mark.parametrize("xid, out", [(13, False), (31, False), (43, False), (45, False), (68, False),
                                      (48, True), (63, True), (79, True), (94, True), (119, True)])
def test_only_hardware_xids_take_a_gpu_out_of_service(xid, out):
    """A program's page fault (Xid 31) must not take a GPU away from every other task."""
    assert xid_takes_gpu_out(xid) is out
