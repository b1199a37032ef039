"""Hot reload: what a gate decides with (``Loaded``, swapped whole) and what tells it to reload.

A gate holds one ``Loaded`` — the config and everything built from it — and every request
reads it once, so a request decides, reads its token and settles on one config from start
to end. A reload builds and checks a new ``Loaded`` entirely before it assigns it (one
attribute: atomic), so a broken edit changes nothing.

What asks for a reload, each started by ``Reloading.start`` (the middlewares and the gateway
call it at start-up) and never while no one serves requests:

- the config file changing (``watchfiles``, the ``reload`` extra), its directory watched so
  that an editor's rename and a Kubernetes ConfigMap's symlink swap are seen alike;
- ``SIGHUP`` (one handler per process, which chains to the one it replaced);
- a config published on the store (``plangate reload FILE``), with ``reload.store``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import threading
import weakref
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from ._decisions import DecisionLog
from .config import Config
from .engine import Engine
from .errors import ConfigError
from .identity import TokenSource, TokenVerifier

if TYPE_CHECKING:
    from ._gate import _Gate

logger = logging.getLogger("plangate.reload")

#: milliseconds watchfiles waits, after a change, for the next one before it reports them:
#: an editor's save (write, rename, chmod) is one reload
WATCH_STEP_MS = 50
#: milliseconds of quiet after which the watch answers anyway (it is in place by then)
WATCH_READY_MS = 500
#: seconds between attempts to watch a directory that cannot be watched (gone, unreadable)
WATCH_RETRY = 2.0


def version_of(data: bytes) -> str:
    """A config's version: the first 12 hex digits of the SHA-256 of its bytes, the same in
    every process that loads the same file."""
    return hashlib.sha256(data).hexdigest()[:12]


@dataclass(frozen=True, eq=False, slots=True)
class Loaded:
    """A config and everything a gate builds from it; replaced whole by a reload."""

    config: Config
    engine: Engine
    verifier: TokenVerifier
    token_source: TokenSource
    #: CORS preflights pass unauthenticated and unmetered (they carry no credentials)
    pass_preflights: bool
    decision_log: DecisionLog | None
    #: ``version_of`` the bytes loaded; "" for a config given as an object
    version: str
    #: epoch seconds
    loaded_at: float
    #: "file", "store" or "object"
    origin: str


@dataclass(frozen=True, slots=True)
class ReloadError:
    """Why the last reload was refused: the old config kept serving."""

    at: float
    origin: str
    message: str
    issues: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True, slots=True)
class ReloadOutcome:
    """What ``Gate.reload`` did: ``changed`` (a new version serves), or nothing to do
    (the same version), or ``error`` (the old config still serves)."""

    changed: bool
    version: str
    error: ReloadError | None = None


def read_error(exc: Exception, origin: str, at: float) -> ReloadError:
    if isinstance(exc, ConfigError):
        issues = tuple(
            {"file": i.file, "line": i.line, "path": i.path, "message": i.message}
            for i in exc.issues
        )
        return ReloadError(at, origin, str(exc), issues)
    return ReloadError(at, origin, f"{type(exc).__name__}: {exc}")


def status(loaded: Loaded, error: ReloadError | None, reloads: int, failed: int) -> dict[str, Any]:
    """``GET /admin/config``: the version serving, when it was loaded, the last error."""
    return {
        "version": loaded.version,
        "origin": loaded.origin,
        "source": loaded.config.source,
        "loaded_at": _iso(loaded.loaded_at),
        "reloads": reloads,
        "reload_errors": failed,
        "last_error": None
        if error is None
        else {
            "at": _iso(error.at),
            "origin": error.origin,
            "message": error.message,
            "issues": list(error.issues),
        },
    }


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, timezone.utc).isoformat().replace("+00:00", "Z")


class Reloading:
    """The watchers of one gate: its file, SIGHUP and the store; started once, stopped with
    the app (or when the gate is gone: every watcher holds it weakly)."""

    def __init__(self, gate: _Gate) -> None:
        self._gate = weakref.ref(gate)
        self._lock = threading.Lock()
        self.started = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: held strongly here: the store holds its listeners weakly
        self._listener: _StoreListener | None = None

    def start(self) -> None:
        """Watch what the gate's config says to watch (idempotent)."""
        with self._lock:
            if self.started:
                return
            self.started = True
        gate = self._gate()
        if gate is None:
            return
        settings = gate.loaded.config.model.reload
        if settings.signal and (settings.store or gate.config_path is not None):
            _on_sighup(gate)  # a config given as an object has nothing to reload from
        if settings.store:
            self._listener = _StoreListener(self._gate)
            try:
                gate.storage.watch_config(self._listener)
            except Exception:
                logger.exception("cannot follow configs published on the store")
            # a process started after a publish loads what the others run
            _in_thread(self._gate, "store")
        watch = settings.watch if settings.watch is not None else not settings.store
        if watch and gate.config_path is not None:
            self._watch_file(gate.config_path)
        _STARTED.add(self)

    def stop(self) -> None:
        """Stop watching (the app shuts down); ``start`` watches again."""
        with self._lock:
            self._stop.set()
            self.started = False
        _forget_sighup(self._gate())

    def _watch_file(self, path: str) -> None:
        try:
            import watchfiles  # noqa: F401
        except ImportError:
            logger.warning(
                "plangate: %s is not watched (install 'plangate[reload]' for watchfiles); "
                "reload it with SIGHUP or `plangate reload`",
                path,
            )
            return
        gate = self._gate()
        if gate is None:
            return
        self._stop = threading.Event()  # a watch of its own: one stopped before may linger
        weakref.finalize(gate, self._stop.set)
        del gate
        self._thread = threading.Thread(
            target=_watch,
            args=(self._gate, path, self._stop),
            name="plangate-config-watch",
            daemon=True,
        )
        self._thread.start()

    def wait_watching(self, timeout: float = 10.0) -> bool:
        """Wait until the file watch is in place (tests await it rather than sleep)."""
        return _WATCHING.wait_for(self, timeout)

    def _after_fork(self) -> None:
        """In a forked child (gunicorn --preload): the parent's watch thread is not here, and
        a lock one of the parent's threads held at the fork would stay held."""
        self._lock = threading.Lock()
        gate = self._gate()
        if gate is not None:
            gate._reload_lock = threading.Lock()
        watching = self._thread is not None and not self._stop.is_set()
        if watching and gate is not None and gate.config_path is not None:
            self._watch_file(gate.config_path)


