"""MLflow tracking: where the data goes, what identifies a run, and what a run holds.

``store`` (tracking URI, local artifact folder, a fail-fast check), ``tags`` (tags and params of a run), ``tracker``
(the driver-side ``Tracker``: parent and child runs, metrics), ``artifacts`` (a search's files and pictures),
``registry`` (derived networks as model versions), ``results`` (the Pareto table read back), ``retrain`` (runs of
retrained networks), ``search`` (a single search's parent and child run) and ``ray_train`` (live metrics from the
Train controller). It imports ``config``, ``nn``, ``latency``, ``plots`` and ``pareto``; the drivers, the sweeps and
the CLI import it. MLflow itself is only imported where a run is talked to.
"""
