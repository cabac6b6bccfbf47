"""The key-value stores processes of a run meet through (torch.distributed rendezvous), and who
can reach them.

torch's TCPStore listens on every interface and has no authentication. So:

- a store on this machine only (a single-node run: 127.0.0.1) is a TCPStore handed a socket
  already bound to that address (`bound_tcp_store`, through TCPStore's `master_listen_fd`);
- a store other machines must reach (a multi-node run) is the run's Redis, which wants the
  run's secret (GANTRY_REDIS_PASSWORD): `RedisStore`, a `torch.distributed.Store` written in
  Python (c10d calls its methods for gloo's and NCCL's rendezvous, torchrun's agents, barriers).
  A peer without the secret is refused before it reads or writes a key (`StoreRefused`).

    store = RedisStore("redis://node-a:6380/0", password, prefix="gantry:RUN:torchrun:0/")
    store = bound_tcp_store("127.0.0.1", port, is_master=True, timeout_s=900)
"""

from __future__ import annotations

import ipaddress
import socket
import time
from datetime import timedelta

import redis
import torch.distributed as dist

from gantry.comm.transport import PASSWORD_ENV

# The one address whose stores are TCPStores: a single-node run's. Any other, even another
# loopback address (tests put node 0 of a multi-node run on 127.0.0.2), is for other nodes to
# reach, and its stores are the run's Redis.
SINGLE_NODE_HOST = "127.0.0.1"
# In a run over several nodes, the launcher tells each process where the run's stores are:
# "REDIS_URL KEY_PREFIX" (no secret: that is GANTRY_REDIS_PASSWORD's). Keys under the prefix go
# with the run's other keys when it is started again.
RUN_STORE_ENV = "GANTRY_RUN_STORE"
POLL_MAX_S = 0.05  # the longest pause between two looks of a waiting get / wait
# compare_set as TCPStore does it: a missing key with expected "" is set; else set only when it
# holds `expected`; the answer is the value the key holds afterwards.
_COMPARE_SET = """
local current = redis.call('GET', KEYS[1])
if (not current and ARGV[1] == '') or current == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  return ARGV[2]
end
if not current then return ARGV[1] end
return current
"""


class StoreRefused(RuntimeError):
    """The run's Redis refused this peer's secret (or its absence)."""


def is_loopback(host: str) -> bool:
    """Whether `host` is this machine's loopback address (reachable from this machine only)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def listening_socket(host: str, port: int) -> int:
    """A TCP socket listening on (host, port); its file descriptor, owned by the store from
    now on (detached: Python's garbage collector must not close it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
        sock.listen(socket.SOMAXCONN)
    except OSError:
        sock.close()
        raise
    return sock.detach()


def bound_tcp_store(host: str, port: int, *, is_master: bool, timeout_s: float) -> dist.TCPStore:
    """A TCPStore whose server (when `is_master`) listens on `host` only, not on every
    interface as a TCPStore does by itself."""
    return dist.TCPStore(
        host,
        port,
        is_master=is_master,
        timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False,
        master_listen_fd=listening_socket(host, port) if is_master else None,
    )


class RedisStore(dist.Store):
    """A torch.distributed store kept in the run's password-protected Redis, under `prefix`.
    Reads that wait (`get`, `wait`) poll, up to the store's timeout.

    Every instance is kept alive for the life of the process (`_alive`): a process group holds
    only the C++ half of a Python store, and once the Python object is collected, c10d's next
    call fails ("Not implemented"). A process makes a few of them."""

    _alive: list[RedisStore] = []

    def __init__(self, url: str, password: str | None, prefix: str, timeout_s: float) -> None:
        super().__init__()
        self.set_timeout(timedelta(seconds=timeout_s))
        self.url, self.prefix, self._password = url, prefix, password
        self.redis = redis.Redis.from_url(
            url, password=password, protocol=2, socket_timeout=30, socket_connect_timeout=10
        )
        self._check_secret()
        self._compare_set = self.redis.register_script(_COMPARE_SET)
        RedisStore._alive.append(self)

    def clone(self) -> RedisStore:
        """Another connection to the same keys (c10d asks for one to use from another thread)."""
        return RedisStore(self.url, self._password, self.prefix, self.timeout.total_seconds())

    def _check_secret(self) -> None:
        try:
            self.redis.ping()
        except redis.AuthenticationError as exc:  # a wrong secret, or none
            self.redis.close()
            raise StoreRefused(
                f"the run's store at {self.url} refused this process ({exc}): {PASSWORD_ENV} "
                "must hold the run's secret, the same on every node"
            ) from None

    def _key(self, key: str) -> str:
        return self.prefix + key

    def set(self, key: str, value) -> None:
        self.redis.set(self._key(key), value)

    def get(self, key: str) -> bytes:
        self.wait([key])
        value = self.redis.get(self._key(key))
        return value if value is not None else self.get(key)  # deleted meanwhile: wait again

    def add(self, key: str, value: int) -> int:
        return int(self.redis.incrby(self._key(key), value))

    def compare_set(self, key: str, expected, desired) -> bytes:
        return self._compare_set(keys=[self._key(key)], args=[expected, desired])

    def check(self, keys: list[str]) -> bool:
        return self.redis.exists(*[self._key(k) for k in keys]) == len(keys)

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        limit = (timeout or self.timeout).total_seconds()
        deadline, pause = time.monotonic() + limit, 0.001
        while not self.check(keys):
            if time.monotonic() > deadline:
                raise dist.DistStoreError(
                    f"wait timeout after {limit:g}s for keys {keys} in the run's store "
                    f"{self.url} ({self.prefix})"
                )
            time.sleep(pause)
            pause = min(2 * pause, POLL_MAX_S)

    def delete_key(self, key: str) -> bool:
        return bool(self.redis.delete(self._key(key)))

    def num_keys(self) -> int:
        return sum(1 for _ in self.redis.scan_iter(match=self.prefix + "*", count=1000))

    def multi_get(self, keys: list[str]) -> list[bytes]:
        self.wait(keys)
        return [self.get(k) for k in keys]

    def multi_set(self, keys: list[str], values: list) -> None:
        self.redis.mset({self._key(k): v for k, v in zip(keys, values, strict=True)})

    def close(self) -> None:
        self.redis.close()
