"""Micro-batching series: batch sizes, items, fill wait and items per second, per batch task.

Read from the statistics each worker process adds to Redis after a batch
(``state.batches``), at scrape time like every other taskmesh series; a task's series
appear once one of its batches has run.
"""

from __future__ import annotations

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from taskmesh.state.batches import SIZE_BUCKETS, batch_stats

BATCH_METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "taskmesh_batch_size": ("histogram", "Items per call of a batch task (batch_size)", ("task",)),
    "taskmesh_batch_items": ("counter", "Items run in batches", ("task",)),
    "taskmesh_batch_run_seconds": ("counter", "Seconds spent in batch calls", ("task",)),
    "taskmesh_batch_fill_wait_seconds": ("counter", "Seconds each batch's first item waited in the worker for the "
                                         "rest (summed over calls; divide by the size histogram's count)",
                                         ("task",)),
    "taskmesh_batch_items_per_second": ("gauge", "Items per second of batch call time (items / run seconds)",
                                        ("task",)),
}


def batch_families(client: redis.Redis) -> list[Metric]:
    sizes = HistogramMetricFamily("taskmesh_batch_size", BATCH_METRICS["taskmesh_batch_size"][1], labels=["task"])
    items = CounterMetricFamily("taskmesh_batch_items", BATCH_METRICS["taskmesh_batch_items"][1], labels=["task"])
    seconds = CounterMetricFamily("taskmesh_batch_run_seconds", BATCH_METRICS["taskmesh_batch_run_seconds"][1],
                                  labels=["task"])
    fill = CounterMetricFamily("taskmesh_batch_fill_wait_seconds",
                               BATCH_METRICS["taskmesh_batch_fill_wait_seconds"][1], labels=["task"])
    rate = GaugeMetricFamily("taskmesh_batch_items_per_second", BATCH_METRICS["taskmesh_batch_items_per_second"][1],
                             labels=["task"])
    for task, stats in sorted(batch_stats(client).items()):
        cumulative, buckets = 0.0, []
        for bound in SIZE_BUCKETS:
            cumulative += stats.get(f"size_le_{bound}", 0)
            buckets.append((str(float(bound)), cumulative))
        buckets.append(("+Inf", stats.get("calls", 0)))
        sizes.add_metric([task], buckets, sum_value=stats.get("items", 0))
        items.add_metric([task], stats.get("items", 0))
        seconds.add_metric([task], stats.get("seconds", 0))
        fill.add_metric([task], stats.get("fill_seconds", 0))
        if stats.get("seconds"):
            rate.add_metric([task], stats.get("items", 0) / stats["seconds"])
    return [sizes, items, seconds, fill, rate]
