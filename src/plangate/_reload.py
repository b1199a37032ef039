"""Hot reload: what a gate decides with (``Loaded``, swapped whole) and what tells it to reload.

A gate holds one ``Loaded`` — the config and everything built from it — and every request
reads it once, so a request decides, reads its token and settles on one config from start
to end. A reload builds and checks a new ``Loaded`` entirely before it assigns it (one
attribute: atomic), so a broken edit changes nothing.

What asks for a reload, once ``Gate.start`` ran (the middlewares and the gateway call it at
start-up, and again in a forked worker):

- the config file changing: one ``watchfiles`` watch per process (the ``reload`` extra) on
  the directories of every started gate's file, so that an editor's rename and a Kubernetes
  ConfigMap's symlink swap are seen alike;
- ``SIGHUP``: one handler per process, which only wakes a thread of plangate's (a handler
  runs between two bytecodes of the main thread) and calls the Python handler it replaced;
- a config published on the store (``plangate reload FILE``), with ``reload.store``.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
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
from .errors import ConfigError, StorageError
from .identity import TokenSource, TokenVerifier

if TYPE_CHECKING:
    from ._gate import _Gate

logger = logging.getLogger("plangate.reload")

#: milliseconds watchfiles waits, after a change, for the next one before it reports them:
#: an editor's save (write, rename, chmod) is one reload
WATCH_STEP_MS = 50
#: milliseconds of quiet after which the watch answers anyway: the first answer tells that
#: it is in place; later ones let it notice gates that are gone
WATCH_QUIET_MS = 500
#: seconds between attempts to watch directories that cannot be watched (gone, unreadable)
WATCH_RETRY = 2.0
#: the environment variable holding the key that signs published configs (optional)
SECRET_ENV = "PLANGATE_RELOAD_SECRET"  # noqa: S105 - a variable's name


def version_of(data: bytes) -> str:
    """A config's version: the first 12 hex digits of the SHA-256 of its bytes, the same in
    every process that loads the same file."""
    return hashlib.sha256(data).hexdigest()[:12]


def signature(data: bytes, secret: str) -> str:
    """The HMAC-SHA256 (hex) that signs a published config with ``PLANGATE_RELOAD_SECRET``."""
    return hmac.new(secret.encode(), data, hashlib.sha256).hexdigest()


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
    """Why the last reload was refused: the old config kept serving. ``storage``: the store
    could not be read (not the config's fault)."""

    at: float
    origin: str
    message: str
    issues: tuple[dict[str, Any], ...] = ()
    storage: bool = False


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
    if isinstance(exc, StorageError):
        return ReloadError(at, origin, f"the store: {exc}", storage=True)
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
    """What follows one gate's config: the process's file watch, its SIGHUP handler, the
    store. Started by ``Gate.start``; stopped with the app, or once the gate is gone (all of
    them hold it weakly)."""

    def __init__(self, gate: _Gate) -> None:
        self._gate = weakref.ref(gate)
        #: re-entrant: a reload listener may start or stop a gate
        self._lock = threading.RLock()
        self.started = False
        #: False once stopped: a reload the watch, SIGHUP or the store asks for is skipped
        self.following = False
        #: held strongly here: the store holds its listeners weakly
        self._listener: _StoreListener | None = None

    def start(self) -> None:
        """Follow what the gate's config says to follow (idempotent). The file watch is put
        in place first, then a reload: a process starts on what it should serve now — the
        store's published config, or its file as it is (a worker forked from a parent that
        loaded it long ago). A request that arrives meanwhile waits for it (``started`` is
        set once that reload is done)."""
        with self._lock:
            if self.started:
                return
            gate = self._gate()
            if gate is None:
                return
            settings = gate.loaded.config.model.reload
            from_file = gate.config_path is not None
            self.following = True
            # each part on its own: one that fails (no watchfiles, no pipe) leaves the others
            if settings.store:
                self._listener = _StoreListener(self._gate)
                _attempt("follow the store", gate.storage.watch_config, self._listener)
            watch = settings.watch if settings.watch is not None else not settings.store
            if watch and from_file:
                _attempt("watch the config file", _WATCHER.add, gate)
            if settings.store or from_file:
                gate.reload()  # never raises
            if settings.signal and (settings.store or from_file):
                _attempt("handle SIGHUP", _HANGUP.add, gate)
            _STARTED.add(self)
            self.started = True

    def stop(self) -> None:
        """Stop following (the app shuts down); ``start`` follows again. A reload under way
        ends first: none begins after this returns."""
        gate = self._gate()
        with self._lock:
            self.started = False
            self.following = False
            self._listener = None  # the store forgets a listener no one holds
        if gate is not None:
            with gate._reload_lock:
                pass
            _WATCHER.discard(gate)
            _HANGUP.discard(gate)

    def wait_watching(self, timeout: float = 10.0) -> bool:
        """Wait until the file watch covers this gate's file (tests await it, not sleep)."""
        gate = self._gate()
        return gate is not None and _WATCHER.wait_ready(gate, timeout)

    def _forked(self) -> None:
        """In a forked child: nothing runs here of what the parent started; the next
        request's ``Gate.start`` starts it all again."""
        self._lock = threading.RLock()
        self.started = False
        self.following = False
        self._listener = None
        gate = self._gate()
        if gate is not None:  # a parent's thread may have been reloading at the fork
            gate._reload_lock = threading.RLock()


def _attempt(what: str, action: Any, *args: Any) -> None:
    try:
        action(*args)
    except Exception:  # following changes is a service: never the app's start-up failure
        logger.exception("plangate: cannot %s", what)


class _StoreListener:
    """Told by the store of every config published, and of each subscription made: the
    gate reads the published config, on a thread of its own (the store's subscriber goes
    on hearing)."""

    def __init__(self, gate: weakref.ref[_Gate]) -> None:
        self._gate = gate

    def heard_config(self, version: str) -> None:
        gate = self._gate()
        if gate is not None and self._follows(gate) and gate.loaded.version != version:
            _in_thread(self._gate)

    def subscribed(self) -> None:
        """The subscription is (again) in place: a config published before it, after the
        last read, was not announced here."""
        gate = self._gate()
        if gate is not None and self._follows(gate):
            _in_thread(self._gate)

    def heard_nothing_for_a_while(self) -> None:
        """Customer changes are the customer cache's business (``subscribed`` follows)."""

    def heard(self, customer: str, version: int, sent_at: float | None = None) -> None:
        """Customer changes are the customer cache's business."""

    @staticmethod
    def _follows(gate: _Gate) -> bool:
        """A config published without ``reload.store`` ends the following."""
        return gate.loaded.config.model.reload.store


def _in_thread(gate_ref: weakref.ref[_Gate]) -> None:
    def run() -> None:
        gate = gate_ref()
        if gate is not None:
            gate.reload(following=True)

    threading.Thread(target=run, name="plangate-reload", daemon=True).start()


def _touches(batch: set[tuple[Any, str]], path: str) -> bool:
    """Whether a batch of changes in ``path``'s directory may have changed ``path``: itself,
    or a name starting with ``..`` (a ConfigMap's ``..data`` symlink and its directories)."""
    name = os.path.basename(path)
    for _, changed in batch:
        base = os.path.basename(changed)
        if base == name or base.startswith(".."):
            return True
    return False


def _reload_each(due: list[weakref.ref[Any]]) -> None:
    for ref in due:
        gate = ref()
        if gate is not None:
            gate.reload(origin="file", following=True)  # skipped once it stopped
        del gate


class _Watcher:
    """One watch per process over the directories of every started gate's file (a watch is
    an inotify instance; a user has 128 by default), on one thread, started again whenever
    the directories change."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        #: gate → the absolute path of its file
        self._gates: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
        #: the gates the running watch covers, once it answered the first time
        self._ready: weakref.WeakSet[Any] = weakref.WeakSet()
        self._stop: threading.Event | None = None
        self._directories: tuple[str, ...] = ()
        #: the directories the running watch has in place (after its first answer)
        self._covering: set[str] = set()

    def add(self, gate: _Gate) -> None:
        try:
            import watchfiles  # noqa: F401
        except ImportError:
            logger.warning(
                "plangate: %s is not watched (install 'plangate[reload]' for watchfiles); "
                "reload it with SIGHUP or `plangate reload`",
                gate.config_path,
            )
            return
        assert gate.config_path is not None
        with self._lock:
            self._gates[gate] = os.path.abspath(gate.config_path)
            self._ready.discard(gate)
            self._restart()

    def discard(self, gate: _Gate) -> None:
        with self._lock:
            if self._gates.pop(gate, None) is not None:
                self._ready.discard(gate)
                self._restart()

    def wait_ready(self, gate: _Gate, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: gate in self._ready, timeout)

    def _wanted(self) -> tuple[str, ...]:
        """The directories to watch: those of the gates' files that exist (one that is
        missing is looked for again at each quiet answer, and watched once it is back)."""
        found = {str(Path(path).parent) for path in self._gates.values()}
        return tuple(sorted(d for d in found if os.path.isdir(d)))

    def _restart(self) -> None:
        """(Locked.) Watch the directories of the gates there are now, if they changed."""
        wanted = self._wanted()
        if wanted == self._directories and self._stop is not None:
            if self._gates:  # the same directories: the running watch covers a new gate too
                self._ready.update(g for g in self._gates if self._covered(g))
                self._changed.notify_all()
            return
        if self._stop is not None:
            self._stop.set()
            self._stop = None
        self._directories = wanted
        self._covering = set()
        if not wanted:
            return
        stop = self._stop = threading.Event()
        threading.Thread(
            target=self._run, args=(wanted, stop), name="plangate-config-watch", daemon=True
        ).start()

    def _covered(self, gate: Any) -> bool:
        path = self._gates.get(gate)
        return path is not None and str(Path(path).parent) in self._covering

    def _run(self, directories: tuple[str, ...], stop: threading.Event) -> None:
        from watchfiles import watch

        while not stop.is_set():
            try:
                first = True
                for batch in watch(
                    *directories,
                    stop_event=stop,
                    recursive=False,
                    step=WATCH_STEP_MS,
                    rust_timeout=WATCH_QUIET_MS,
                    yield_on_timeout=True,
                    raise_interrupt=False,
                ):
                    with self._lock:
                        if stop is not self._stop:  # replaced by a watch of other directories
                            return
                        if first:  # in place: every gate of these directories is covered
                            self._covering = set(directories)
                            self._ready.update(g for g in self._gates if self._covered(g))
                            self._changed.notify_all()
                        due = self._due(directories, batch, first)
                        if self._wanted() != directories:  # a gate gone, a directory back
                            self._restart()
                    _reload_each(due)  # outside the lock: a reload may start or stop gates
                    first = False
            except Exception as exc:
                with self._lock:
                    if stop is not self._stop:
                        return
                    self._covering = set()  # nothing is watched now: say so
                    self._ready = weakref.WeakSet()
                    if self._wanted() != directories:  # a directory went away: without it
                        self._restart()
                        return
                logger.warning("plangate: cannot watch %s (%s); trying again", directories, exc)
                stop.wait(WATCH_RETRY)

    def _due(
        self, directories: tuple[str, ...], batch: set[tuple[Any, str]], first: bool
    ) -> list[weakref.ref[Any]]:
        """(Locked.) The gates to reload for this answer, held weakly: a gate dropped
        meanwhile is not kept alive by the watch."""
        return [
            weakref.ref(gate)
            for gate, path in self._gates.items()
            if str(Path(path).parent) in directories and (first or _touches(batch, path))
        ]

    def _forked(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._gates = weakref.WeakKeyDictionary()
        self._ready = weakref.WeakSet()
        self._stop = None
        self._directories = ()
        self._covering = set()


class _Hangup:
    """SIGHUP, for every gate started in the process: the handler writes a byte to a pipe;
    a thread of plangate's reads it and reloads the gates (a handler runs between two
    bytecodes of the main thread, which may be holding any lock)."""

    def __init__(self) -> None:
        self._gates: weakref.WeakSet[Any] = weakref.WeakSet()
        self._installed = False
        self._previous: Any = None
        self._read = self._write = -1

    def add(self, gate: _Gate) -> None:
        self._gates.add(gate)
        if self._installed or not hasattr(signal, "SIGHUP"):  # Windows has none
            return
        if threading.current_thread() is not threading.main_thread():
            logger.info("plangate: SIGHUP is not handled (the app started outside the main thread)")
            return
        current = signal.getsignal(signal.SIGHUP)
        if current is None:  # a handler set outside Python (uWSGI): it is not replaced
            logger.info("plangate: SIGHUP is handled outside Python here: not taken")
            return
        read, write = os.pipe()
        os.set_blocking(write, False)
        self._read, self._write = read, write
        threading.Thread(
            target=self._run, args=(read,), name="plangate-sighup", daemon=True
        ).start()
        # after a fork the handler may still be ours (a child the server did not reset):
        # the one before is then the parent's, kept; calling ours as it would recurse
        if current != self._handle:
            self._previous = current
        signal.signal(signal.SIGHUP, self._handle)
        self._installed = True

    def discard(self, gate: _Gate) -> None:
        """Forget ``gate``; the last one gone gives SIGHUP back to the handler before, if
        plangate's is still the one installed (a handler set since stays)."""
        self._gates.discard(gate)
        if self._gates or not self._installed:
            return
        if threading.current_thread() is not threading.main_thread():
            return  # kept: harmless without gates, and only the main thread may change it
        if signal.getsignal(signal.SIGHUP) == self._handle:
            previous = self._previous if self._previous is not None else signal.SIG_DFL
            signal.signal(signal.SIGHUP, previous)
        self._installed = False
        os.close(self._write)  # the thread reads the end of the pipe and ends
        self._read = self._write = -1

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._write >= 0:
            with contextlib.suppress(OSError):  # the pipe is full: a reload is on its way
                os.write(self._write, b"h")
        previous = self._previous
        if callable(previous) and previous != self._handle:
            previous(signum, frame)

    def _run(self, read: int) -> None:
        while True:
            try:
                data = os.read(read, 64)
            except OSError:
                return
            if not data:
                os.close(read)
                return
            for gate in list(self._gates):
                # a key file it names may be what changed; nothing once the gate stopped
                gate.reload(force=True, following=True)

    def _forked(self) -> None:
        """In a child: the parent's thread is not here, and its pipe is the parent's (the
        server sets its own handlers after forking: gunicorn resets SIGHUP); the next
        ``Gate.start`` installs plangate's again."""
        for fd in (self._read, self._write):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._gates = weakref.WeakSet()
        self._installed = False
        self._read = self._write = -1


_WATCHER = _Watcher()
_HANGUP = _Hangup()
_STARTED: weakref.WeakSet[Reloading] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    _WATCHER._forked()
    _HANGUP._forked()
    for reloading in list(_STARTED):
        reloading._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)
