"""What people and dashboards see: ``status`` (one collected view of the fleet), ``top``,
the Prometheus collector (``metrics``) and the exporter that serves it.

They read Redis and Celery's events; they never change what workers do. May import
every layer below it.
"""
