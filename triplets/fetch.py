"""Source bytes for the load stage: web URLs concurrently, with timeouts, retries and opt-outs; everything else in a
bounded thread pool.

One :class:`Fetcher` per worker process (the load stage owns it) serves every shard of that worker:

* **HTTP(S)** runs on one event-loop thread with `aiohttp <https://docs.aiohttp.org>`_ (the client fsspec's own
  HTTP filesystem uses): at most ``fetch.concurrency`` URLs in flight, each with a connect timeout, a read timeout
  (longest silence) and a hard total deadline (``fetch.deadline_s``, retries included, enforced by cancelling the
  request, so a server that trickles bytes or never answers costs one deadline at most). Timeouts, dropped
  connections, 5xx and 429 answers are retried ``fetch.retries`` times with jittered exponential backoff, or after
  the server's ``Retry-After``. Answers over ``fetch.max_bytes`` stop being read. Every request names the tool
  (``User-Agent: cnc/<version> ...``), and an answer whose ``X-Robots-Tag`` carries a directive of
  ``fetch.disallowed_header_directives`` for every robot or for ``cnc`` (img2dataset's rule) is skipped unread.
* **Object stores, local files, tar members, parquet cells** go through their own clients
  (:func:`triplets.readers.read_source_bytes`) on a pool of ``fetch.object_store_concurrency`` threads.

:meth:`Fetcher.map_items` streams a shard's items in plan order while keeping up to ``fetch.lookahead`` items in
flight (bounded in items and in bytes held), so one hanging URL delays its shard by at most one deadline while the
items behind it are fetched.
Failures are values (:class:`Fetched` with a ``reason``), never exceptions: the load stage quarantines the item with
stage ``fetch`` and that reason (``HTTP 404``, ``timeout: ...``, ``deadline: ...``, ``too large: ...``,
``opted out: X-Robots-Tag noai``...). Decoding stays the project's safe decoder (:mod:`triplets.image_io`).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import email.utils
import logging
import os
import random
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timezone

import cnc
from triplets.config import FetchConfig

log = logging.getLogger(__name__)
#: The robot name ``X-Robots-Tag: cnc: noai`` addresses.
UA_TOKEN = "cnc"
#: HTTP statuses retried besides 5xx.
RETRY_STATUSES = frozenset({408, 429})
#: ``X-Robots-Tag`` directives that take a value after a colon (not robot names: ``unavailable_after: <date>``).
_VALUED_DIRECTIVES = frozenset({"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"})


def is_http(source: str | None) -> bool:
    return bool(source) and source[:8].lower().startswith(("http://", "https://"))


def default_user_agent() -> str:
    import aiohttp  # lazy: aiohttp loads only when a build reads web URLs

    return f"cnc/{cnc.__version__} (Compose-and-Conquer triplet builder; honours X-Robots-Tag noai; " \
           f"aiohttp/{aiohttp.__version__})"


def opt_out(values: Iterable[str], disallowed: Iterable[str], token: str = UA_TOKEN) -> str | None:
    """The first directive of ``disallowed`` that ``X-Robots-Tag`` header ``values`` apply to robot ``token``.

    A value is ``"noai, noimageai"`` (every robot) or ``"<robot>: noai"`` (that robot only, case-insensitive);
    directives are compared lower-case, without their own values (``max-snippet: 20``).

    >>> opt_out(["noindex, nofollow"], ["noindex"]), opt_out(["googlebot: noai"], ["noai"]), \\
    ...     opt_out(["CNC: NoAI"], ["noai"])
    ('noindex', None, 'noai')
    """
    banned = {d.lower() for d in disallowed}
    for value in values:
        text = value.strip()
        head, sep, rest = text.partition(":")
        robot = head.strip().lower()
        if sep and robot and " " not in robot and "," not in robot and robot not in _VALUED_DIRECTIVES:
            if robot != token:
                continue  # addressed to another robot
            text = rest
        for directive in text.split(","):
            name = directive.split(":", 1)[0].strip().lower()
            if name in banned:
                return name
    return None


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks to wait (delta-seconds or an HTTP date), ``None`` when absent/invalid."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass(frozen=True)
class Fetched:
    """The bytes of one source, or why there are none.

    Attributes:
        data: the bytes (``None`` on failure).
        reason: the per-item failure reason (``None`` on success).
        attempts: requests made (HTTP; 1 for other sources).
        seconds: wall time from the start of the first attempt.
    """

    data: bytes | None
    reason: str | None = None
    attempts: int = 1
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.reason is None


class _Retry(Exception):
    """A transient HTTP failure (timeout, dropped connection, 5xx/429)."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.reason, self.retry_after = reason, retry_after


