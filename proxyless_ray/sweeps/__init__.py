"""Latency trade-off sweeps on Ray Tune: hardware profiles x latency coefficients, each trial one search.

``plan`` (the grid, no Ray), ``trial`` (a one-worker trial in its Tune actor, and the shared warm-up), ``sweep``
(``run_sweep``: the Tuner), ``schedulers`` (FIFO, ASHA, Pareto-aware ASHA by name, the latter in ``pareto_asha``),
``report`` (Pareto front per hardware, best network per latency target) and ``tracking`` (the Tune callback that
keeps one MLflow child run per trial). It imports the drivers (``distributed``), the search engine, ``tracking``,
``plots`` and ``pareto``; only ``demo`` and the CLI import it.
"""
