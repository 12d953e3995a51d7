"""A throwaway redis-server for tests: loopback only, a free port, its files in a folder of its
own, killed and restarted at will.

Uses Debian's `redis-server` (`make test` installs it where it can; tests skip with
`NO_REDIS` elsewhere, which fails a HELOX_STRICT_SKIPS=1 run). The server keeps an
append-only file synced on every write (`--appendonly yes --appendfsync always`) and no RDB
snapshots, so a server killed with SIGKILL and restarted on the same folder has every stream
entry it acknowledged: what a real outage looks like to a publisher.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

NO_REDIS = ("redis-server is not installed: `make redis` installs Debian's package (needs "
            "apt-get as root), or put redis-server on PATH")
"""The skip reason of tests that need a Redis server."""


def find_redis_server() -> str | None:
    return shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """`redis-server` on 127.0.0.1:`port` with its files in `folder`.

        with RedisServer(tmp_path) as server:   # started
            publish_to(server.url)
            server.kill()                       # SIGKILL: an outage
            server.restart()                    # same port, same data
    """

    def __init__(self, folder: Path, port: int | None = None, ready_timeout_s: float = 10.0):
        executable = find_redis_server()
        if executable is None:
            raise FileNotFoundError(NO_REDIS)
        self.executable, self.folder = executable, Path(folder)
        self.port = port or free_port()
        self.ready_timeout_s = ready_timeout_s
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [self.executable, "--port", str(self.port), "--bind", "127.0.0.1",
             "--protected-mode", "yes", "--dir", str(self.folder), "--appendonly", "yes",
             "--appendfsync", "always", "--save", "", "--daemonize", "no",
             "--logfile", str(self.folder / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_ready()
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final save (the append-only file has every write)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
        self.process = None

    def restart(self) -> RedisServer:
        self.kill()
        return self.start()

    def close(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _wait_ready(self) -> None:
        """Until PING answers PONG (the server loaded its append-only file by then)."""
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = self.folder / "redis.log"
                raise RuntimeError(f"redis-server exited with {self.process.returncode}: "
                                   + (log.read_text()[-2000:] if log.is_file() else "no log"))
            if _pings(self.port):
                return
            time.sleep(0.02)
        self.kill()
        raise TimeoutError(f"redis-server on port {self.port} did not answer within "
                           f"{self.ready_timeout_s} s")


def read_group(client, stream: str, group: str = "cyrex", consumer: str = "cyrex-1") -> list[dict]:
    """Every new entry of `stream` for a consumer group, read as Cyrex's model-reload listener
    reads model-events: XREADGROUP `>` in batches, XACK each entry. `client` is a redis-py
    client with `decode_responses=True`; the group exists (XGROUP CREATE ... MKSTREAM)."""
    entries = []
    while True:
        batch = client.xreadgroup(group, consumer, {stream: ">"}, count=100)
        if not batch:
            return entries
        for entry_id, fields in batch[0][1]:
            entries.append(fields)
            client.xack(stream, group, entry_id)


def _pings(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False
