"""Real Redis servers for the tests: single nodes, a 3-master cluster, a sentinel.

Each server is a ``redis-server`` process of its own on a free loopback port, with nothing
saved to disk. Readiness is read from the server's own log line, not guessed with sleeps. The
machine's Redis on 6379 is never used.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis

READY = "Ready to accept connections"


def free_port(*, also: int = 0) -> int:
    """A loopback port nothing listens on; ``also`` asks that port + also be free too."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port + also > 65535:
            continue
        if also:
            with socket.socket() as other:
                try:
                    other.bind(("127.0.0.1", port + also))
                except OSError:
                    continue
        if port != 6379:
            return port


def _wait_for_line(proc: subprocess.Popen[str], needle: str, timeout: float = 20) -> None:
    """Read the process's log until ``needle`` appears (the log is its stdout)."""
    deadline = time.monotonic() + timeout
    seen = []
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the server exited before {needle!r}:\n{''.join(seen)}")
        seen.append(line)
        if needle in line:
            return
    raise RuntimeError(f"no {needle!r} within {timeout} s:\n{''.join(seen)}")


class RedisServer:
    """One ``redis-server`` process; ``restart()`` brings it back on the same port."""

    def __init__(self, port: int | None = None, *args: str, cluster: bool = False) -> None:
        self.port = port or free_port(also=10000 if cluster else 0)
        self.args = list(args)
        self.dir = Path(tempfile.mkdtemp(prefix=f"plangate-redis-{self.port}-"))
        if cluster:
            self.args += [
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(self.dir / "nodes.conf"),
                "--cluster-node-timeout", "5000",
            ]  # fmt: skip
        self.proc: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        command = [
            "redis-server",
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
            "--logfile", "",
            *self.args,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        _wait_for_line(self.proc, READY)
        # Keep draining the log so that the server never blocks on a full pipe.
        assert self.proc.stdout is not None
        drain(self.proc)
        return self

    def kill(self) -> None:
        """Stop the server abruptly, as a crash would."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def drain(proc: subprocess.Popen[str], keep: list[str] | None = None) -> None:
    """Read the rest of a process's output (stdout, else stderr) in a thread; dropped, or
    appended to ``keep``."""
    import threading

    stream = proc.stdout or proc.stderr
    assert stream is not None

    def read() -> None:
        with stream:  # closed at EOF, when the process has exited
            for line in stream:
                if keep is not None:
                    keep.append(line)

    threading.Thread(target=read, daemon=True).start()


class RedisCluster:
    """Three masters, no replicas, slots spread by ``redis-cli --cluster create``."""

    def __init__(self) -> None:
        self.nodes = [RedisServer(cluster=True) for _ in range(3)]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)
        return f"redis+cluster://{hosts}"

    def start(self) -> RedisCluster:
        for node in self.nodes:
            node.start()
        subprocess.run(
            [
                "redis-cli", "--cluster", "create",
                *(f"127.0.0.1:{node.port}" for node in self.nodes),
                "--cluster-replicas", "0", "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )  # fmt: skip
        self._wait_until_ok()
        return self

    def _wait_until_ok(self, timeout: float = 30) -> None:
        # The nodes learn the slot map by gossip; there is no event to wait on but its state.
        deadline = time.monotonic() + timeout
        while True:
            states = []
            for node in self.nodes:
                with node.client() as client:
                    states.append(client.cluster("info")["cluster_state"])
            if all(state == "ok" for state in states):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster not ok within {timeout} s: {states}")
            time.sleep(0.05)

    def flush(self) -> None:
        for node in self.nodes:
            with node.client() as client:
                client.flushall()

    def cleanup(self) -> None:
        for node in self.nodes:
            node.cleanup()


class RedisSentinel:
    """A master and one sentinel that monitors it as ``plangate-master``."""

    SERVICE = "plangate-master"

    def __init__(self) -> None:
        self.master = RedisServer()
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"plangate-sentinel-{self.port}-"))
        self.proc: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.port}/{self.SERVICE}"

    def start(self) -> RedisSentinel:
        self.master.start()
        conf = self.dir / "sentinel.conf"
        conf.write_text(
            f"port {self.port}\n"
            "bind 127.0.0.1\n"
            f"dir {self.dir}\n"
            f"sentinel monitor {self.SERVICE} 127.0.0.1 {self.master.port} 1\n"
            f"sentinel down-after-milliseconds {self.SERVICE} 5000\n"
        )
        self.proc = subprocess.Popen(
            ["redis-server", str(conf), "--sentinel"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        _wait_for_line(self.proc, f"+monitor master {self.SERVICE}")
        drain(self.proc)
        return self

    def cleanup(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
        self.master.cleanup()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def running(server: RedisServer | RedisCluster | RedisSentinel) -> Iterator[None]:
    try:
        server.start()
        yield
    finally:
        server.cleanup()


@contextlib.contextmanager
def ready_process(
    command: list[str], ready: str, *, name: str = "", log: list[str] | None = None, **popen: Any
) -> Iterator[subprocess.Popen[str]]:
    """A server process that logs ``ready`` on stderr once it serves; stopped on exit.

    Its log is read until that line (an event, not a guess), then drained so that a full pipe
    never stalls it (into ``log``, when given).
    """
    proc = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen
    )
    try:
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if ready in line:
                break
        else:
            raise RuntimeError(f"{name or command[0]} exited:\n" + "".join(seen))
        drain(proc, log)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(20)
