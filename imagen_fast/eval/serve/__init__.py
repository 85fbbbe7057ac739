"""Human rating as in the Imagen paper, as a small local web app (``imagen-fast eval serve``).

    study.py   the questions (A/B photorealism, A/B caption match, single-image
               alignment), batches of 50, interleaved control trials
    store.py   SQLite: questions, raters with private tokens, trials, answers
    app.py     the WSGI app and a threaded stdlib HTTP server; static/ the page
    report.py  rater screening (>= 80% controls right) and the rates with intervals

``open_study(db, manifest=...)`` creates or reopens a study database.
"""
from __future__ import annotations

import os
from typing import Optional

from .report import build_report, format_report
from .store import Store, StoreError
from .study import StudyConfig, build_study


def control_dir_for(db_path: str) -> str:
    return os.path.splitext(os.path.abspath(db_path))[0] + "-controls"


def open_study(db_path: str, manifest: Optional[str] = None,
               config: Optional[StudyConfig] = None) -> Store:
    """The study database at ``db_path``. An empty or new one is filled from ``manifest``
    (a folder with manifest.json) under ``config``; an existing one is reopened as is,
    and if ``manifest`` is given it must describe the same study."""
    from ..manifest import read_manifest

    exists = os.path.isfile(db_path)
    if not exists and manifest is None:
        raise FileNotFoundError(f"rating database not found: {db_path} (give a samples "
                                f"folder to start a new study)")
    if os.path.dirname(os.path.abspath(db_path)):
        os.makedirs(os.path.dirname(os.path.abspath(db_path)), exist_ok=True)
    store = Store(db_path)
    if manifest is None:
        if not store.has_study():
            raise ValueError(f"{db_path} holds no study: give a samples folder to start one")
        return store
    try:
        study = build_study(read_manifest(manifest), config or StudyConfig(),
                            control_dir_for(db_path))
        store.load_study(study)
    except BaseException:
        if not exists:  # leave no empty database behind to trip the next start
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(db_path + suffix):
                    os.remove(db_path + suffix)
        raise
    return store


__all__ = ["Store", "StoreError", "StudyConfig", "build_study", "build_report", "format_report",
           "open_study", "control_dir_for"]
