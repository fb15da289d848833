"""Benchmarks that prove (or disprove) the scheduling wins: ``scripts/bench`` and
``taskmesh bench``; what each scenario measures and how to read it is in BENCHMARKS.md.

One small module per scenario; each starts its own Redis and its own workers, and
stops them by pid. Speed is only ever reported, as a ratio to a baseline measured
side by side in the same run — never asserted.
"""

#: Scenario name → module, in the order they run (``utilisation`` reads ``mixed``'s runs).
SCENARIOS = {
    "mixed": "taskmesh.bench.mixed",
    "cpu_parallel": "taskmesh.bench.cpu_parallel",
    "overhead": "taskmesh.bench.overhead",
    "decision": "taskmesh.bench.decision",
    "utilisation": "taskmesh.bench.utilisation",
    "real_gpu": "taskmesh.bench.real_gpu",
    "fleet": "taskmesh.bench.fleet",
    "rebalance": "taskmesh.bench.rebalance",
}
