"""SQLite storage of a rating study: questions, raters, each rater's trial sequence and
answers.

Every write is one transaction committed before the HTTP reply (WAL journal,
``synchronous=FULL``), so a crash or restart loses nothing that a rater was told was
saved. Raters are known by a random token that only its holder has (the database keeps
its SHA-256); every trial belongs to one rater, and an answer is written only where
the trial's rater is the token's rater and the trial has no answer yet.
"""
from __future__ import annotations

import hashlib
import json
import random
import secrets
import sqlite3
import time
from contextlib import closing, contextmanager
from dataclasses import asdict
from typing import Dict, List, Optional

from .study import ALIGNMENT_SCORES, Study

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS questions (
    id INTEGER PRIMARY KEY, batch INTEGER NOT NULL, kind TEXT NOT NULL, item TEXT NOT NULL,
    caption TEXT NOT NULL, image_a INTEGER NOT NULL REFERENCES images(id),
    image_b INTEGER REFERENCES images(id), system_a TEXT NOT NULL, system_b TEXT,
    control INTEGER NOT NULL, expected TEXT);
CREATE TABLE IF NOT EXISTS raters (
    id INTEGER PRIMARY KEY, token_sha256 TEXT NOT NULL UNIQUE, name TEXT NOT NULL,
    batch INTEGER NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS trials (
    id INTEGER PRIMARY KEY, rater INTEGER NOT NULL REFERENCES raters(id),
    position INTEGER NOT NULL, question INTEGER NOT NULL REFERENCES questions(id),
    swapped INTEGER NOT NULL, answer TEXT, answered REAL, UNIQUE (rater, position));
CREATE INDEX IF NOT EXISTS trials_open ON trials (rater, answer, position);
"""


class StoreError(Exception):
    """A request the store refuses: ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Store:
    def __init__(self, path: str):
        self.path = path
        with closing(self._connect()) as db:
            db.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        return db

    @contextmanager
    def _write(self):
        """One write transaction, taken at once (BEGIN IMMEDIATE: concurrent writers
        queue instead of interleaving), committed on success, rolled back on error."""
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    # ------------------------------------------------------------------ study
    def meta(self, key: str) -> Optional[str]:
        with closing(self._connect()) as db:
            row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row["value"] if row else None

    def config(self) -> dict:
        value = self.meta("config")
        if value is None:
            raise StoreError(500, f"{self.path} holds no study")
        return json.loads(value)

    def has_study(self) -> bool:
        return self.meta("digest") is not None

    def load_study(self, study: Study) -> bool:
        """Write ``study`` into an empty database (True), or check that the database already
        holds this very study (False). Another study raises ValueError."""
        digest = study.digest()
        old = self.meta("digest")
        if old is not None:
            if old != digest:
                raise ValueError(f"{self.path} already holds another study (from "
                                 f"{self.meta('source')}); use a new database file")
            return False
        with self._write() as db:
            ids: Dict[str, int] = {}

            def image_id(path: Optional[str]) -> Optional[int]:
                if path is None:
                    return None
                if path not in ids:
                    ids[path] = db.execute("INSERT INTO images (path) VALUES (?)", (path,)).lastrowid
                return ids[path]
            for q in study.questions:
                db.execute("INSERT INTO questions (batch, kind, item, caption, image_a, image_b, "
                           "system_a, system_b, control, expected) VALUES (?,?,?,?,?,?,?,?,?,?)",
                           (q.batch, q.kind, q.item, q.caption, image_id(q.image_a),
                            image_id(q.image_b), q.system_a, q.system_b, int(q.control), q.expected))
            for key, value in (("config", json.dumps(asdict(study.config))),
                               ("source", study.source), ("digest", digest),
                               ("num_batches", str(study.num_batches))):
                db.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, value))
        return True

    def image_path(self, image_id: int) -> Optional[str]:
        with closing(self._connect()) as db:
            row = db.execute("SELECT path FROM images WHERE id = ?", (image_id,)).fetchone()
        return row["path"] if row else None

    # ----------------------------------------------------------------- raters
    def create_rater(self, name: str) -> dict:
        """A new rater on the batch with the fewest raters so far, with their shuffled
        trial sequence (controls interleaved, sides swapped at random). Returns the
        token, shown once."""
        name = (name or "").strip()[:100]
        cfg = self.config()
        token = secrets.token_urlsafe(24)
        with self._write() as db:  # two raters starting at once get distinct batches
            counts = {r["batch"]: r["n"] for r in db.execute(
                "SELECT batch, COUNT(*) AS n FROM raters GROUP BY batch")}
            num_batches = int(db.execute("SELECT value FROM meta WHERE key='num_batches'")
                              .fetchone()["value"])
            batch = min(range(num_batches), key=lambda b: (counts.get(b, 0), b))
            rater = db.execute("INSERT INTO raters (token_sha256, name, batch, created) VALUES "
                               "(?, ?, ?, ?)", (_sha(token), name, batch, time.time())).lastrowid
            rows = db.execute("SELECT id, control FROM questions WHERE batch = ? ORDER BY id",
                              (batch,)).fetchall()
            order = _interleave([r["id"] for r in rows if not r["control"]],
                                [r["id"] for r in rows if r["control"]], cfg["control_every"],
                                random.Random(f"{cfg['seed']}:{rater}"))
            swap = random.Random(f"{cfg['seed']}:{rater}:sides")
            db.executemany("INSERT INTO trials (rater, position, question, swapped) VALUES "
                           "(?, ?, ?, ?)", [(rater, pos, q, int(swap.random() < 0.5))
                                            for pos, q in enumerate(order)])
        return {"token": token, "rater": rater, "batch": batch, "total": len(order)}

    def rater_of(self, token: Optional[str]) -> int:
        if not token:
            raise StoreError(401, "no rater token")
        with closing(self._connect()) as db:
            row = db.execute("SELECT id FROM raters WHERE token_sha256 = ?", (_sha(token),)).fetchone()
        if row is None:
            raise StoreError(401, "unknown rater token")
        return row["id"]

    # ----------------------------------------------------------------- trials
    def next_trial(self, rater: int) -> Optional[dict]:
        """The rater's first unanswered trial (None when the batch is done)."""
        with closing(self._connect()) as db:
            total = db.execute("SELECT COUNT(*) FROM trials WHERE rater = ?", (rater,)).fetchone()[0]
            row = db.execute(
                "SELECT t.id, t.position, t.swapped, q.kind, q.caption, q.image_a, q.image_b "
                "FROM trials t JOIN questions q ON q.id = t.question "
                "WHERE t.rater = ? AND t.answer IS NULL ORDER BY t.position LIMIT 1",
                (rater,)).fetchone()
        if row is None:
            return None
        images = [row["image_a"]] if row["image_b"] is None else (
            [row["image_b"], row["image_a"]] if row["swapped"] else [row["image_a"], row["image_b"]])
        return {"id": row["id"], "position": row["position"], "total": total, "kind": row["kind"],
                "caption": row["caption"], "images": images}

    def answer(self, rater: int, trial: int, choice: str) -> None:
        """Record ``choice`` (A/B: "left", "right", "indifferent"; alignment: "yes",
        "somewhat", "no") for the rater's trial. Repeating the stored answer is a no-op
        (a retry after a lost reply); a different one for an answered trial is refused."""
        with self._write() as db:
            row = db.execute("SELECT t.rater, t.swapped, t.answer, q.kind FROM trials t JOIN "
                             "questions q ON q.id = t.question WHERE t.id = ?", (trial,)).fetchone()
            if row is None:
                raise StoreError(404, f"no trial {trial}")
            if row["rater"] != rater:
                raise StoreError(403, f"trial {trial} belongs to another rater")
            value = _normalise(row["kind"], choice, bool(row["swapped"]))
            if row["answer"] is not None:
                if row["answer"] == value:
                    return
                raise StoreError(409, f"trial {trial} is already answered")
            db.execute("UPDATE trials SET answer = ?, answered = ? WHERE id = ? AND rater = ? "
                       "AND answer IS NULL", (value, time.time(), trial, rater))

    def progress(self, rater: int) -> dict:
        with closing(self._connect()) as db:
            r = db.execute("SELECT COUNT(*) AS total, COUNT(answer) AS done FROM trials "
                           "WHERE rater = ?", (rater,)).fetchone()
        return {"total": r["total"], "done": r["done"]}

    def answered(self) -> List[sqlite3.Row]:
        """Every answered trial with its question and rater (for the report)."""
        with closing(self._connect()) as db:
            return db.execute(
                "SELECT t.rater, r.name, t.answer, q.kind, q.system_a, q.system_b, q.control, "
                "q.expected, q.item FROM trials t JOIN questions q ON q.id = t.question "
                "JOIN raters r ON r.id = t.rater WHERE t.answer IS NOT NULL "
                "ORDER BY t.rater, t.position").fetchall()

    def raters(self) -> List[sqlite3.Row]:
        with closing(self._connect()) as db:
            return db.execute("SELECT id, name, batch FROM raters ORDER BY id").fetchall()


def _normalise(kind: str, choice: str, swapped: bool) -> str:
    """The stored answer: A/B in the question's own order ("a", "b", "indifferent")."""
    if kind == "alignment":
        if choice not in ALIGNMENT_SCORES:
            raise StoreError(400, f"answer: expected one of {sorted(ALIGNMENT_SCORES)}, got {choice!r}")
        return choice
    sides = {"left": "b" if swapped else "a", "right": "a" if swapped else "b",
             "indifferent": "indifferent"}
    if choice not in sides:
        raise StoreError(400, f"answer: expected left, right or indifferent, got {choice!r}")
    return sides[choice]


def _interleave(real: List[int], controls: List[int], every: int, rng: random.Random) -> List[int]:
    """Real questions shuffled; each block of ``every`` of them gets one control at a
    random place inside it, so a control's position is not predictable."""
    real, controls = real[:], controls[:]
    rng.shuffle(real)
    rng.shuffle(controls)
    out: List[int] = []
    for start in range(0, len(real), every):
        block = real[start:start + every]
        if controls:
            block.insert(rng.randint(0, len(block)), controls.pop())
        out.extend(block)
    out.extend(controls)
    return out

