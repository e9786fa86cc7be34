"""The search engine as it runs on one worker: ProxylessNAS's alternating weight and architecture steps.

``objective`` (the latency-aware loss), ``path_sampling`` (which paths a weight step trains), ``readiness`` (when
alpha may learn), ``comm`` and ``balance`` (what the N workers of one search agree on, and how a global batch is
split between them), ``evaluate`` (accuracy on a split), ``state`` (checkpoints), ``loop`` (the per-worker search
loop, ``SearchLoop``) and ``results`` (what a finished search leaves in its output folder). It imports ``nn``,
``latency``, ``data``, ``config`` and the process utilities, never the drivers (``distributed``, ``sweeps``), the
tracking or the CLI: those call into it.
"""
