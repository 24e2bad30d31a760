"""The worker: take a job from the queue, stage its inputs, run the analytics, publish, settle; retire when idle.

``loop`` is the receive loop, ``job`` one message's pipeline and settlement, ``backoff`` how long to hold back
after a failure of the environment, ``liveness`` the heartbeat and the eviction watch, ``eviction`` the pure
eviction policy, ``runner`` the analytics subprocess, ``recovery`` the scratch folders and the start-up sweep of
what dead deliveries left, ``secrets`` the analytics' environment of secrets.
"""
