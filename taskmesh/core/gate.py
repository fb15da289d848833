"""Admission decisions: can this worker run this task now, on which GPU, holding what.

Pure policy over three views — the task's ``Requirement``, the provider's observed
GPUs, and the shared ``Ledger`` — with no Celery in it, so the same code decides in
a worker, in a benchmark and in the fleet simulator.

The rule is "both must agree": a GPU takes a task only if the ledger has room (what
taskmesh tasks declared) *and* the provider shows the memory free (other processes,
a PyTorch cache not yet emptied), each less a safety margin. A task that declares no
``vram``, or ``exclusive=True``, claims the whole GPU: never oversubscribing is the
default, sharing is declared.

Three answers: ``Admitted`` (reserved; run it), ``Wait`` (not now; hold the message
and pause intake), ``Reroute`` (this worker's GPUs can never fit it; send it to the
queue of GPUs that can). A ``mixed`` task never waits for a GPU: it runs on CPU.

Fail closed: a ``gpu`` task never runs on a worker that sees no GPU it fits. On a
worker with no GPU at all (NVML missing, ``CUDA_VISIBLE_DEVICES`` naming nothing that
exists, a CPU worker given one by ``queue=``) it goes to the ``gpu`` queue, which such
a worker does not consume; only a task sent to its declared CPU fallback runs on CPU,
and the controller gives the gate that fallback's requirement.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

from taskmesh.core.claims import Claim, LedgerLike, Refusal, gpu_pool, host_memory_pool, host_threads_pool
from taskmesh.core.config import AdmissionConfig
from taskmesh.core.gpus import GpuInfo, GpuProvider
from taskmesh.core.need_queues import fits, need_queue
from taskmesh.core.profiles import Profile
from taskmesh.core.requirements import Requirement

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Admitted:
    reservation: str
    pools: tuple[str, ...]
    gpus: tuple[str, ...]
    amounts: tuple[int, ...]  # per pool: what the heartbeat writes back if the ledger loses it

    def claims(self) -> dict[str, int]:
        return dict(zip(self.pools, self.amounts, strict=True))


@dataclasses.dataclass(frozen=True)
class Wait:
    reason: str


@dataclasses.dataclass(frozen=True)
class Reroute:
    queue: str
    reason: str = "this worker's GPUs can never fit it"


Decision = Admitted | Wait | Reroute
#: GPUs offered to the ledger in the first round trip, best fit first; the rest, if it refused
#: them all, in a second. The ledger refuses one only when it knows of memory the GPU does not
#: show in use yet, so the first call nearly always takes one: a worker that sees 64 GPUs
#: builds and sends 4 candidates, not 64.
CANDIDATES_PER_CALL = 4


class Gate:
    """Decisions and health for one worker's GPUs and its host."""

    def __init__(
        self,
        *,
        host: str,
        provider: GpuProvider,
        ledger: LedgerLike,
        config: AdmissionConfig,
        gpu_uuids: Sequence[str] | None,
        cpu_threads: int,
        memory_total_mib: int,
    ) -> None:
        self.host = host
        self.provider = provider
        self.ledger = ledger
        self.config = config
        self.gpu_uuids = None if gpu_uuids is None else tuple(gpu_uuids)
        self.cpu_threads = cpu_threads
        self.memory_total_mib = memory_total_mib
        self.known: dict[str, GpuInfo] = {g.uuid: g for g in self._observe()}

    def _observe(self) -> tuple[GpuInfo, ...]:
        gpus = self.provider.snapshot()
        return gpus if self.gpu_uuids is None else tuple(g for g in gpus if g.uuid in self.gpu_uuids)

    def gpus(self) -> tuple[GpuInfo, ...]:
        """This worker's GPUs now; one that fails NVML, reports an Xid or vanished is unhealthy."""
        try:
            seen = {g.uuid: g for g in self._observe()}
        except Exception as exc:  # a driver error must not take the worker down
            log.warning("GPU provider failed: %s; marking this worker's GPUs unhealthy", exc)
            seen = {}
        for uuid, gpu in seen.items():
            self.known[uuid] = gpu
        return tuple(
            seen.get(uuid) or dataclasses.replace(gpu, healthy=False) for uuid, gpu in self.known.items()
        )

    def host_claims(self, requirement: Requirement, cpu_path: bool) -> list[Claim]:
        """What a task declares of its host. A single-threaded task claims no thread: pool
        sizes already bound those (planning and the rebalancer keep processes x threads
        within the budget), and skipping the ledger keeps such tasks free of Redis calls."""
        claims = []
        if requirement.memory_mib:
            claims.append(Claim(host_memory_pool(self.host), requirement.memory_mib, self.memory_total_mib))
        if cpu_path and requirement.cpu_threads > 1 and requirement.profile in (Profile.CPU_INTENSIVE, Profile.MIXED):
            claims.append(Claim(host_threads_pool(self.host), requirement.cpu_threads, self.cpu_threads))
        return claims

    def decide(self, requirement: Requirement, reservation: str) -> Decision:
        if not requirement.needs_gpu:
            return self._reserve(reservation, self.host_claims(requirement, cpu_path=True))
        gpus = self.gpus()
        margin = self.config.safety_margin_mib
        possible = [g for g in gpus if fits(g, requirement, margin)]
        if len(possible) < requirement.gpus:
            if requirement.profile is Profile.MIXED:
                return self._reserve(reservation, self.host_claims(requirement, cpu_path=True))
            if not gpus:
                return Reroute(Profile.GPU_INTENSIVE.queue, "this worker sees no GPU")
            return Reroute(need_queue(requirement))
        decision = self._reserve_gpus(requirement, reservation, [g for g in possible if g.healthy])
        if isinstance(decision, Wait) and requirement.profile is Profile.MIXED:
            return self._reserve(reservation, self.host_claims(requirement, cpu_path=True))
        return decision

    def _reserve_gpus(self, requirement: Requirement, reservation: str, gpus: list[GpuInfo]) -> Decision:
        margin = self.config.safety_margin_mib
        exclusive = requirement.exclusive or requirement.vram_mib is None
        ready = []
        for gpu in gpus:
            need = gpu.memory_total_mib - margin if exclusive else requirement.vram_mib
            # a whole-GPU claim already leaves the margin out, which is what absorbs the driver's
            # and a CUDA context's few hundred MiB that a real idle GPU always shows in use
            room = gpu.memory_free_mib if exclusive else gpu.memory_free_mib - margin
            if room >= need:
                ready.append((gpu.memory_free_mib - need, gpu, need))
        if len(ready) < requirement.gpus:
            observed = ", ".join(f"GPU {g.index} {g.memory_free_mib} MiB free" for g in gpus) or "no healthy GPU"
            return Wait(f"observed: {observed}")
        ready.sort(key=lambda item: item[0])  # best fit: keep the big holes for big tasks
        windows = [ready[start : start + requirement.gpus] for start in range(len(ready) - requirement.gpus + 1)]
        host = self.host_claims(requirement, cpu_path=False)
        refused: list[Refusal] = []
        for chunk in (windows[:CANDIDATES_PER_CALL], windows[CANDIDATES_PER_CALL:]):  # the ledger nearly
            if not chunk:  # always agrees with what was observed: the first call takes one
                break
            options = [[Claim(gpu_pool(g.uuid), need, g.memory_total_mib - margin) for _, g, need in w] + host
                       for w in chunk]
            taken, refusals = self.ledger.reserve_first(reservation, options)
            if taken is not None:
                claims = options[taken]
                return Admitted(reservation, tuple(c.pool for c in claims), tuple(g.uuid for _, g, _ in chunk[taken]),
                                tuple(c.amount for c in claims))
            refused += refusals
        return Wait("; ".join(f"ledger: {r}" for r in refused))

    def _reserve(self, reservation: str, claims: list[Claim]) -> Decision:
        """The CPU path: the host's claims only."""
        refusal = self.ledger.reserve(reservation, claims)
        if refusal is not None:
            return Wait(f"ledger: {refusal}")
        return Admitted(reservation, tuple(c.pool for c in claims), (), tuple(c.amount for c in claims))

    def pools(self) -> list[str]:
        return [gpu_pool(uuid) for uuid in self.known] + [host_threads_pool(self.host), host_memory_pool(self.host)]
