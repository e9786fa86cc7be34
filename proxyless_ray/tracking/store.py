"""Where MLflow data goes: the absolute tracking URI, the artifact folder of a local store, and a fail-fast check.

Ray changes the working folder of trials and workers, so every URI is made absolute once, on the driver.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from proxyless_ray.config import TrackingConfig

DEFAULT_DB = "mlflow.db"


class TrackingUnavailable(ValueError):
    """The tracking store cannot be reached or written; raised before any training starts."""


# -- store -------------------------------------------------------------------------------------------------------


def resolve_uri(cfg: TrackingConfig) -> str:
    """The absolute tracking URI: ``cfg.uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``.

    Ray changes the working folder of trials and workers, so relative sqlite paths and plain folder paths are made
    absolute here, once, on the driver.

    Args:
        cfg: The experiment's tracking section.

    Returns:
        The URI, e.g. ``sqlite:////abs/mlflow.db``, ``file:///abs/mlruns`` or ``http://mlflow:5000``.
    """
    uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_DB}"
    if uri.startswith("sqlite:///"):
        return "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    if uri.startswith("file:"):
        return uri
    if "://" not in uri and uri != "databricks" and not uri.startswith("databricks"):
        return Path(os.path.abspath(uri)).as_uri()
    return uri


def sqlite_path(uri: str) -> str | None:
    """The database file of a ``sqlite:///`` URI, else None."""
    return uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else None


def local_artifact_root(uri: str) -> str | None:
    """Where artifacts of a sqlite store go: ``<folder of the db>/mlruns``; None otherwise (servers proxy them)."""
    db = sqlite_path(uri)
    return os.path.join(os.path.dirname(db), "mlruns") if db is not None else None


# MLflow's UI (3.17) picks its "GenAI" or "Model training" view per browser, from a toggle kept in the browser's
# local storage (GenAI until someone clicks), not from the experiment's ``mlflow.experimentKind`` tag (that tag only
# decides in which view's experiment list it appears). A link with this query opens the "Model training" view.
UI_VIEW_QUERY = "workflowType=machine_learning"


def ui_link(base: str, experiment_id: str | None = None) -> str:
    """The MLflow UI address that opens in its "Model training" view: the experiment's runs, else the experiments.

    Args:
        base: The UI's root, e.g. ``http://127.0.0.1:5000``.
        experiment_id: The experiment to open (None: the list of experiments).
    """
    page = f"experiments/{experiment_id}/runs" if experiment_id else "experiments"
    return f"{base.rstrip('/')}/#/{page}?{UI_VIEW_QUERY}"


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast when the tracking store cannot be used, before a long search runs untracked.

    Args:
        uri: A resolved tracking URI (:func:`resolve_uri`).
        timeout_s: Seconds to wait for an HTTP server.

    Raises:
        TrackingUnavailable: naming the URI and suggesting ``--no-tracking``: an HTTP server that does not answer
            (any HTTP response counts as reachable; credentials are MLflow's own business), or a local store
            whose folder cannot be written.
    """
    hint = ("start the server or fix --tracking-uri / $MLFLOW_TRACKING_URI, or pass --no-tracking to run a search "
            "untracked")
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s):
                return
        except urllib.error.HTTPError:
            return  # the server answered (a proxy without /health, or auth): reachable
        except OSError as err:  # URLError, timeouts and refused connections are all OSErrors
            reason = getattr(err, "reason", err)
            raise TrackingUnavailable(f"MLflow tracking server {uri} is unreachable ({reason}); {hint}") from None
    folder = None
    db = sqlite_path(uri)
    if db is not None:
        folder = os.path.dirname(db)
        if os.path.isdir(db):
            raise TrackingUnavailable(f"MLflow tracking store {uri}: {db!r} is a folder; expected a database file "
                                      f"such as {os.path.join(db, DEFAULT_DB)!r}; {hint}")
        if os.path.exists(db):
            _check_sqlite_file(uri, db, hint)
            if not os.access(db, os.W_OK):
                raise TrackingUnavailable(f"MLflow tracking store {uri} is read-only ({db!r} cannot be written); "
                                          f"{hint}")
    elif uri.startswith("file://"):
        folder = uri[len("file://"):]
    if folder is None:
        return  # databricks, postgresql://... : MLflow reports its own errors
    existing = folder
    while existing and not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing or "/") or not os.access(existing or "/", os.W_OK):
        raise TrackingUnavailable(f"MLflow tracking store {uri} is not writable ({existing!r} is not a writable "
                                  f"folder); {hint}")


SQLITE_MAGIC = b"SQLite format 3\x00"


def _check_sqlite_file(uri: str, db: str, hint: str) -> None:
    """A file that exists must be a SQLite database (an empty one is refused: MLflow would fill it with tables)."""
    try:
        with open(db, "rb") as fh:
            head = fh.read(len(SQLITE_MAGIC))
    except OSError as err:
        raise TrackingUnavailable(f"MLflow tracking store {uri} cannot be read ({err.strerror}); {hint}") from None
    if head != SQLITE_MAGIC:
        what = "empty" if not head else "not a SQLite database"
        raise TrackingUnavailable(f"MLflow tracking store {uri}: {db!r} is {what}; expected an MLflow database; "
                                  f"{hint}")


def check_existing_store(uri: str) -> None:
    """For commands that only read: the store must exist already, so that looking something up never creates one.

    Raises:
        FileNotFoundError: a sqlite file or ``file://`` folder that does not exist.
        TrackingUnavailable: a sqlite path that is a folder, an empty file or not a database.
    """
    hint = "pass --tracking-uri (e.g. sqlite:////abs/mlflow.db or http://host:5000)"
    db = sqlite_path(uri)
    if db is not None:
        if os.path.isdir(db):
            raise TrackingUnavailable(f"MLflow tracking store {uri}: {db!r} is a folder; expected a database file; "
                                      f"{hint}")
        if not os.path.isfile(db):
            raise FileNotFoundError(f"no MLflow database at {db}: run a search in this folder first, or {hint}")
        _check_sqlite_file(uri, db, hint)
    elif uri.startswith("file://") and not os.path.isdir(uri[len("file://"):]):
        raise FileNotFoundError(f"no MLflow store at {uri}: {hint}")
