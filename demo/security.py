"""Logins that cannot freeze the server or reveal who has an account.

    guard = LoginGuard(auth)                      # auth: a password-mode AuthConfig
    demo.launch(auth=guard.check, app_kwargs={"middleware": [guard.middleware()]})

- bcrypt runs in worker threads (at most `LoginPolicy.hash_threads` at once), never on
  the web server's event loop: Gradio awaits `check` because it is a coroutine.
- An unknown name is checked against a dummy hash of the same cost, so a failure takes
  as long for a known name as for an unknown one.
- Back-off: after `max_failures` failures within `window_s`, a user name, and
  separately a client address, is refused without hashing for `lock_s` seconds,
  doubling with each further lock (at most `max_lock_s`). Every lock is logged. The
  address is the TCP peer: behind a reverse proxy, limit by address there too
  (docs/security.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import re
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import anyio

from demo.auth import AuthConfig

log = logging.getLogger("dermaloop.security")


@dataclass(frozen=True)
class LoginPolicy:
    max_failures: int = 5  # failures within window_s before a lock
    window_s: float = 900.0
    lock_s: float = 30.0  # first lock; doubles per further lock
    max_lock_s: float = 900.0
    hash_threads: int = 2  # bcrypt checks at once (each ~0.25 s of one core at cost 12)


@dataclass
class _Record:
    failures: list[float] = field(default_factory=list)
    locks: int = 0
    locked_until: float = 0.0


class Throttle:
    """Failures per key (a user name or an address) and the back-off they earn."""

    def __init__(self, policy: LoginPolicy, what: str, clock: Callable[[], float] = time.monotonic):
        self.policy, self.what, self.clock = policy, what, clock
        self._records: dict[str, _Record] = {}
        self._lock = threading.Lock()

    def locked(self, key: str) -> float:
        """Seconds `key` must still wait (0: may try)."""
        with self._lock:
            rec = self._records.get(key)
            return max(0.0, rec.locked_until - self.clock()) if rec else 0.0

    def failed(self, key: str) -> None:
        now = self.clock()
        with self._lock:
            rec = self._records.setdefault(key, _Record())
            rec.failures = [t for t in rec.failures if now - t < self.policy.window_s] + [now]
            if len(rec.failures) >= self.policy.max_failures:
                wait = min(self.policy.max_lock_s, self.policy.lock_s * 2 ** rec.locks)
                rec.locks, rec.failures, rec.locked_until = rec.locks + 1, [], now + wait
                log.warning("login: %s %r locked for %.0f s after %d failed logins", self.what, key, wait,
                            self.policy.max_failures)
            if len(self._records) > 100_000:  # a flood of made-up names must not grow memory without end
                self._records = {k: r for k, r in self._records.items() if r.locked_until > now}

    def succeeded(self, key: str) -> None:
        with self._lock:
            self._records.pop(key, None)


class LoginGuard:
    def __init__(self, auth: AuthConfig, policy: LoginPolicy | None = None, clock: Callable[[], float] = time.monotonic):
        import bcrypt

        self.auth, self.policy = auth, policy or LoginPolicy()
        self.users = Throttle(self.policy, "user", clock)
        self.addresses = Throttle(self.policy, "address", clock)
        self._limiter = anyio.CapacityLimiter(self.policy.hash_threads)
        # A dummy hash at the cost the users' hashes have, so unknown names cost the same time.
        cost = next((int(u.password_hash.split("$")[2]) for u in auth.users.values()
                     if u.password_hash.count("$") >= 3 and u.password_hash.split("$")[2].isdigit()), 12)
        self._dummy = bcrypt.hashpw(b"dermaloop-dummy", bcrypt.gensalt(cost)).decode()

    def verify(self, username: str, password: str) -> bool:
        """The bcrypt check itself (blocking; called in a worker thread)."""
        import bcrypt

        entry = self.auth.users.get(username)
        hashed = entry.password_hash if entry is not None else self._dummy
        try:
            ok = bcrypt.checkpw(password.encode(), hashed.encode())
        except ValueError:  # a malformed hash in the file: no login, never a crash
            ok = False
        return ok and entry is not None and bool(password)

    async def check(self, username: str, password: str) -> bool:
        """Gradio's auth callable (awaited on the event loop; the hashing is not)."""
        name = (username or "").strip()
        if self.users.locked(name):
            log.warning("login: refused %r: locked after repeated failures", name)
            return False
        ok = await anyio.to_thread.run_sync(self.verify, name, password or "", limiter=self._limiter)
        if ok:
            self.users.succeeded(name)
        else:
            self.users.failed(name)
        return ok

    def middleware(self) -> Any:
        """A Starlette middleware (for `app_kwargs`) that applies the per-address back-off to POST /login."""
        from starlette.middleware import Middleware

        return Middleware(_AddressThrottle, throttle=self.addresses)


