"""Live MLflow metrics of a Ray Train search, logged from the Train controller (never from workers).

Kept apart from :mod:`proxyless_ray.tracking.search` so that in-process searches do not import Ray.
"""

from __future__ import annotations

from ray.train import UserCallback

from proxyless_ray.tracking.tracker import Tracker


class MLflowReportCallback(UserCallback):
    """Logs rank 0's metrics of every committed Ray Train report to one MLflow run, from the Train controller.

    Only committed reports reach ``after_report``, and epochs already in the run are skipped, so a worker failure or
    a resumed run never duplicates an epoch. Picklable: it carries the tracker (URI and settings), not a client.

    Args:
        tracker: A :class:`proxyless_ray.tracking.tracker.Tracker` (its store must be reachable from the controller's
            node).
        run_id: The run to log to.
    """

    def __init__(self, tracker: Tracker, run_id: str):
        self.tracker, self.run_id = tracker, run_id

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if metrics:
            self.tracker.log_epoch(self.run_id, metrics[0])
