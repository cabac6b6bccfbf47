"""The run's Redis password, which no one but the run's processes (and the user) may see.

- A password written in `redis.url` (`redis://:pw@host:port/0`) is taken out of it before the
  config is written to config.json, and passed on like the others.
- An embedded Redis without GANTRY_REDIS_PASSWORD gets a fresh password: also on a single
  node, any local user could otherwise read the run's state and inject control messages.
- It reaches the run's processes in their environment (GANTRY_REDIS_PASSWORD), never on a
  command line, and RUN_DIR/redis.secret (mode 0600) for commands run from another shell
  (`python -m gantry status RUN_DIR`). run.json and logs hold URLs without it.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from gantry.comm.transport import PASSWORD_ENV, SECRET_FILE, reach
from gantry.launch.placement import LaunchError


def take_password_out_of_url(config) -> None:
    """Move a password written in `config.redis.url` to the environment (the URL keeps the
    rest); LaunchError when GANTRY_REDIS_PASSWORD holds another one."""
    url = config.redis.url
    if not url:
        return
    parts = urlsplit(url)
    if parts.password is None:
        return
    given = os.environ.get(PASSWORD_ENV)
    if given and given != parts.password:
        raise LaunchError(
            f"redis.url holds a password and {PASSWORD_ENV} another one: keep one of them"
        )
    os.environ[PASSWORD_ENV] = parts.password
    user = f"{parts.username}@" if parts.username else ""
    host = parts.hostname or ""
    netloc = user + (f"[{host}]" if ":" in host else host)
    netloc += f":{parts.port}" if parts.port else ""
    config.redis.url = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def ensure_password() -> str:
    """The run's password: GANTRY_REDIS_PASSWORD's, or a new one put there."""
    password = os.environ.get(PASSWORD_ENV)
    if not password:
        password = os.environ[PASSWORD_ENV] = secrets.token_urlsafe(24)
    return password


def write_secret(run_dir: Path, password: str) -> Path:
    """RUN_DIR/redis.secret, created readable by its owner only (0600 from the start)."""
    path = Path(run_dir) / SECRET_FILE
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")
    return path


def check_configured_redis(url: str, password: str | None) -> None:
    """LaunchError in one line when the Redis of `redis.url` cannot be used: unreachable, or
    refusing the password (or its absence); checked before anything starts."""
    client, problem = reach(url, password)
    client.close()
    if problem is None:
        return
    kind, detail = problem
    tried = f"with the password of {PASSWORD_ENV}" if password else "without a password"
    if kind == "refused":
        raise LaunchError(
            f"redis.url = {url}: the server refused the connection {tried} ({detail}): set "
            f"{PASSWORD_ENV} (or the URL's password) to the server's"
        )
    raise LaunchError(
        f"redis.url = {url}: cannot connect ({detail}): start that server, or remove "
        "redis.url to use the embedded one"
    )
