"""Drivers that run the search and the retraining: in-process, or as a Ray Train ``TorchTrainer`` of N workers.

``trainer`` (``run_search``: in-process when ``dist.workers == 0``, else Ray), ``ray_trainer`` (the Ray Train driver
and its per-worker function), ``retrain`` (retraining a derived network, locally or on Ray), ``cluster`` (attaching
to a cluster started with ``ray start``) and ``resume`` (the newest intact checkpoint of a run). It imports the
search engine (``search``), ``nn``, ``latency``, ``data`` and ``tracking``; ``sweeps``, ``demo`` and the CLI import it.
"""
