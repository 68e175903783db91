"""Where a store lives: a file path, a `sqlite:///` URL or a `postgresql://` URL, and the
store's name in messages, which never shows a password."""

import urllib.parse
from pathlib import Path

from meshserve.common.errors import InvalidArgument


def postgresql_url(path_or_url: str | Path) -> str | None:
    """The libpq URL for a PostgreSQL store URL; None for anything else."""
    if isinstance(path_or_url, Path):
        return None
    scheme, sep, rest = str(path_or_url).partition("://")
    scheme = scheme.lower()
    if not sep or not scheme.startswith("postgres"):
        return None
    if scheme in ("postgresql", "postgres"):
        return str(path_or_url)
    if scheme == "postgresql+psycopg":  # SQLAlchemy's spelling of the same URL
        return f"postgresql://{rest}"
    # The URL is not echoed: it may carry a password.
    raise InvalidArgument(f"unsupported store URL scheme '{scheme}': give postgresql://..., "
                          "a file path or sqlite:///path")


def url_secrets(url: str) -> set[str]:
    """The password of a PostgreSQL URL as written and decoded, and the URL itself: what
    `scrub` removes from messages."""
    secrets = {url}
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return secrets
    userinfo, at, _ = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        secrets.add(userinfo.partition(":")[2])
    for name, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        if name == "password":
            secrets.add(value)
    return secrets | {urllib.parse.unquote(secret) for secret in secrets}


def scrub(message: str, secrets: set[str]) -> str:
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        message = message.replace(secret, "***")
    return message.strip()


def postgresql_location(user: str, host: str, port: int | str, dbname: str) -> str:
    """`postgresql://USER@HOST:PORT/DB`, without password or parameters: the store's name in
    messages. A Unix socket directory is percent-encoded, as libpq accepts it."""
    quoted = urllib.parse.quote
    return (f"postgresql://{quoted(user, safe='')}@{quoted(host, safe='')}:{port}/"
            f"{quoted(dbname, safe='')}")


def sqlite_path(path_or_url: str | Path) -> str:
    if isinstance(path_or_url, Path):
        return str(path_or_url)
    text = str(path_or_url)
    scheme, sep, rest = text.partition("://")
    if not sep:
        if not text:
            raise InvalidArgument("the store path is empty")
        return text
    scheme = scheme.lower()
    if scheme != "sqlite":
        raise InvalidArgument(f"unsupported store URL scheme '{scheme}': give a file path, "
                              "sqlite:///path or postgresql://...")
    if rest in ("", "/", "/:memory:"):
        return ":memory:"
    if not rest.startswith("/"):
        raise InvalidArgument(f"'{text}' is not sqlite:///PATH (three slashes, then the path)")
    return rest[1:]


def missing_store_file(path_or_url: str | Path) -> str | None:
    """The file of a SQLite store that does not exist (opening it would create it); None for
    one that exists, an in-memory store or a PostgreSQL URL."""
    if postgresql_url(path_or_url) is not None:
        return None
    path = sqlite_path(path_or_url)
    return None if path == ":memory:" or Path(path).is_file() else path
