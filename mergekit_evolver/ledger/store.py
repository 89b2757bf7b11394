"""Run state in the run dir: every candidate, its lineage, scores and timings.

SQLite from the standard library, WAL journal with synchronous=FULL: a
committed row survives kill -9 and power loss. A run is a deterministic
sequence of steps, each with a stable key ("g003/s01/offspring"); resume
replays the steps whose decisions are recorded and computes the rest.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Optional

from mergekit_evolver.errors import UserError
from mergekit_evolver.ledger.types import Candidate, Role, Status

LEDGER_FILE = "ledger.sqlite"
GENERATIONS_LOG = "generations.jsonl"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS candidates (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    step TEXT UNIQUE NOT NULL,
    generation INTEGER NOT NULL,
    slot INTEGER,
    role TEXT NOT NULL,
    recipe TEXT,
    parents TEXT NOT NULL,
    operator TEXT,
    F REAL,
    CR REAL,
    seed INTEGER,
    content_hash TEXT,
    status TEXT NOT NULL,
    fitness REAL,
    dev TEXT,
    test TEXT,
    member TEXT,
    merge_s REAL,
    eval_s REAL,
    note TEXT,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS fitness_cache (
    content_hash TEXT NOT NULL,
    suite TEXT NOT NULL,
    scores TEXT NOT NULL,
    PRIMARY KEY (content_hash, suite)
);
CREATE TABLE IF NOT EXISTS generations (
    generation INTEGER PRIMARY KEY,
    stats TEXT NOT NULL
);
"""


_JSON_FIELDS = ("parents", "dev", "test")


# Written while a run dir is set up, before its ledger exists: a dir holding
# only these is a run that never started, and may be used again.
SETUP_DEBRIS = frozenset({LEDGER_FILE + ".new", LEDGER_FILE + ".new-journal", "run.yml", "run.yml.tmp", "scratch"})


def _not_a_ledger(path: Path, error: sqlite3.Error) -> UserError:
    return UserError(f"{path}: not a readable run ledger ({error}); it is corrupt or not SQLite")


def read_meta(run_dir: Path, key: str) -> Optional[str]:
    """One meta value, read only: nothing in the run dir is created or changed."""
    path = Path(run_dir) / LEDGER_FILE
    try:
        # immutable: not even the -shm/-wal files a WAL reader would make. The
        # identity is written before the ledger appears, so no WAL holds it.
        db = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
        try:
            row = db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        finally:
            db.close()
    except sqlite3.Error as e:
        raise _not_a_ledger(path, e) from None
    return row[0] if row else None


class Ledger:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LEDGER_FILE
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(_SCHEMA)
        except sqlite3.Error as e:
            raise _not_a_ledger(self.path, e) from None

    @classmethod
    def create(cls, run_dir: Path, meta: dict[str, str]) -> "Ledger":
        """A new ledger with its meta (the run's identity) in place, made under
        another name and renamed: a run killed at any moment of its set-up has
        either a whole ledger or none."""
        path = Path(run_dir) / LEDGER_FILE
        new = path.with_name(LEDGER_FILE + ".new")
        new.unlink(missing_ok=True)
        db = sqlite3.connect(new)
        try:
            db.execute("PRAGMA journal_mode=DELETE")
            db.executescript(_SCHEMA)
            db.executemany("INSERT INTO meta(key, value) VALUES(?, ?)", meta.items())
            db.commit()
        finally:
            db.close()
        fd = os.open(new, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(new, path)
        return cls(run_dir)

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Writes inside commit together (one fsync), or not at all."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- meta ---------------------------------------------------------------
    def get_meta(self, key: str) -> Optional[str]:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute(
            "INSERT INTO meta(key, value) VALUES(?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            (key, value),
        )

    def meta_keys(self, prefix: str) -> list[str]:
        rows = self.db.execute(
            "SELECT key FROM meta WHERE substr(key, 1, ?) = ? ORDER BY key", (len(prefix), prefix)
        ).fetchall()
        return [r[0] for r in rows]

    def delete_meta(self, key: str) -> None:
        self.db.execute("DELETE FROM meta WHERE key=?", (key,))

    # -- candidates ---------------------------------------------------------
    def record(self, candidate: Candidate) -> None:
        row = asdict(candidate)
        row["role"], row["status"] = Role(row["role"]).value, Status(row["status"]).value
        for key in _JSON_FIELDS:
            row[key] = json.dumps(row[key], sort_keys=True)
        row["created"] = time.time()
        columns = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        self.db.execute(
            f"INSERT OR REPLACE INTO candidates({columns}) VALUES({marks})",
            tuple(row.values()),
        )

    def find(self, step: str) -> Optional[Candidate]:
        rows = list(self._select("WHERE step=?", (step,)))
        return rows[0] if rows else None

    def candidates(self, role: Optional[str] = None, generation: Optional[int] = None) -> list[Candidate]:
        if role is None:
            return list(self._select("ORDER BY id", ()))
        if generation is None:
            return list(self._select("WHERE role=? ORDER BY id", (role,)))
        return list(self._select("WHERE role=? AND generation=? ORDER BY id", (role, generation)))

    def _select(self, where: str, args: tuple) -> Iterator[Candidate]:
        names = [f for f in Candidate.__dataclass_fields__]
        cursor = self.db.execute(f"SELECT {', '.join(names)} FROM candidates {where}", args)
        for values in cursor:
            row = dict(zip(names, values))
            for key in _JSON_FIELDS:
                row[key] = json.loads(row[key]) if row[key] else ([] if key == "parents" else {})
            row["role"], row["status"] = Role(row["role"]), Status(row["status"])
            yield Candidate(**row)

    # -- fitness cache ------------------------------------------------------
    def cached_scores(self, content_hash: str, suite: str) -> Optional[dict]:
        row = self.db.execute(
            "SELECT scores FROM fitness_cache WHERE content_hash=? AND suite=?",
            (content_hash, suite),
        ).fetchone()
        return json.loads(row[0]) if row else None

    def cache_scores(self, content_hash: str, suite: str, scores: dict) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO fitness_cache(content_hash, suite, scores) VALUES(?, ?, ?)",
            (content_hash, suite, json.dumps(scores, sort_keys=True)),
        )

    # -- generations --------------------------------------------------------
    def record_generation(self, generation: int, stats: dict) -> None:
        """Record a generation's row, and rewrite generations.jsonl from every
        row (so a resume never duplicates or loses a line), atomically."""
        self.db.execute(
            "INSERT OR REPLACE INTO generations(generation, stats) VALUES(?, ?)",
            (generation, json.dumps(stats, sort_keys=True)),
        )
        path = self.path.parent / GENERATIONS_LOG
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(g) + "\n" for g in self.generations()), encoding="utf-8")
        tmp.replace(path)

    def generations(self) -> list[dict]:
        rows = self.db.execute("SELECT generation, stats FROM generations ORDER BY generation")
        return [{"generation": g, **json.loads(s)} for g, s in rows]