class _AddressThrottle:
    """Pure ASGI: only POST .../login is looked at; everything else passes untouched (streams included)."""

    def __init__(self, app: Any, throttle: Throttle):
        self.app, self.throttle = app, throttle

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].rstrip("/").endswith("/login"):
            await self.app(scope, receive, send)
            return
        address = (scope.get("client") or ("unknown", 0))[0]
        wait = self.throttle.locked(address)
        if wait:
            from starlette.responses import JSONResponse

            response = JSONResponse({"detail": f"Too many failed logins; try again in {wait:.0f} s."}, status_code=429,
                                    headers={"Retry-After": str(int(wait) + 1)})
            await response(scope, receive, send)
            return
        status: list[int] = []

        async def watch(message: dict) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        await self.app(scope, receive, watch)
        if status and status[0] == 200:
            self.throttle.succeeded(address)
        elif status and status[0] in (400, 401):
            self.throttle.failed(address)


UPLOAD_MAX_AGE_S = 600.0  # an API upload waits at most this long in the queue before it is swept


def is_example_copy(path: Path) -> bool:
    """Gradio stores an upload and its cached copy of an example file at the same place when they are
    the same file: an upload of one of our examples must not delete the example's cache."""
    import filecmp

    from demo import EXAMPLES_DIR

    example = EXAMPLES_DIR / path.name
    return example.is_file() and path.is_file() and filecmp.cmp(example, path, shallow=False)


def sweep_uploads(uploaded: set[str], max_age_s: float = UPLOAD_MAX_AGE_S, now: float | None = None) -> int:
    """Delete the original uploads (Gradio's `Blocks.upload_file_set`: what its upload route wrote, not
    the example files it caches beside them) older than `max_age_s`; returns how many."""
    now = time.time() if now is None else now
    removed = 0
    for name in list(uploaded):
        path = Path(name)
        try:
            if now - path.stat().st_mtime <= max_age_s:
                continue
            if not is_example_copy(path):
                path.unlink()
                removed += 1
                with contextlib.suppress(OSError):
                    path.parent.rmdir()  # Gradio's folder for it, when empty
        except FileNotFoundError:
            pass
        uploaded.discard(name)
    return removed


def start_upload_sweeper(uploaded: set[str], every_s: float = 60.0) -> threading.Thread:
    """Sweep old uploads every `every_s` seconds, for the life of the process."""

    def loop() -> None:
        while True:
            time.sleep(every_s)
            try:
                n = sweep_uploads(uploaded)
                if n:
                    log.info("uploads: swept %d original file(s)", n)
            except OSError as e:
                log.warning("uploads: sweep failed: %s", e)

    thread = threading.Thread(target=loop, name="dermaloop-upload-sweeper", daemon=True)
    thread.start()
    return thread


def prepare_upload_folder(home: Path, environ: dict | None = None) -> Path:
    """Gradio's upload folder: `<home>/uploads` unless GRADIO_TEMP_DIR names another, emptied at start
    when it is ours (what a killed app left behind). Uploads are replaced by clean copies at once
    (`Consult.clean_uploads`), API uploads are swept after 10 minutes (`sweep_uploads`), and Gradio
    deletes what is older than a few hours (`delete_cache`)."""
    env = os.environ if environ is None else environ
    if env.get("GRADIO_TEMP_DIR"):
        return Path(env["GRADIO_TEMP_DIR"])
    folder = (Path(home) / "uploads").resolve()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    env["GRADIO_TEMP_DIR"] = str(folder)
    return folder


