"""Two ``sbbench tune`` processes sharing one real PostgreSQL server, as tuners on several
machines do: both add trials to the same studies, no config runs twice, and ``kill -9`` of one
loses none of its finished trials while the other finishes.

The server is Debian's PostgreSQL (``initdb`` and ``pg_ctl``), started on a free loopback port in
a temporary directory. PostgreSQL refuses to run as root, so as root the server runs as the
``postgres`` system account (created as a dedicated ``sbbench-pg`` system user where there is
none). Skipped, with the reason, only where no PostgreSQL binaries exist.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest

# A fixture: imported here so that pytest finds it.
from tune_helpers import test_backends  # noqa: F401

SERVER_USER = "postgres"
FALLBACK_USER = "sbbench-pg"
# Tiny shapes on the CPU: each trial takes about a second. Two keys (T=64 and T=128), so the
# tuners share more than one study.
TUNE_ARGS = ["tune", "--backend", "chunked", "--pass", "fwd", "--batch", "1", "--heads", "1", "--head-dim", "16",
             "--seqlens", "64,128", "--dtype", "fp32", "--regime", "dense", "--check-seqlen", "64"]


def _postgres_bin() -> Path | None:
    """The directory of ``initdb`` and ``pg_ctl``: on PATH, else Debian's newest version."""
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


