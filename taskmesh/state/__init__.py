"""Everything taskmesh keeps in Redis: every key name and kombu's key layout (``keys``),
clients made from the app's broker settings (``client``), the reservation ledger with
its Lua scripts in ``lua/`` (and ``memory_ledger``, the same decisions in memory), the
worker registry, what waits in the queues (``queues``), and warm models: what each pool
process holds, learned load times and eviction records (``models``).

May import ``taskmesh.core`` only; ``keys`` imports nothing and may be imported by any
layer.
"""
