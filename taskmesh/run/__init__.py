"""Processes: planning the worker groups for this machine (``workers``), the supervisor
that starts and restarts them, the local stack of ``taskmesh up`` (Redis, workers,
beat, Flower, the exporter), its secrets and a deployment's (``credentials``) and the
demo workload.

May import every layer below it (``core``, ``hardware``, ``state``, ``app``).
"""
