"""The hub's state in one SQLite file (WAL): users, sites, app store and libraries, projects, members, tokens, runs,
run reports, the relay queue and SMPC contributions, and the JWT signing secret.

One connection, used only from the hub's event loop thread: every request's reads and writes run without awaiting in
between, so a request is one short transaction and no lock is ever held while a long poll waits.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY, email TEXT NOT NULL UNIQUE COLLATE NOCASE, password_hash TEXT NOT NULL,
    first_name TEXT NOT NULL, last_name TEXT NOT NULL, role TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS sites (
    id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL UNIQUE REFERENCES users(id), name TEXT NOT NULL,
    organization TEXT NOT NULL, address TEXT NOT NULL, zip TEXT NOT NULL, city TEXT NOT NULL, country TEXT NOT NULL,
    first_name TEXT NOT NULL, last_name TEXT NOT NULL, phone TEXT NOT NULL, created REAL NOT NULL,
    last_seen REAL);
CREATE TABLE IF NOT EXISTS apps (
    id INTEGER PRIMARY KEY, slug TEXT NOT NULL UNIQUE, name TEXT NOT NULL, description TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS library (
    user_id INTEGER NOT NULL REFERENCES users(id), app_id INTEGER NOT NULL REFERENCES apps(id), added REAL NOT NULL,
    PRIMARY KEY (user_id, app_id));
CREATE TABLE IF NOT EXISTS projects (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL, description TEXT NOT NULL, status TEXT NOT NULL,
    owner_id INTEGER NOT NULL REFERENCES users(id), created REAL NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS workflow_steps (
    project_id INTEGER NOT NULL REFERENCES projects(id), step_order INTEGER NOT NULL,
    app_id INTEGER NOT NULL REFERENCES apps(id), certification_level INTEGER NOT NULL,
    PRIMARY KEY (project_id, step_order));
CREATE TABLE IF NOT EXISTS members (
    project_id INTEGER NOT NULL REFERENCES projects(id), user_id INTEGER NOT NULL REFERENCES users(id),
    client_id TEXT NOT NULL UNIQUE, finalized INTEGER NOT NULL DEFAULT 0, joined REAL NOT NULL,
    PRIMARY KEY (project_id, user_id));
CREATE TABLE IF NOT EXISTS tokens (
    id INTEGER PRIMARY KEY, project_id INTEGER NOT NULL REFERENCES projects(id), token TEXT NOT NULL UNIQUE,
    created REAL NOT NULL, used_by INTEGER REFERENCES users(id), used_at REAL);
CREATE TABLE IF NOT EXISTS runs (
    project_id INTEGER NOT NULL REFERENCES projects(id), run_nr INTEGER NOT NULL, status TEXT NOT NULL,
    started REAL NOT NULL, ended REAL, step INTEGER, message TEXT, PRIMARY KEY (project_id, run_nr));
CREATE TABLE IF NOT EXISTS run_reports (
    project_id INTEGER NOT NULL, run_nr INTEGER NOT NULL, user_id INTEGER NOT NULL REFERENCES users(id),
    status TEXT NOT NULL, step INTEGER NOT NULL, message TEXT NOT NULL, reported REAL NOT NULL,
    PRIMARY KEY (project_id, run_nr, user_id));
CREATE TABLE IF NOT EXISTS relay (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, project_id INTEGER NOT NULL, run_nr INTEGER NOT NULL,
    recipient TEXT NOT NULL, sender TEXT NOT NULL, memo TEXT, body BLOB NOT NULL, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS relay_inbox ON relay (project_id, run_nr, recipient, seq);
CREATE TABLE IF NOT EXISTS smpc (
    project_id INTEGER NOT NULL, run_nr INTEGER NOT NULL, memo TEXT NOT NULL, sender TEXT NOT NULL,
    body TEXT NOT NULL, PRIMARY KEY (project_id, run_nr, memo, sender));
"""

PBKDF2_ITERATIONS = 60_000


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, PBKDF2_ITERATIONS)
    return f"pbkdf2_sha256${PBKDF2_ITERATIONS}${salt.hex()}${digest.hex()}"


def check_password(password: str, stored: str) -> bool:
    _, iterations, salt, digest = stored.split("$")
    candidate = hashlib.pbkdf2_hmac("sha256", password.encode(), bytes.fromhex(salt), int(iterations))
    return hmac.compare_digest(candidate.hex(), digest)


class HubDB:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a process crash
        self.conn.execute("PRAGMA foreign_keys=ON")
        self.conn.execute("PRAGMA busy_timeout=5000")
        self.conn.executescript(SCHEMA)
        self.path.chmod(0o600)  # password hashes and the signing secret
        with self.tx():
            if self.meta("jwt_secret") is None:
                self.conn.execute("INSERT INTO meta VALUES ('jwt_secret', ?)", (secrets.token_hex(32),))

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed on success, rolled back on any exception (a rejected request)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def one(self, sql: str, *args) -> sqlite3.Row | None:
        return self.conn.execute(sql, args).fetchone()

    def all(self, sql: str, *args) -> list[sqlite3.Row]:
        return self.conn.execute(sql, args).fetchall()

    def meta(self, key: str) -> str | None:
        row = self.one("SELECT value FROM meta WHERE key = ?", key)
        return row["value"] if row else None

    def seed_apps(self, slugs: list[str]) -> None:
        """The app store: one entry per slug, ids stable across restarts (new slugs are appended)."""
        with self.tx() as c:
            for slug in slugs:
                name = slug.replace("-", " ").title()
                c.execute("INSERT OR IGNORE INTO apps (slug, name, description) VALUES (?, ?, ?)",
                          (slug, name, f"{name} (localfc app)"))

    def new_client_id(self) -> str:
        """A 16-hex client id not used by any member yet (FEATURECLOUD.md §4)."""
        while True:
            cid = secrets.token_hex(8)
            if self.one("SELECT 1 FROM members WHERE client_id = ?", cid) is None:
                return cid


def now() -> float:
    return time.time()