class _Fail(Exception):
    """A permanent HTTP failure (4xx, opt-out, too large, bad URL, refused connection)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _deadline_reason(cfg: FetchConfig, attempts: int, last: str | None) -> str:
    """The reason of a URL that used up its deadline (stable text: reasons are counted per value)."""
    return f"deadline: no complete answer within fetch.deadline_s={cfg.deadline_s:g} s ({attempts} attempt(s)" \
           + (f"; last: {last})" if last else ")")


class _HttpClient:
    """aiohttp on a private event-loop thread; at most ``concurrency`` URLs in flight."""

    def __init__(self, cfg: FetchConfig):
        self.cfg = cfg
        self.user_agent = cfg.user_agent or default_user_agent()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="cnc-fetch-http", daemon=True)
        self.thread.start()
        self.random = random.Random()
        self._session, self._sem = None, None
        asyncio.run_coroutine_threadsafe(self._open(), self.loop).result()

    async def _open(self) -> None:
        import aiohttp  # lazy: aiohttp loads only when a build reads web URLs

        self._sem = asyncio.Semaphore(self.cfg.concurrency)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.cfg.connect_timeout_s,
                                        sock_read=self.cfg.read_timeout_s)
        connector = aiohttp.TCPConnector(limit=self.cfg.concurrency, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(timeout=timeout, connector=connector, trust_env=True,
                                              headers={"User-Agent": self.user_agent}, raise_for_status=False)

    def submit(self, url: str) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(self.fetch(url), self.loop)

    async def fetch(self, url: str) -> Fetched:
        """One URL: attempts with backoff inside one total deadline (the semaphore bounds URLs in flight)."""
        cfg = self.cfg
        async with self._sem:
            t0 = time.monotonic()
            state = {"attempts": 0, "last": None}
            try:
                data = await asyncio.wait_for(self._attempts(url, t0, state), cfg.deadline_s)
            except asyncio.TimeoutError:
                return Fetched(None, _deadline_reason(cfg, state["attempts"], state["last"]), state["attempts"],
                               time.monotonic() - t0)
            except _Fail as exc:
                return Fetched(None, exc.reason, state["attempts"], time.monotonic() - t0)
            return Fetched(data, None, state["attempts"], time.monotonic() - t0)

    async def _attempts(self, url: str, t0: float, state: dict) -> bytes:
        cfg = self.cfg
        while True:
            state["attempts"] += 1
            try:
                return await self._get(url)
            except _Retry as exc:
                state["last"] = exc.reason
                n = state["attempts"]
                if n > cfg.retries:
                    raise _Fail(f"{exc.reason} ({n} attempt(s))") from None
                wait = exc.retry_after if exc.retry_after is not None else \
                    cfg.backoff_s * 2 ** (n - 1) * (0.5 + self.random.random())
                if time.monotonic() - t0 + wait >= cfg.deadline_s:
                    if exc.retry_after is not None:
                        raise _Fail(f"{exc.reason}; its Retry-After is past fetch.deadline_s={cfg.deadline_s:g} s "
                                    f"({n} attempt(s))") from None
                    raise _Fail(_deadline_reason(cfg, n, exc.reason)) from None
                await asyncio.sleep(wait)

    async def _get(self, url: str) -> bytes:
        """One request. Raises :class:`_Retry` (transient) or :class:`_Fail` (permanent)."""
        import aiohttp  # lazy: aiohttp loads only when a build reads web URLs

        cfg = self.cfg
        try:
            async with self._session.get(url, allow_redirects=True) as resp:
                if resp.status >= 500 or resp.status in RETRY_STATUSES:
                    raise _Retry(f"HTTP {resp.status}", retry_after_seconds(resp.headers.get("Retry-After")))
                if not 200 <= resp.status < 300:
                    raise _Fail(f"HTTP {resp.status}")
                directive = opt_out(resp.headers.getall("X-Robots-Tag", []), cfg.disallowed_header_directives)
                if directive:
                    raise _Fail(f"opted out: X-Robots-Tag {directive}")
                length = resp.content_length
                if length is not None and length > cfg.max_bytes:
                    raise _Fail(f"too large: Content-Length over fetch.max_bytes={cfg.max_bytes}")
                buf = bytearray()
                async for chunk in resp.content.iter_chunked(1 << 16):
                    buf += chunk
                    if len(buf) > cfg.max_bytes:
                        raise _Fail(f"too large: over fetch.max_bytes={cfg.max_bytes} bytes")
                return bytes(buf)
        except (_Retry, _Fail):
            raise
        except aiohttp.ConnectionTimeoutError:
            raise _Retry(f"timeout: no connection within fetch.connect_timeout_s={cfg.connect_timeout_s:g} s") \
                from None
        except (aiohttp.ServerTimeoutError, asyncio.TimeoutError):
            raise _Retry(f"timeout: no data for fetch.read_timeout_s={cfg.read_timeout_s:g} s") from None
        # reasons name no host (the error row has the URL): equal failures count under one reason
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionResetError):
            raise _Retry("connection dropped") from None
        except aiohttp.ClientConnectorDNSError:
            raise _Fail("unknown host") from None
        except aiohttp.ClientConnectorCertificateError:
            raise _Fail("TLS certificate not trusted") from None
        except (aiohttp.ClientConnectorSSLError, aiohttp.ClientSSLError):
            raise _Fail("TLS error") from None
        except aiohttp.ClientConnectorError as exc:
            errno = getattr(exc.os_error, "errno", None)  # (its strerror may name the address)
            raise _Fail(f"connection failed: {os.strerror(errno) if errno else type(exc.os_error).__name__}") \
                from None
        except aiohttp.TooManyRedirects:
            raise _Fail("too many redirects") from None
        except (aiohttp.InvalidURL, ValueError):
            raise _Fail("invalid URL") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise _Fail(type(exc).__name__) from None

    def close(self) -> None:
        async def _close():
            if self._session is not None:
                await self._session.close()

        if self.loop.is_running():
            if threading.current_thread() is self.thread:  # (a finalizer running on the loop's own thread)
                self.loop.stop()
                return
            try:
                asyncio.run_coroutine_threadsafe(_close(), self.loop).result(timeout=5)
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=5)


def _read_other(source: str) -> Fetched:
    """A non-HTTP source through its own client (files, object stores, tar members, parquet cells)."""
    from triplets.readers import read_source_bytes

    t0 = time.monotonic()
    try:
        return Fetched(read_source_bytes(source), seconds=time.monotonic() - t0)
    except OSError as exc:
        return Fetched(None, f"cannot read source: {exc}", seconds=time.monotonic() - t0)


class Fetcher:
    """Bounded concurrent reads of sources (see the module docstring). Thread-safe; threads start on first use.

    Args:
        cfg: the ``fetch:`` config section (a :class:`~triplets.config.FetchConfig` or its dict).
    """

    def __init__(self, cfg: FetchConfig | dict | None = None):
        self.cfg = cfg if isinstance(cfg, FetchConfig) else FetchConfig.model_validate(cfg or {})
        self._http: _HttpClient | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {"cfg": self.cfg.model_dump(mode="json")}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["cfg"])

    def submit(self, source: str) -> concurrent.futures.Future:
        """Start reading ``source``; the future's result is a :class:`Fetched`."""
        with self._lock:
            if is_http(source):
                if self._http is None:
                    self._http = _HttpClient(self.cfg)
                    weakref.finalize(self, self._http.close)  # a dropped Fetcher leaves no event-loop thread behind
                return self._http.submit(source)
            if self._pool is None:  # its idle threads end when the pool is garbage-collected
                self._pool = concurrent.futures.ThreadPoolExecutor(self.cfg.object_store_concurrency, "cnc-read")
            return self._pool.submit(_read_other, source)

    def fetch(self, source: str) -> Fetched:
        """Read one source now (blocking)."""
        return self.submit(source).result()

    def map_items(self, items: Iterable[dict], lookahead: int | None = None,
                  buffer_bytes: int | None = None) -> Iterator[tuple]:
        """``(image Fetched, mask Fetched | None)`` per reader item, in order.

        Items are started ahead of the consumer while fewer than ``lookahead`` (default ``fetch.lookahead``) are
        pending, fewer than ``fetch.concurrency`` reads are running and the bytes fetched but not yet consumed stay
        under ``buffer_bytes`` (default ``fetch.buffer_mb``); a URL that hangs holds no bytes, so the items behind it
        keep being fetched until a bound is reached.
        Closing the iterator early cancels what is still pending.
        """
        max_items = max(1, lookahead or self.cfg.lookahead)
        budget = buffer_bytes or self.cfg.buffer_mb * 1_000_000
        max_running = max(self.cfg.concurrency, self.cfg.object_store_concurrency)
        pending: collections.deque = collections.deque()
        todo = iter(items)
        more = True
        count = {"bytes": 0, "running": 0}  # bytes finished and not yet consumed; reads started and not finished
        cond = threading.Condition()

        def finished(fut: concurrent.futures.Future) -> None:
            with cond:
                count["running"] -= 1
                if not fut.cancelled() and fut.exception() is None:
                    count["bytes"] += len(fut.result().data or b"")
                cond.notify_all()

        def fill() -> None:
            nonlocal more
            while more and len(pending) < max_items and count["bytes"] < budget and count["running"] < max_running:
                item = next(todo, None)
                if item is None:
                    more = False
                    break
                mask = item.get("mask_path")
                futures = (self.submit(item.get("source") or ""), self.submit(mask) if mask else None)
                for f in futures:
                    if f is not None:
                        count["running"] += 1
                        f.add_done_callback(finished)
                pending.append(futures)

        try:
            with cond:
                fill()
            while pending:
                futures = [f for f in pending[0] if f is not None]
                with cond:
                    while not all(f.done() for f in futures):
                        fill()
                        cond.wait(timeout=1.0)
                    image, mask = pending.popleft()
                    got = image.result(), (mask.result() if mask is not None else None)
                    count["bytes"] -= sum(len(g.data or b"") for g in got if g is not None)
                    fill()
                yield got
        finally:
            for futures in pending:
                for f in futures:
                    if f is not None:
                        f.cancel()

    def close(self) -> None:
        """Stop the threads (idempotent); a later call starts them again."""
        with self._lock:
            http, pool, self._http, self._pool = self._http, self._pool, None, None
        if http is not None:
            http.close()
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


_DEFAULT: Fetcher | None = None
_DEFAULT_LOCK = threading.Lock()


def fetch_url(url: str) -> bytes:
    """Bytes of one HTTP(S) URL with the default ``fetch:`` settings (timeouts, retries, size limit, opt-outs).

    Raises:
        OSError: the URL failed, with its reason.
    """
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = Fetcher()
    got = _DEFAULT.fetch(url)
    if not got.ok:
        raise OSError(got.reason)
    return got.data


__all__ = ["Fetched", "Fetcher", "UA_TOKEN", "default_user_agent", "fetch_url", "is_http", "opt_out",
           "retry_after_seconds"]
