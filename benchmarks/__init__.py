"""Benchmarks that prove (or disprove) the scheduling wins: ``scripts/bench`` and
``taskmesh bench``; what each scenario measures and how to read it is in BENCHMARKS.md.

One small module per scenario; each starts its own Redis and its own workers, and
stops them by pid. Speed is only ever reported, as a ratio to a baseline measured
side by side in the same run — never asserted.
"""

#: Scenario name → module, in the order they run (``utilisation`` reads ``mixed``'s runs).
SCENARIOS = {
    "mixed": "benchmarks.mixed",
    "cpu_parallel": "benchmarks.cpu_parallel",
    "overhead": "benchmarks.overhead",
    "decision": "benchmarks.decision",
    "utilisation": "benchmarks.utilisation",
    "real_gpu": "benchmarks.real_gpu",
    "fleet": "benchmarks.fleet",
    "rebalance": "benchmarks.rebalance",
    "packing": "benchmarks.packing",
    "one_gpu": "benchmarks.one_gpu",
    "capacity": "benchmarks.capacity",
    "batching": "benchmarks.batching",
    "affinity": "benchmarks.affinity",
}
