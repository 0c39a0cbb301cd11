"""The per-item results of an evaluation in SQLite (``results.sqlite``): scores, curves, the done
marks that make a run resumable, the settings it was run with, and each item's explained class."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from gmar.errors import GmarError

if TYPE_CHECKING:
    from gmar.eval.harness import Settings


#: ``PRAGMA application_id`` of gmar's results databases (the bytes "gmar")
APPLICATION_ID = int.from_bytes(b"gmar", "big")
#: the layout of the results database, stored in ``meta`` as ``schema``; 1 was the unmarked one, 3
#: added ``targets`` (a version-2 store gets it, and is marked 3, on its first write)
SCHEMA_VERSION = 3
#: gmar's tables and their columns (those of version 1, which had no mark, too)
TABLES = {
    "meta": ("key", "value"),
    "scores": ("item", "method", "metric", "value"),
    "curves": ("item", "method", "curve", "value"),
    "done": ("item", "method"),
    "targets": ("item", "class", "name"),
}
_TARGETS = "CREATE TABLE IF NOT EXISTS targets(item TEXT PRIMARY KEY, class INTEGER, name TEXT)"


class Store:
    """The per-item results in ``results.sqlite``; safe for several processes.

    The database is marked as gmar's (``PRAGMA application_id`` :data:`APPLICATION_ID` and the
    schema version in ``meta``). One that is not, and does not hold exactly gmar's tables and
    columns (as the previous version wrote them), is refused before anything in it changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._targets_ready = False
        existed = path.is_file() and path.stat().st_size > 0
        try:
            self.db = sqlite3.connect(path, timeout=120)
        except sqlite3.Error as error:
            raise GmarError(f"cannot use {path} ({error}); use another --out") from None
        try:
            self._open(existed)
        except GmarError:
            self.db.close()
            raise
        except sqlite3.DatabaseError as error:
            self.db.close()
            if isinstance(error, sqlite3.OperationalError):  # locked, unwritable, no space: not damage
                if "locked" in str(error):
                    raise GmarError(f"{path} stayed locked by another process for 2 minutes; try again later") from None
                raise GmarError(f"cannot use {path} ({error}); use another --out") from None
            raise GmarError(
                f"{path} is damaged ({error}); gmar leaves it as it is: move it away or use another --out"
            ) from None

    def _open(self, existed: bool) -> None:
        if existed:  # read only: a database that is not gmar's, or damaged, is left exactly as it is
            self._check_ours()
            problems = [row[0] for row in self.db.execute("PRAGMA quick_check(3)")]
            if problems != ["ok"]:  # a damaged page is found now, not halfway through a run
                raise sqlite3.DatabaseError("; ".join(problems))
        # Switching to WAL can fail at once with "database is locked" while another process does
        # the same (SQLite returns busy there without waiting): try again for as long as the timeout.
        deadline = time.monotonic() + 120
        while True:
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        marked = self.db.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
        # A database already marked is not written to here (a refused resume leaves it byte for byte).
        mark = "" if marked else f"INSERT OR REPLACE INTO meta VALUES ('schema', '{SCHEMA_VERSION}');"
        mark += "" if marked else f"PRAGMA application_id = {APPLICATION_ID};"
        self.db.executescript(
            f"""
            BEGIN IMMEDIATE;
            CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT);
            CREATE TABLE IF NOT EXISTS scores(item TEXT, method TEXT, metric TEXT, value REAL,
                                              PRIMARY KEY(item, method, metric));
            CREATE TABLE IF NOT EXISTS curves(item TEXT, method TEXT, curve TEXT, value TEXT,
                                              PRIMARY KEY(item, method, curve));
            CREATE TABLE IF NOT EXISTS done(item TEXT, method TEXT, PRIMARY KEY(item, method));
            {"" if marked else _TARGETS + ";"}
            {mark}
            COMMIT;
            """
        )

    def _check_ours(self) -> None:
        """Refuse a database gmar did not write (one line: what it holds, what to do)."""
        application = self.db.execute("PRAGMA application_id").fetchone()[0]
        tables = {
            name: tuple(row[1] for row in self.db.execute(f"PRAGMA table_info('{name}')"))
            for (name,) in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")
            if not name.startswith("sqlite_")
        }
        if application == APPLICATION_ID:
            return
        if application != 0:
            found = f"the database of another program (application id {application})"
        elif all(TABLES.get(name) == columns for name, columns in tables.items()):
            return  # empty, or gmar's tables as the previous version wrote them
        else:
            described = ", ".join(
                name if TABLES.get(name) is None else f"{name}({', '.join(columns)})"
                for name, columns in sorted(tables.items())
                if TABLES.get(name) != columns
            )
            found = f"an SQLite database with tables gmar does not write: {described}"
        raise GmarError(
            f"{self.path} is {found}, not written by gmar; gmar leaves it alone: move it away or use another --out"
        )

    def check_settings(self, settings: Settings) -> None:
        """Record the settings of a new run, or refuse to mix results of different runs."""
        current = json.dumps(asdict(settings), sort_keys=True)
        with self.db:
            self.db.execute("INSERT OR IGNORE INTO meta VALUES ('settings', ?)", (current,))
        stored = self.db.execute("SELECT value FROM meta WHERE key='settings'").fetchone()[0]
        if stored != current:
            old, new = json.loads(stored), json.loads(current)
            differ = ", ".join(k for k in new if old.get(k) != new.get(k))
            if old.get("weights") != new.get("weights"):
                differ = differ.replace("weights", "weights: the model's weights are not those it was run with")
            raise GmarError(
                f"{self.path} holds results of a run with other settings ({differ}); use another --out or delete it"
            )

    def set_meta(self, key: str, value: str) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else row[0]

    def done(self) -> set[tuple[str, str]]:
        return set(self.db.execute("SELECT item, method FROM done"))

    def done_units(self, item: str) -> set[str]:
        """The units (methods, the model check) stored for ``item``."""
        return {row[0] for row in self.db.execute("SELECT method FROM done WHERE item=?", (item,))}

    def forget_other_contents(self, key: str) -> None:
        """Delete the results of items with ``key``'s name (``name@digest``) but another digest (a file
        replaced under its name), and those under the bare name (the previous version's key for the
        file). Keys without a digest (scenes) are left alone."""
        name, at, _ = key.rpartition("@")
        if not at:
            return
        low, high = f"{name}@", f"{name}A"  # "A" follows "@": every "name@..." lies in between
        self._ensure_targets()
        with self.db:  # (the length: not "name@other-name@digest", another file's key)
            for table in ("scores", "curves", "done", "targets"):
                self.db.execute(
                    f"DELETE FROM {table} WHERE item >= ? AND item < ? AND length(item) = ? AND item != ?",
                    (low, high, len(key), key),
                )
                self.db.execute(f"DELETE FROM {table} WHERE item = ?", (name,))

    def write(self, item: str, method: str, scores: dict[str, float], curves: dict[str, list[float]]) -> None:
        with self.db:  # one transaction: the results and the done mark land together or not at all
            self.db.executemany(
                "INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?)",
                [(item, method, k, None if v != v else float(v)) for k, v in scores.items()],
            )
            self.db.executemany(
                "INSERT OR REPLACE INTO curves VALUES (?, ?, ?, ?)",
                [(item, method, k, json.dumps([round(float(x), 6) for x in v])) for k, v in curves.items()],
            )
            self.db.execute("INSERT OR REPLACE INTO done VALUES (?, ?)", (item, method))

    def _ensure_targets(self) -> None:
        """The ``targets`` table, added to a version-2 store (only once its settings were accepted)."""
        if self._targets_ready:
            return
        with self.db:
            self.db.execute(_TARGETS)
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        self._targets_ready = True

    def set_targets(self, rows: list[tuple[str, int, str | None]]) -> None:
        """Record each item's explained class: ``(item, class index, class name or None)``."""
        self._ensure_targets()
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO targets VALUES (?, ?, ?)", rows)

    def targets(self) -> dict[str, tuple[int, str | None]]:
        """Each item's explained class ``(index, name or None)``; empty for a store written before version 3."""
        if not self.db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='targets'").fetchone():
            return {}
        return {item: (cls, name) for item, cls, name in self.db.execute("SELECT item, class, name FROM targets")}

    def scores(self) -> list[tuple[str, str, str, float | None]]:
        return list(self.db.execute("SELECT item, method, metric, value FROM scores ORDER BY item, method, metric"))

    def curves(self) -> list[tuple[str, str, str, list[float]]]:
        return [(i, m, c, json.loads(v)) for i, m, c, v in self.db.execute("SELECT * FROM curves ORDER BY item")]

    def close(self) -> None:
        self.db.close()


def check_writable(out: Path) -> None:
    """Refuse, in one line and before any work, an ``--out`` gmar could not write into: a read-only
    file system, a folder without write permission, a path under a file. Creates nothing."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():  # a dangling link: where it points does not exist
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "" if existing == out else f" ({existing} is a file)"
        raise GmarError(f"--out {out} is not a folder{where}; choose another --out")
    writable = os.access(existing, os.W_OK | os.X_OK)
    database = out / "results.sqlite"
    if writable and database.exists():
        writable = os.access(database, os.R_OK | os.W_OK)
        existing = database
    if not writable:
        reason = "read-only file system" if _read_only(existing) else "no permission to write"
        raise GmarError(f"cannot write to --out {out}: {existing}: {reason}; choose a folder you can write to")


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False
