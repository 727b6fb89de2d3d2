"""Where studies live and how they are named: one Optuna study per tuned-config key.

The key is that of docs/design.md section 7: device name, backend, pass, dtype, head dim, GQA group,
attend_current and sequence-length bucket; a decode key (pass ``decode``) adds the batch bucket,
and its sequence-length bucket is that of the cache length. Each key gets one study per sampler (``tpe`` or
``grid``), named from the key so that a second ``sbbench tune`` with the same flags finds and
resumes it. What a study was tuned on (the case, the regime, the config space, the versions) is
kept in its user attributes, so ``sbbench export`` needs nothing but the storage.

Storage is any Optuna RDB URL: by default a SQLite file in the user's cache directory;
a ``postgresql://`` URL lets tuners on several machines share studies (Optuna's distributed
mode), through the driver the ``sbbench[postgres]`` extra installs.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from sbbench.core.config_loader import device_file_stem
from sbbench.core.errors import ArgumentError

STUDY_PREFIX = "sbbench"
STUDY_SCHEMA = 1
SAMPLERS = ("tpe", "grid")
PASSES = ("fwd", "bwd", "decode")


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/sbbench``, else ``~/.cache/sbbench``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sbbench"


def default_storage_url() -> str:
    return f"sqlite:///{cache_dir() / 'tune.db'}"


def default_export_dir() -> Path:
    """The first ``$SBBENCH_CONFIG_DIR`` entry (where ``sb_attn`` looks first), else the cache."""
    from sbbench.core.config_loader import ENV_VAR

    entries = [p for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]
    return Path(entries[0]) if entries else cache_dir() / "configs"


def open_storage(url: str | None) -> Any:
    """An Optuna RDB storage for ``url`` (default: the cache's SQLite file).

    Raises :class:`~sbbench.core.errors.ArgumentError` naming ``storage`` when the URL is not usable.
    """
    import optuna

    url = url or default_storage_url()
    if "://" not in url:
        raise ArgumentError("storage", f"expected a database URL such as sqlite:///path/tune.db or "
                         f"postgresql://user:pass@host/db, got {url!r}")
    engine_kwargs: dict[str, Any] = {}
    sqlite_file: Path | None = None
    if url.startswith("sqlite:"):
        path = url.split(":///", 1)[1] if ":///" in url else ""
        if path and path != ":memory:":
            sqlite_file = Path(path).expanduser()
            try:
                sqlite_file.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ArgumentError("storage", f"cannot create the directory of {path}: {exc.strerror or exc}") from exc
        # Several threads (one per GPU) and other tuners on this host share the file: wait for
        # the lock instead of failing with "database is locked".
        engine_kwargs["connect_args"] = {"timeout": 120}
    is_postgres = url.split("://", 1)[0].split("+", 1)[0] in POSTGRES_SCHEMES
    if is_postgres:
        url = postgres_url(url)
        # Tuners on other machines hold connections for hours; one the server or a firewall
        # dropped is replaced instead of failing a trial's write.
        engine_kwargs["pool_pre_ping"] = True
    try:
        with _setup_lock(url, engine_kwargs, is_postgres, sqlite_file):
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
    except ImportError as exc:
        raise ArgumentError("storage", f"the database driver for {url.split(':', 1)[0]} is not installed ({exc})") from exc
    except Exception as exc:  # SQLAlchemy raises many kinds; all mean the same to the user
        first_line = _hide_password(str(exc).splitlines()[0] if str(exc) else "")
        raise ArgumentError("storage", f"cannot open {_hide_password(url)}: {type(exc).__name__}: {first_line}") from exc


POSTGRES_SCHEMES = ("postgresql", "postgres")
# SQLAlchemy dialect per driver module, in order of preference: psycopg 3 is what the
# `sbbench[postgres]` extra installs; psycopg2 where a machine already has it.
POSTGRES_DRIVERS = (("psycopg", "postgresql+psycopg"), ("psycopg2", "postgresql+psycopg2"))


def postgres_url(url: str) -> str:
    """A ``postgresql://`` (or ``postgres://``) URL with the dialect of an installed driver;
    a URL naming its driver (``postgresql+psycopg://``) is kept. Raises ``ValueError`` naming
    ``storage`` when the driver is not installed."""
    import importlib.util

    scheme, rest = url.split("://", 1)
    _, _, named = scheme.partition("+")
    wanted = [(m, d) for m, d in POSTGRES_DRIVERS if not named or d == scheme] or [(named, scheme)]
    for module, dialect in wanted:
        if importlib.util.find_spec(module) is not None:
            return f"{dialect}://{rest}"
    drivers = " or ".join(m for m, _ in wanted)
    raise ArgumentError("storage", f"{_hide_password(url)} needs a PostgreSQL driver ({drivers}), which is not "
                     "installed: pip install 'sbbench[postgres]'")


# PostgreSQL advisory locks (one bigint each, values no other program on the database uses):
# the one under which a tuner opens the storage, and the one under which it begins or reads a
# study's settings (study_lock).
SCHEMA_LOCK_KEY = 0x5BBE_0C4A_7A6E_0001
STUDY_LOCK_KEY = 0x5BBE_0C4A_7A6E_0002


@contextlib.contextmanager
def _setup_lock(url: str, engine_kwargs: Mapping[str, Any], is_postgres: bool,
                sqlite_file: Path | None) -> Iterator[None]:
    """Held while Optuna opens the storage. Opening creates Optuna's tables where there are none,
    by checking and then creating: tuners started together on a new database (several machines,
    or several processes of one sweep script on one file) would all find none, and all but the
    first would fail on what it created ("duplicate key value violates unique constraint",
    "UNIQUE constraint failed: alembic_version"). Under the lock they take turns, and the later
    ones find the tables. The storage does not exist yet, so PostgreSQL's lock is taken through
    an engine of its own."""
    if not is_postgres:
        with _database_lock(None, sqlite_file, SCHEMA_LOCK_KEY):
            yield
        return
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, **engine_kwargs)
    try:
        with _database_lock(engine, None, SCHEMA_LOCK_KEY):
            yield
    finally:
        engine.dispose()


@contextlib.contextmanager
def study_lock(storage: Any) -> Iterator[None]:
    """Held while a tuner begins a study (creates it, then records its case, regime, space and
    versions, one attribute per write) and while one reads those settings to check them, so
    that no tuner reads a study another has created but not yet described: it would find the
    settings missing and refuse the study as tuned on another case. Taken through the
    storage's own engine."""
    engine = getattr(storage, "engine", None)  # an RDB storage's SQLAlchemy engine
    sqlite_file = None
    if engine is not None and engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        sqlite_file = Path(engine.url.database)
    with _database_lock(engine, sqlite_file, STUDY_LOCK_KEY):
        yield


@contextlib.contextmanager
def _database_lock(engine: Any, sqlite_file: Path | None, key: int) -> Iterator[None]:
    """An exclusive lock among the tuners of one database: PostgreSQL's advisory lock ``key``
    when ``engine`` is PostgreSQL's; an exclusive ``flock`` on ``<sqlite_file>.lock`` for a
    SQLite file, between processes and between threads of one process (each opens the file
    itself, and flock locks belong to the open file); none otherwise, nor on Windows, which
    lacks ``fcntl`` (SQLite's own locking alone)."""
    if engine is not None and engine.dialect.name == "postgresql":
        import sqlalchemy

        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
        return
    try:
        import fcntl
    except ImportError:
        fcntl = None
    if sqlite_file is None or fcntl is None:
        yield
        return
    with open(f"{sqlite_file}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _hide_password(text: str) -> str:
    return re.sub(r"(://[^:/@\s]+:)[^@\s]*@", r"\1***@", text)


@dataclass(frozen=True)
class TuneKey:
    """One tuned-config key (docs/design.md section 7). ``batch_bucket`` is set for decode keys
    only (a decode launch's grid grows with the batch); fwd and bwd keys leave it None."""

    device: str
    backend: str
    pass_: str
    dtype: str
    head_dim: int
    gqa_group: int
    attend_current: bool
    seqlen_bucket: int
    batch_bucket: int | None = None

    def entry_key(self) -> dict[str, Any]:
        """The ``key`` of a config file entry (sbbench.core.config_loader)."""
        key = {
            "pass": self.pass_,
            "dtype": self.dtype,
            "head_dim": self.head_dim,
            "gqa_group": self.gqa_group,
            "attend_current": self.attend_current,
            "seqlen_bucket": self.seqlen_bucket,
        }
        if self.batch_bucket is not None:
            key["batch_bucket"] = self.batch_bucket
        return key

    def study_name(self, sampler: str) -> str:
        return "/".join(
            [
                STUDY_PREFIX,
                device_file_stem(self.device),
                self.backend,
                self.pass_,
                self.dtype,
                f"d{self.head_dim}",
                f"g{self.gqa_group}",
                f"ac{int(self.attend_current)}",
                *([] if self.batch_bucket is None else [f"B{self.batch_bucket}"]),
                f"T{self.seqlen_bucket}",
                sampler,
            ]
        )

    def label(self) -> str:
        """Short text for tables and progress bars."""
        ac = " ac" if self.attend_current else ""
        batch = "" if self.batch_bucket is None else f" B{self.batch_bucket}"
        return f"{self.backend} {self.pass_} {self.dtype} D{self.head_dim} g{self.gqa_group}{ac}{batch} T{self.seqlen_bucket}"

    def to_attrs(self) -> dict[str, Any]:
        data = asdict(self)
        data["pass"] = data.pop("pass_")
        if data["batch_bucket"] is None:
            del data["batch_bucket"]
        return data

    @classmethod
    def from_attrs(cls, data: Mapping[str, Any]) -> "TuneKey":
        return cls(
            device=str(data["device"]),
            backend=str(data["backend"]),
            pass_=str(data["pass"]),
            dtype=str(data["dtype"]),
            head_dim=int(data["head_dim"]),
            gqa_group=int(data["gqa_group"]),
            attend_current=bool(data["attend_current"]),
            seqlen_bucket=int(data["seqlen_bucket"]),
            batch_bucket=None if data.get("batch_bucket") is None else int(data["batch_bucket"]),
        )


@dataclass(frozen=True)
class StoredStudy:
    """A study of this tuner found in a storage, with what it was tuned on."""

    name: str
    key: TuneKey
    sampler: str
    attrs: dict[str, Any]


def list_studies(storage: Any, backend: str | None = None) -> list[StoredStudy]:
    """Every sbbench study in ``storage`` (optionally of one backend), sorted by name."""
    found = []
    for frozen in storage.get_all_studies():
        attrs = dict(frozen.user_attrs)
        if not frozen.study_name.startswith(STUDY_PREFIX + "/") or attrs.get("sbbench_schema") != STUDY_SCHEMA:
            continue
        try:
            key = TuneKey.from_attrs(attrs["key"])
        except (KeyError, TypeError, ValueError):
            continue
        if backend is not None and key.backend != backend:
            continue
        found.append(StoredStudy(frozen.study_name, key, str(attrs.get("sampler")), attrs))
    return sorted(found, key=lambda s: s.name)