def _server_account() -> pwd.struct_passwd | None:
    """The account the server runs as: None (this user) unless this is root."""
    if os.geteuid() != 0:
        return None
    for name in (SERVER_USER, FALLBACK_USER):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", FALLBACK_USER],
                   check=True, capture_output=True)
    return pwd.getpwnam(FALLBACK_USER)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """A PostgreSQL server of its own on 127.0.0.1, stopped and removed at the end."""
    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) on this machine")
    account = _server_account()
    root = Path(tempfile.mkdtemp(prefix="sbbench-pg-"))
    data, log, password = root / "data", root / "server.log", secrets.token_hex(8)
    (root / "password").write_text(password + "\n")
    as_server = {}
    if account is not None:
        os.chown(root, account.pw_uid, account.pw_gid)
        os.chown(root / "password", account.pw_uid, account.pw_gid)
        as_server = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
    env = {**os.environ, "HOME": str(root), "LC_ALL": "C"}

    def server(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(bin_dir / args[0]), *args[1:]], cwd=root, env=env, capture_output=True, text=True,
                              timeout=timeout, **as_server)

    port = _free_port()
    started = False
    try:
        init = server("initdb", "-D", str(data), "-U", "sbbench", "--auth=scram-sha-256",
                      f"--pwfile={root / 'password'}", "-E", "UTF8")
        assert init.returncode == 0, init.stdout + init.stderr
        # fsync off: this test kills tuners, never the server, so durability on disk is not at stake.
        options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={root} -c fsync=off"
        start = server("pg_ctl", "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start")
        started = start.returncode == 0
        assert started, start.stdout + start.stderr + (log.read_text() if log.exists() else "")
        yield f"postgresql://sbbench:{password}@127.0.0.1:{port}/postgres"
    finally:
        if started:
            server("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop", timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def _studies(url: str) -> dict[str, list]:
    import optuna

    from sbbench.autotune.store import list_studies, open_storage

    storage = open_storage(url)
    return {s.name: optuna.load_study(study_name=s.name, storage=storage).get_trials(deepcopy=False)
            for s in list_studies(storage)}


def _complete(trials: list, pid: int | None = None) -> list:
    from optuna.trial import TrialState

    return [t for t in trials if t.state == TrialState.COMPLETE and (pid is None or t.user_attrs.get("pid") == pid)]


def _tuner(url: str, tmp_path: Path, trials: int) -> subprocess.Popen:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    env.pop("SBBENCH_CONFIG_DIR", None)
    # Its own process group: kill -9 takes its trial workers with it, like a machine going away.
    return subprocess.Popen([sys.executable, "-c", "from sbbench.cli import main; main()", *TUNE_ARGS,
                             "--storage", url, "--trials", str(trials), "--timeout", "90"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def test_two_tuners_share_studies_and_survive_kill_9(postgres_url, tmp_path):
    victim = _tuner(postgres_url, tmp_path, trials=30)
    survivor = _tuner(postgres_url, tmp_path, trials=6)
    try:
        # Wait until both have finished trials of their own in the shared storage.
        deadline = time.monotonic() + 120
        while True:
            trials = [t for ts in _studies(postgres_url).values() for t in ts]
            if len(_complete(trials, victim.pid)) >= 2 and _complete(trials, survivor.pid):
                break
            for proc in (victim, survivor):
                if proc.poll() is not None:
                    pytest.fail(f"a tuner ended before the kill (status {proc.returncode}):\n{proc.stdout.read()}")
            assert time.monotonic() < deadline, "the tuners finished no trials in 120 s"
            time.sleep(0.5)
        before = {(name, t.number): (t.params, t.value) for name, ts in _studies(postgres_url).items()
                  for t in _complete(ts, victim.pid)}
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(timeout=30)
        out, _ = survivor.communicate(timeout=180)
        assert survivor.returncode == 0, out
    finally:
        for proc in (victim, survivor):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)

    studies = _studies(postgres_url)
    assert len(studies) == 2, list(studies)
    # kill -9 lost none of the victim's finished trials: each is still there, complete, unchanged.
    after = {(name, t.number): (t.params, t.value) for name, ts in studies.items() for t in _complete(ts, victim.pid)}
    assert before and all(after.get(k) == v for k, v in before.items()), (before, after)
    # The survivor finished its share: its trials in every study, beside the victim's.
    for name, trials in studies.items():
        assert _complete(trials, survivor.pid), f"{name}: no trial of the surviving tuner"
    shared = [name for name, trials in studies.items() if _complete(trials, victim.pid)]
    assert shared, "the killed tuner finished trials in no study"
    # No config ran twice: among the trials that ran (not those recorded as a duplicate of
    # another tuner's), each study's configs are distinct.
    for name, trials in studies.items():
        ran = [t for t in _complete(trials) if t.user_attrs.get("duplicate_of") is None]
        counts = Counter(tuple(sorted(t.params.items())) for t in ran)
        assert max(counts.values()) == 1, f"{name}: configs run more than once: {counts.most_common(3)}"


def test_postgres_url_without_a_driver_names_storage_and_the_extra(monkeypatch):
    """No server needed: the URL maps to the installed driver's dialect, and without one the
    error names the storage argument and the extra to install, never the password."""
    import importlib.util

    from sbbench.autotune import store

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("psycopg", "psycopg2") else real_find_spec(name, *a))
    with pytest.raises(ValueError) as info:
        store.open_storage("postgresql://tuner:s3cret@db.example:5432/sbbench")
    message = str(info.value)
    assert info.value.argument == "storage" and message.startswith("storage:") and "sbbench[postgres]" in message and "s3cret" not in message, message
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "psycopg2" else None)
    assert store.postgres_url("postgres://h/db") == "postgresql+psycopg2://h/db"
    assert store.postgres_url("postgresql+psycopg2://u:p@h/db") == "postgresql+psycopg2://u:p@h/db"


def _new_database(postgres_url: str, prefix: str) -> str:
    """The URL of a new, empty database on the test server."""
    import sqlalchemy

    from sbbench.autotune.store import postgres_url as with_driver

    name = f"{prefix}_{secrets.token_hex(4)}"
    admin = sqlalchemy.create_engine(with_driver(postgres_url), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    admin.dispose()
    return postgres_url.rsplit("/", 1)[0] + "/" + name


def test_a_study_another_tuner_is_beginning_is_checked_whole(postgres_url, test_backends, monkeypatch):
    """As in test_tune.py, on PostgreSQL: a tuner checking a study another tuner is still
    describing (settings written one attribute at a time) sees all of them."""
    from tune_helpers import check_while_another_begins

    assert check_while_another_begins(_new_database(postgres_url, "begin"), monkeypatch) is None


def test_tuners_starting_together_on_a_new_database_all_open_it(postgres_url):
    """Tuners started at once on a database Optuna has not set up yet: each one that finds no
    tables creates them, and without a lock between them the slower ones fail ("duplicate key
    value violates unique constraint"). All must open it."""
    from tune_helpers import open_storage_together

    failed = open_storage_together(_new_database(postgres_url, "race"), processes=6)
    assert not failed, failed