# -- Gradio's queue: survive a flood of session ids, and say how it is ---------------------------------


def keep_queue_alive_on_evicted_sessions() -> None:
    """Work around a Gradio 6 bug: the queue keeps the message queues of the last 2,000 sessions
    (an LRU); an event still queued when its session is evicted makes `send_message` raise KeyError
    inside the processing loop, which then stops the queue for good ("Queue is stopped", 503 on every
    call). A client flooding new session ids triggers it. Here a message for an evicted session is
    dropped (that client is gone from the queue's view anyway) and logged. Reproduced by
    tests/test_security.py::test_a_flood_of_session_ids_does_not_stop_the_queue (fails without this)."""
    from gradio.queueing import Queue

    if getattr(Queue.send_message, "_dermaloop", False):
        return
    original = Queue.send_message

    def send_message(self: Any, event: Any, event_message: Any) -> None:
        try:
            original(self, event, event_message)
        except KeyError:
            log.warning("queue: dropped a message for evicted session %s…", str(event.session_hash)[:8])

    send_message._dermaloop = True  # type: ignore[attr-defined]
    Queue.send_message = send_message  # type: ignore[method-assign]


class HealthEndpoint:
    """Pure ASGI: GET /healthz answers the queue's real state (200 running, 503 stopped) as JSON;
    `GET /` keeps answering 200 even when the queue has stopped, so it is no health check."""

    def __init__(self, app: Any, blocks: Any):
        self.app, self.blocks = app, blocks

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "GET" or scope["path"].rstrip("/") != "/healthz":
            await self.app(scope, receive, send)
            return
        from starlette.responses import JSONResponse

        queue = getattr(self.blocks, "_queue", None)
        stopped = bool(queue is None or queue.stopped)
        body = {"status": "queue stopped" if stopped else "ok", "queue_stopped": stopped,
                "waiting": len(queue) if queue is not None else None}
        await JSONResponse(body, status_code=503 if stopped else 200)(scope, receive, send)


# -- exports: served only to their owner (and admins), for a while ------------------------------------

EXPORT_TTL_S = 3600.0  # how long an export's download links work
_EXPORT_NAME = re.compile(r"dermaloop-export-(?P<expires>\d+)-(?P<tag>[0-9a-f]{16})-")


class ExportLinks:
    """Export files carry their owner and expiry in a signed name (`dermaloop-export-<expires>-<tag>-
    turns.csv`, tag = HMAC of owner and expiry with a per-process key), because Gradio copies them into
    its cache under the file's own name and serves them by URL to anyone signed in. `Guard` checks the
    name on every file request: another user gets 403, an expired link 410."""

    def __init__(self, ttl_s: float = EXPORT_TTL_S, clock: Callable[[], float] = time.time):
        self.ttl_s, self.clock = ttl_s, clock
        self._key = secrets.token_bytes(32)

    def _tag(self, owner: str, expires: int) -> str:
        return hmac.new(self._key, f"{owner}\0{expires}".encode(), hashlib.sha256).hexdigest()[:16]

    def prefix(self, owner: str) -> str:
        expires = int(self.clock() + self.ttl_s)
        return f"dermaloop-export-{expires}-{self._tag(owner, expires)}-"

    def check(self, filename: str, user: str | None, is_admin: bool) -> int:
        """HTTP status for a request of `filename` by `user`: 200, 403 (not theirs) or 410 (expired)."""
        m = _EXPORT_NAME.match(filename)
        if m is None:
            return 200  # not an export
        expires = int(m["expires"])
        if not is_admin and (user is None or not hmac.compare_digest(self._tag(user, expires), m["tag"])):
            return 403
        return 410 if self.clock() > expires else 200


