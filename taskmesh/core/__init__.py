"""Pure policy and value objects: no Celery, no Redis connection, no hardware access.

Sizes, profiles and priorities, requirements, errors, the config schema, message
headers, node names, what a GPU reading and a ledger claim are, the admission
decision (``gate``), the held-line policy, need queues, the submit check, the
rebalance policy, the checks on remote-control arguments, URL redaction and the
warm-model policy (``models``: GPU states, eviction). Everything
else builds on this layer, and it imports nothing from the rest of taskmesh; the
benchmarks' fleet simulator runs the same code.
"""