class _Watching:
    """Which reloaders have their file watch in place."""

    def __init__(self) -> None:
        self._ready: weakref.WeakSet[Reloading] = weakref.WeakSet()
        self._changed = threading.Condition()

    def ready(self, reloading: Reloading) -> None:
        with self._changed:
            self._ready.add(reloading)
            self._changed.notify_all()

    def wait_for(self, reloading: Reloading, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: reloading in self._ready, timeout)


_WATCHING = _Watching()
_STARTED: weakref.WeakSet[Reloading] = weakref.WeakSet()


def _watch(gate_ref: weakref.ref[_Gate], path: str, stop: threading.Event) -> None:
    """Watch the directory of ``path`` as named (an editor's rename, a ConfigMap's symlink
    swap replace the file itself) and reload whenever anything in it changes: a reload of the
    same bytes does nothing. The first answer (a change, or ``WATCH_READY_MS`` of quiet)
    tells the watch is in place."""
    from watchfiles import watch

    directory = str(Path(os.path.abspath(path)).parent)
    while not stop.is_set():
        try:
            first = True
            for batch in watch(
                directory,
                stop_event=stop,
                recursive=False,
                step=WATCH_STEP_MS,
                rust_timeout=WATCH_READY_MS,
                yield_on_timeout=True,
                raise_interrupt=False,
            ):
                gate = gate_ref()
                if gate is None:
                    return
                if first:  # and a change made while the watch was set up is seen now
                    _WATCHING.ready(gate.reloading)
                if batch or first:
                    gate.reload(origin="file")
                first = False
                del gate
        except Exception as exc:
            if stop.is_set():
                return
            logger.warning("plangate: cannot watch %s (%s); trying again", directory, exc)
            stop.wait(WATCH_RETRY)


class _StoreListener:
    """Told by the store of every config published: the gate loads it, on a thread of its
    own (the store's subscriber goes on hearing)."""

    def __init__(self, gate: weakref.ref[_Gate]) -> None:
        self._gate = gate

    def heard_config(self, version: str) -> None:
        gate = self._gate()
        if gate is not None and self._follows(gate) and gate.loaded.version != version:
            _in_thread(self._gate, "store")

    def heard_nothing_for_a_while(self) -> None:
        gate = self._gate()
        if gate is not None and self._follows(gate):
            _in_thread(self._gate, "store")  # an announcement may have been missed

    @staticmethod
    def _follows(gate: _Gate) -> bool:
        """A config published without ``reload.store`` ends the following."""
        return gate.loaded.config.model.reload.store

    def heard(self, customer: str, version: int, sent_at: float | None = None) -> None:
        """Customer changes are the customer cache's business."""


def _in_thread(gate_ref: weakref.ref[_Gate], origin: str) -> None:
    def run() -> None:
        gate = gate_ref()
        if gate is not None:
            gate.reload(origin=origin)

    threading.Thread(target=run, name="plangate-reload", daemon=True).start()


# SIGHUP: one handler per process, for every gate started in it -------------------------

_HUP_GATES: weakref.WeakSet[Any] = weakref.WeakSet()
_previous: Any = None
_installed = False


def _on_sighup(gate: _Gate) -> None:
    global _previous, _installed
    if not hasattr(signal, "SIGHUP"):
        return  # Windows
    _HUP_GATES.add(gate)
    if _installed:
        return
    if threading.current_thread() is not threading.main_thread():
        logger.info("plangate: SIGHUP is not handled (the app started outside the main thread)")
        return
    _previous = signal.getsignal(signal.SIGHUP)
    signal.signal(signal.SIGHUP, _hup)
    _installed = True


def _forget_sighup(gate: _Gate | None) -> None:
    if gate is not None:
        _HUP_GATES.discard(gate)


def _hup(signum: int, frame: FrameType | None) -> None:
    """Reload every gate of the process, on a thread: a signal handler runs between two
    bytecodes of the main thread (the event loop), which must not wait for a reload."""
    for gate in list(_HUP_GATES):
        origin = "store" if gate.loaded.config.model.reload.store else "file"
        _in_thread(weakref.ref(gate), origin)
    previous = _previous
    if callable(previous):
        previous(signum, frame)


def _after_fork_in_child() -> None:
    _WATCHING._changed = threading.Condition()
    for reloading in list(_STARTED):
        reloading._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
