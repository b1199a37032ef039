"""Changes to customer records, told to every process through Redis pub/sub.

A write publishes ``"<version>:<ms> <customer>"`` on ``CHANNEL`` (and ``plangate reload
FILE`` announces ``"config <version>"`` there); each process subscribes once per
store, on a thread of its own (one connection, whatever serves the requests: blocking calls
or any number of event loops), and tells its listeners (the customer caches). On Redis
Cluster the channel is a sharded one (``SPUBLISH``/``SSUBSCRIBE``, Redis 7) where the server
has them, else a plain one.

Pub/sub delivers at most once: a message published while the subscription is down is lost.
So after every resubscription the listeners are told to forget everything they hold, and
each cache entry also lives at most ``customer_cache_ttl``: a change is never missed for
longer than that.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from typing import Any

from redis.exceptions import ResponseError

from ._base import Listeners

logger = logging.getLogger("plangate.storage")

CHANNEL = "plangate:customers"
#: seconds between attempts to subscribe again, doubling from the first to the last
RETRY_FIRST, RETRY_LAST = 0.05, 2.0
#: seconds the subscriber waits for a message before it looks whether it should stop
POLL = 1.0


class LostSubscription(Exception):
    """The subscription is gone without a connection error: subscribe again."""


def message(customer: str, version: int) -> str:
    """``"<version>:<published at, epoch ms> <customer>"``: the time tells the listeners how
    late they hear of it (``plangate_customer_change_lag_seconds``)."""
    return f"{version}:{int(time.time() * 1000)} {customer}"


def config_message(version: str) -> str:
    """A config published on the store (``plangate reload FILE``)."""
    return f"{CONFIG_WORD} {version}"


CONFIG_WORD = "config"


def parse_message(data: Any) -> tuple[str, int, float | None] | None:
    """``(customer, version, published at)`` from a message (no time in a message of an
    earlier plangate); None for one that is not a customer change."""
    text = data.decode("utf-8", "surrogateescape") if isinstance(data, bytes) else str(data)
    head, sep, customer = text.partition(" ")
    version, colon, sent = head.partition(":")
    if not sep or not version.isdigit() or (colon and not sent.isdigit()):
        return None
    return customer, int(version), int(sent) / 1000 if colon else None


def parse_config_message(data: Any) -> str | None:
    """The version a config announcement names; None for any other message."""
    text = data.decode("utf-8", "surrogateescape") if isinstance(data, bytes) else str(data)
    word, sep, version = text.partition(" ")
    return version if sep and word == CONFIG_WORD and version else None


class ChangeFeed:
    """Publishes changes, and listens for them on a daemon thread once there is a listener.

    ``connect()`` makes a blocking redis-py client of its own; ``cluster`` says whether it is
    a ``RedisCluster`` (sharded channels where the server has them).
    """

    def __init__(self, connect: Any, *, cluster: bool) -> None:
        self._connect = connect
        self.cluster = cluster
        self.listeners = Listeners()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        #: None: not known yet; False: the cluster has no sharded pub/sub (Redis before 7)
        self.sharded: bool | None = None if cluster else False
        #: how many times the subscription was made (1 + reconnections); ``subscribed`` is
        #: set each time, and cleared while the subscription is down
        self.subscriptions = 0
        self.subscribed = threading.Event()
        self._changed = threading.Condition()
        self._forked = False
        self._pid = os.getpid()
        _FEEDS.add(self)

    # publishing --------------------------------------------------------------------------

    def announce(self, execute: Any, text: str) -> None:
        """Publish ``text`` on the channel with ``execute(*command)``; raises what fails."""
        if self.sharded is not False:
            try:
                execute("SPUBLISH", CHANNEL, text)
                self.sharded = True
                return
            except ResponseError as exc:
                if "unknown command" not in str(exc).lower():
                    raise
                self.sharded = False
        execute("PUBLISH", CHANNEL, text)

    def publish(self, execute: Any, customer: str, version: int) -> None:
        """Tell every process, with ``execute(*command)``; a failure is logged (the caches'
        TTL still brings the change)."""
        try:
            self.announce(execute, message(customer, version))
        except Exception as exc:
            logger.warning(
                "could not publish the change of customer %r (version %d): %s; other processes "
                "see it within customer_cache_ttl",
                customer,
                version,
                exc,
            )

    def publish_many(self, client: Any, changes: list[tuple[str, int]]) -> None:
        """``publish`` for many changes: one pipeline (the first alone while it is not known
        whether the server has sharded channels)."""
        if changes and self.sharded is None:
            self.publish(client.execute_command, *changes[0])
            changes = changes[1:]
        if not changes:
            return
        command = "SPUBLISH" if self.sharded else "PUBLISH"
        try:
            pipe = client.pipeline(transaction=False)
            for customer, version in changes:
                pipe.execute_command(command, CHANNEL, message(customer, version))
            pipe.execute()
        except Exception as exc:
            logger.warning(
                "could not publish %d customer changes: %s; other processes see them within "
                "customer_cache_ttl",
                len(changes),
                exc,
            )

    # listening ---------------------------------------------------------------------------

    def watch(self, listener: Any) -> None:
        self.listeners.add(listener)
        self._start()

    def _start(self) -> None:
        with self._lock:
            thread = self._thread
            if thread is not None and thread.is_alive():
                if not self._stop.is_set():
                    return
                thread.join(POLL + 1)  # closed and reopened: the old one is on its way out
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._run, name="plangate-customer-changes", daemon=True
            )
            self._thread.start()

    def resume(self) -> None:
        """Listen again after ``close``, if anyone listens (a store closed, then used)."""
        if self._stop.is_set() and self.listeners.any():
            self._start()

    def close(self, *, wait: bool = False) -> None:
        """Stop listening. The thread (a daemon) ends at its next poll, within ``POLL``
        seconds; nothing waits for it unless ``wait`` (a command-line process exits at once)."""
        self._stop.set()
        thread = self._thread
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join(POLL + 1)

    def wait_subscribed(self, count: int = 1, timeout: float = 10.0) -> bool:
        """Wait until the subscription has been made ``count`` times in all (tests and
        benchmarks await this rather than sleep)."""
        with self._changed:
            return self._changed.wait_for(lambda: self.subscriptions >= count, timeout)

    def _run(self) -> None:
        delay = RETRY_FIRST
        while not self._stop.is_set():
            client: Any = None
            pubsub: Any = None
            try:
                client = self._connect()
                pubsub = client.pubsub()
                get = self._subscribe(pubsub)
                while not self._stop.is_set():
                    asked = time.monotonic()
                    item = self._get(get)
                    if item is None:
                        if time.monotonic() - asked < POLL / 10:
                            # nothing to wait on (no subscription held): do not spin
                            raise LostSubscription("no subscription is held")
                        continue
                    kind = item.get("type")
                    if isinstance(kind, bytes):
                        kind = kind.decode()
                    if kind in ("subscribe", "ssubscribe"):
                        if kind == "ssubscribe":
                            self.sharded = True
                        self._subscribed()
                        delay = RETRY_FIRST
                    elif kind in ("message", "smessage"):
                        data = item.get("data")
                        parsed = parse_message(data)
                        if parsed is not None:
                            self.listeners.heard(*parsed)
                        elif (config := parse_config_message(data)) is not None:
                            self.listeners.heard_config(config)
                    elif kind in ("unsubscribe", "sunsubscribe"):
                        # the server dropped it (the channel's slot moved to another node)
                        raise LostSubscription(f"{kind} from the server")
            except Exception as exc:
                if not self._stop.is_set():
                    # once per outage: a warning when it starts, then quiet retries
                    log = logger.warning if delay == RETRY_FIRST else logger.debug
                    log(
                        "the customer-change subscription failed (%s); subscribing again "
                        "until it works, meanwhile changes arrive within customer_cache_ttl",
                        exc,
                    )
            finally:
                self.subscribed.clear()
                for thing in (pubsub, client):
                    if thing is not None:
                        try:
                            thing.close()
                        except Exception as exc:  # a connection already broken
                            logger.debug("closing the subscription: %s", exc)
            self._stop.wait(delay)
            delay = min(delay * 2, RETRY_LAST)

    def _subscribe(self, pubsub: Any) -> Any:
        if self.cluster and self.sharded is not False:
            pubsub.ssubscribe(CHANNEL)
            return pubsub.get_sharded_message
        pubsub.subscribe(CHANNEL)
        return pubsub.get_message

    def _get(self, get: Any) -> Any:
        """The next message, or None after ``POLL`` seconds. A cluster without sharded
        channels (Redis before 7) answers SSUBSCRIBE with an error only now: plain ones."""
        try:
            return get(timeout=POLL)
        except ResponseError as exc:
            if self.cluster and self.sharded is None and "unknown command" in str(exc).lower():
                self.sharded = False
                raise LostSubscription("no sharded pub/sub on this cluster: plain") from exc
            raise

    def _subscribed(self) -> None:
        """Resubscribed: what was published while it was down is lost, so the listeners
        forget everything. (Before the first subscription there was nothing to lose: what a
        cache read then is as old as any entry, and lives no longer than the TTL.)"""
        if self.subscriptions or self._forked:
            if self.subscriptions:
                logger.info("the customer-change subscription is back")
            self._forked = False
            self.listeners.heard_nothing_for_a_while()
        with self._changed:
            self.subscriptions += 1
            self.subscribed.set()
            self._changed.notify_all()
        self.listeners.subscribed()  # a config published before now was not announced here

    def _after_fork(self) -> None:
        """In a child process: the parent's thread is not here; start one of our own."""
        self._pid = os.getpid()
        self._thread = None
        self._lock = threading.Lock()
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self.subscribed = threading.Event()
        self.subscriptions = 0
        #: what the parent cached may have changed before this child subscribes
        self._forked = True
        self.listeners.after_fork()
        if self.listeners.any():
            self._start()


_FEEDS: weakref.WeakSet[ChangeFeed] = weakref.WeakSet()


def _restart_in_child() -> None:
    for feed in list(_FEEDS):
        feed._after_fork()


os.register_at_fork(after_in_child=_restart_in_child)