class ExportGuard:
    """Pure ASGI: GET/HEAD .../file=<path> of an export is answered by `ExportLinks.check`."""

    def __init__(self, app: Any, links: ExportLinks, auth: AuthConfig):
        self.app, self.links, self.auth = app, links, auth

    def _identity(self, scope: dict) -> tuple[str | None, bool]:
        from starlette.requests import Request

        from demo.auth import Denied

        request = Request(scope)
        if self.auth.mode == "password":
            gradio_app = scope.get("app")
            cookie_id = getattr(gradio_app, "cookie_id", "")
            token = request.cookies.get(f"access-token-{cookie_id}") or request.cookies.get(
                f"access-token-unsecure-{cookie_id}")
            request = SimpleNamespace(username=getattr(gradio_app, "tokens", {}).get(token))
        try:
            who = self.auth.identify(request)
        except Denied:
            return None, False
        return who.name, who.is_admin

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or scope["method"] not in ("GET", "HEAD") or "/file=" not in path:
            await self.app(scope, receive, send)
            return
        name = Path(path.split("/file=", 1)[1]).name
        if _EXPORT_NAME.match(name):
            user, is_admin = self._identity(scope)
            status = self.links.check(name, user, is_admin)
            if status != 200:
                from starlette.responses import PlainTextResponse

                text = "This export link has expired: export again." if status == 410 else "Not your export."
                await PlainTextResponse(text, status_code=status)(scope, receive, send)
                return
        await self.app(scope, receive, send)


# -- what one user may open and send ----------------------------------------------------------------


@dataclass(frozen=True)
class UsagePolicy:
    calls_per_minute: int = 60  # asks, rates, uploads... per user
    sessions_per_window: int = 30  # distinct page/API sessions per user within window_s
    uploads_per_window: int = 200  # images per user within window_s
    upload_bytes_per_window: int = 1_000_000_000
    window_s: float = 3600.0


class UsageLimits:
    """Per-user limits that keep one account (or a script holding it) from flooding the app; what a
    reverse proxy cannot see, because it does not know who is signed in. Over a limit: `Denied`
    with a one-line message, logged."""

    def __init__(self, policy: UsagePolicy | None = None, clock: Callable[[], float] = time.monotonic):
        self.policy, self.clock = policy or UsagePolicy(), clock
        self._calls: dict[str, list[float]] = {}
        self._sessions: dict[str, dict[str, float]] = {}
        self._uploads: dict[str, list[tuple[float, int]]] = {}
        self._lock = threading.Lock()

    def _refuse(self, user: str, why: str) -> None:
        from demo.auth import Denied

        log.warning("limits: %s refused: %s", user, why)
        raise Denied(why)

    def call(self, user: str, session: str | None) -> None:
        """One handler call by `user` from `session`."""
        now, p = self.clock(), self.policy
        with self._lock:
            calls = [t for t in self._calls.get(user, []) if now - t < 60] + [now]
            self._calls[user] = calls
            sessions = {s: t for s, t in self._sessions.get(user, {}).items() if now - t < p.window_s}
            if session is not None and session not in sessions and len(sessions) >= p.sessions_per_window:
                self._sessions[user] = sessions
                self._refuse(user, f"too many sessions ({p.sessions_per_window} within an hour): use an open page "
                                   "or try again later")
            if session is not None:
                sessions[session] = now
            self._sessions[user] = sessions
        if len(calls) > p.calls_per_minute:
            self._refuse(user, f"too many requests ({p.calls_per_minute} a minute): wait a moment")

    def upload(self, user: str, sizes: list[int]) -> None:
        """`user` uploads files of `sizes` bytes: within the hourly count and volume, or refused."""
        now, p = self.clock(), self.policy
        with self._lock:
            recent = [(t, n) for t, n in self._uploads.get(user, []) if now - t < p.window_s]
            count, volume = len(recent) + len(sizes), sum(n for _, n in recent) + sum(sizes)
            if count > p.uploads_per_window or volume > p.upload_bytes_per_window:
                self._uploads[user] = recent
                self._refuse(user, f"upload quota reached ({p.uploads_per_window} images or "
                                   f"{p.upload_bytes_per_window // 1_000_000} MB an hour): try again later")
            self._uploads[user] = recent + [(now, n) for n in sizes]
