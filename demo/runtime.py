"""Start-up and the running model: store, engine, offline demo, hot version swap.

`start(settings)` opens (and migrates) the store, loads the base of the store's
active version (or the configured model) and serves the active version. Every answer
comes from a registered version: a start that cannot load what the active version
needs stops with one line naming the version and what to do, and changes nothing
in the store. Only a store with no model versions at all falls back to the offline
demonstration model, which lives apart (`training.demo_model`, `<home>/offline-demo/`).

`Runtime.stream()` hands each question to the batching scheduler (core/scheduler.py), so clinicians
who ask at once are answered in one batch; `Runtime.waiting(handle)` says where a question stands in
line and about how long it will wait. Rating, review and insights never touch the engine.

`Runtime.sync()` is called before each answer (at most every `poll_s` seconds it
asks the store which version is active, one small query) and swaps the adapter
without a restart; an answer that is streaming keeps the version it started with,
because the engine picks its version under its own lock.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from annotation_db import store as st
from annotation_db.db import Store
from annotation_db.errors import StoreError
from core.config import Settings
from core.engine import Answer, Engine
from core.errors import DermaLoopError, ModelLoadError
from core.models import load_model, same_model
from core.scheduler import Request, Scheduler

log = logging.getLogger("dermaloop.demo")

OFFLINE_BANNER = (
    "**Offline demonstration model.** Answers come from a tiny model trained on drawn lesion phantoms and carry "
    "**no clinical meaning**. Its data is kept apart from the production store (`offline-demo/` in the data "
    "directory). Rating, review and `python -m training.refine` work as usual."
)


@dataclass
class DemoOptions:
    """What only the app needs (everything else is in `core.config.Settings`)."""

    review_need: int = 2  # expert reviews wanted per answer (2: inter-rater agreement is measurable)
    poll_s: float = 3.0  # how often, at most, to ask the store for a newly active version
    offline_fallback: bool = True  # a store with no model versions: use the offline demo model when the model cannot be loaded
    concurrency: int = 1  # answers generated at once (1 on CPU: the model is not run twice at once)


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    store: Store
    offline: bool = False
    notices: list[str] = field(default_factory=list)  # shown on every page (offline, no persistent storage...)
    poll_s: float = 3.0
    stream_fn: Callable[..., Iterator[Any]] | None = None  # ZeroGPU: generation inside spaces.GPU
    housekeeping: threading.Thread | None = None  # start-up clean-up running in the background
    scheduler: Scheduler | None = None  # batches concurrent questions (None: ZeroGPU, a remote back-end, or max_batch 1)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._ids: dict[str, int] = {}  # engine version name -> store version id
        self._failed: dict[str, float] = {}  # version name -> when loading it failed (retried after a minute)
        self._checked = float("-inf")
        self._preparer: ThreadPoolExecutor | None = None  # encodes uploads ahead of the question (started when needed)

    # -- versions -------------------------------------------------------------
    @property
    def version(self) -> str:
        return self.engine.default_version

    def version_id(self, name: str) -> int | None:
        return self._ids.get(name)

    def sync(self, force: bool = False, strict: bool = False) -> str:
        """Serve the store's active version (loading its adapter if new); returns the version served.
        A version that cannot be served keeps the current one, or raises ModelLoadError when `strict`."""
        if not force and time.monotonic() - self._checked < self.poll_s:
            return self.engine.default_version
        with self._lock:
            self._checked = time.monotonic()
            try:
                with self.store.session() as s:
                    v = st.active_version(s)
                    active = None if v is None else (v.id, v.name, v.adapter_path, v.base_model)
            except StoreError as e:  # the store is away: keep serving what we have
                if strict:
                    raise
                log.warning("could not read the active version: %s", e)
                return self.engine.default_version
            if active is None:
                return self.engine.default_version
            vid, name, adapter, base = active
            if name == self.engine.default_version:
                return name
            if not strict and time.monotonic() - self._failed.get(name, float("-inf")) < 60:
                return self.engine.default_version
            try:
                if not same_model(base, self.engine.info.source):
                    raise ModelLoadError(f"it runs on base {base} but the app loaded {self.engine.info.source}")
                if name not in self.engine.versions:
                    if adapter:
                        self.engine.add_adapter(name, self._adapter_dir(adapter))
                    else:
                        self.engine.add_base_version(name)
                self.engine.use(name)
            except DermaLoopError as e:
                if strict:
                    raise ModelLoadError(cannot_serve(name, base, adapter, e)) from None
                self._failed[name] = time.monotonic()
                log.warning("cannot serve the active version %s: %s; still serving %s", name, e, self.engine.default_version)
                return self.engine.default_version
            self._ids[name] = vid
            log.info("now serving model version %s", name)
            warm_up_in_background(self.engine)
            return name

    def _adapter_dir(self, adapter: str) -> Path:
        path = Path(adapter).expanduser()
        if path.is_absolute() or path.exists():
            return path
        for root in (self.settings.home, self.settings.models_dir):
            if (root / path).exists():
                return root / path
        return path

    # -- answering -------------------------------------------------------------
    def stream(self, images: Sequence[Any], question: str, **kwargs: Any):
        """A running answer: iterate for text, `.stop()`, `.result` (an `Answer`) when done."""
        if self.stream_fn is None:
            if self.scheduler is not None:
                return self.scheduler.submit(images, question, **kwargs)
            return self.engine.stream(images, question, **kwargs)
        version = kwargs.pop("version", None) or self.engine.default_version
        adapter = self.engine.versions.get(version)
        return _RemoteGeneration(self.stream_fn(list(images), question, kwargs, version, adapter), version)

    def prepare(self, images: Sequence[Any]) -> Future | None:
        """Start encoding uploaded images in the background (one at a time), so the question that follows
        skips the vision tower (core/features.py). Only where the model runs in this process."""
        if self.stream_fn is not None or not isinstance(self.engine, Engine) or not self.engine.features_supported or not images:
            return None
        if self._preparer is None:
            self._preparer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dermaloop-prepare")
        version = self.engine.default_version

        def run() -> int:
            try:
                return self.engine.prepare(list(images), version=version)
            except Exception:  # a speed-up only: the question encodes the image itself
                log.exception("could not encode the uploaded images ahead of the question")
                return 0

        return self._preparer.submit(run)

    def waiting(self, handle: Any, every_s: float = 1.0) -> Iterator[str]:
        """While `handle` waits behind other answers: a note such as "2nd in line, about 20 s", again every
        `every_s` seconds, until its answer begins; then "Answering…" (only if it had to wait)."""
        scheduler = self.scheduler
        if scheduler is None or not isinstance(handle, Request):
            return
        waited = False
        while not handle.started.wait(timeout=every_s if waited else min(every_s, 0.25)):
            waited = True
            yield queue_note(scheduler.place(handle), scheduler.estimated_wait_s(handle))
        if waited:
            yield "Answering…"

    def generation_slots(self, concurrency: int) -> int:
        """How many ask events Gradio runs at once: enough for two batches when batching (the scheduler keeps
        the line and tells each clinician their place), else `concurrency`."""
        return 2 * self.scheduler.max_batch if self.scheduler is not None else concurrency


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def queue_note(place: int, wait_s: float) -> str:
    """"2nd in line, about 20 s" (no time before a first answer has been timed)."""
    if wait_s <= 0:
        return f"{ordinal(place)} in line"
    about = f"{max(round(wait_s), 1)} s" if wait_s < 90 else f"{round(wait_s / 60)} min"
    return f"{ordinal(place)} in line, about {about}"


class _RemoteGeneration:
    """A generation running in ZeroGPU's worker process: chunks, then the Answer, come back over a pipe.

    Stop cannot reach the worker, so it stops reading and keeps the text so far.
    """

    def __init__(self, chunks: Iterator[Any], version: str):
        self._chunks, self._stopped, self._text = chunks, False, []
        self.result: Answer | None = None
        self._version, self._start = version, time.perf_counter()

    def stop(self) -> None:
        self._stopped = True

    def __iter__(self) -> Iterator[str]:
        for item in self._chunks:
            if isinstance(item, Answer):
                self.result = item
            elif self._stopped:
                break
            else:
                self._text.append(item)
                yield item
        if self.result is None:
            text = "".join(self._text).strip()
            self.result = Answer(text, self._version, "stopped", 0, 0, None, time.perf_counter() - self._start)


def worker_stream(engine: Engine) -> Callable[..., Iterator[Any]]:
    """What runs inside `spaces.GPU`, in a process forked from this one: the engine is inherited,
    only picklable arguments cross over (images, text, settings), and chunks then the Answer come back.
    A worker forked before a hot swap loads the new adapter itself, once."""

    def stream(images: list, question: str, kwargs: dict, version: str, adapter: str | None) -> Iterator[Any]:
        if version not in engine.versions:
            engine.add_adapter(version, adapter) if adapter else engine.add_base_version(version)
        gen = engine.stream(images, question, version=version, **kwargs)
        for chunk in gen:
            yield chunk
        yield gen.result

    return stream


# -- start-up -------------------------------------------------------------------


def cannot_serve(name: str, base: str, adapter: str | None, why: Exception | str) -> str:
    """The one line a start that cannot serve the active version stops with."""
    what = f"base {base}" + (f", adapter {adapter}" if adapter else "")
    return (f"cannot serve the active model version {name} ({what}): {why}. Nothing was changed. Make the base "
            f"loadable (network, or the model cache under HF_HOME), start with --model {base}, or make another "
            f"version active: python -m training.refine --list, then --rollback VERSION")


def _load(settings: Settings):
    return load_model(settings.model, device=settings.device, dtype=settings.dtype,
                      image_splitting=settings.image_splitting, longest_edge=settings.longest_edge)


def start(
    settings: Settings,
    options: DemoOptions | None = None,
    *,
    adapter: str | Path | None = None,
    explicit_model: bool = True,
    notices: Sequence[str] = (),
    zerogpu: bool = False,
    progress: Callable[[str], None] = print,
) -> Runtime:
    """Migrate the store, load the active version's base (or `settings.model` when `explicit_model` or
    the store has no active version), serve the active version; the offline demo when asked for
    (`settings.offline_demo`) or when a store without versions cannot load its model."""
    options = options or DemoOptions()
    demo_kwargs = dict(adapter=adapter, notices=notices, zerogpu=zerogpu, progress=progress)
    if settings.offline_demo:
        return _start_demo(settings, options, **demo_kwargs)
    store = Store.open(settings.db_url, migrate=True)
    try:
        with store.session() as s:
            versions = st.list_versions(s)
            active = st.active_version(s)
            active_info = None if active is None else (active.name, active.base_model, active.adapter_path)
        if active_info is not None and not explicit_model:
            settings = settings.replace(model=active_info[1])
        try:
            engine = Engine(_load(settings), settings)
        except ModelLoadError as e:
            if versions or not options.offline_fallback:
                if active_info is None:
                    raise
                raise ModelLoadError(cannot_serve(*active_info, e)) from None
            from training.demo_model import demo_settings

            progress(f"{e}\nThe store has no model versions yet, so the offline demonstration model is used "
                     f"(built once, then cached; its data is kept apart under {demo_settings(settings).home}).")
            store.dispose()
            return _start_demo(settings, options, **demo_kwargs)
        runtime = attach(settings, engine, store, options, adapter=adapter, notices=notices, zerogpu=zerogpu)
        # Housekeeping off the start path: listing the image store grows with it.
        runtime.housekeeping = threading.Thread(target=remove_orphan_images, args=(store, settings.images_dir),
                                                name="dermaloop-orphan-images", daemon=True)
        runtime.housekeeping.start()
        return runtime
    except BaseException:
        store.dispose()
        raise


ORPHAN_AGE_S = 3600.0  # an image file this old with no row was left by an answer killed before its record


def remove_orphan_images(store: Store, images_dir: Path, older_than_s: float = ORPHAN_AGE_S) -> int:
    """Delete stored image files that no image row refers to (an answer killed between storing its
    images and recording its turn); recent ones may belong to an answer under way, so they stay."""
    try:
        now = time.time()
        files = {p.stem: p for p in Path(images_dir).glob("*/*.png") if now - p.stat().st_mtime > older_than_s}
        if not files:
            return 0
        with store.session() as s:
            known = st.known_image_hashes(s, files)
        orphans = set(files) - known
        for sha in orphans:
            files[sha].unlink(missing_ok=True)
    except (StoreError, OSError) as e:  # housekeeping: try again at the next start
        log.warning("could not look for orphan images: %s", e)
        return 0
    if orphans:
        log.info("removed %d stored image(s) that no answer refers to", len(orphans))
    return len(orphans)


def _start_demo(settings: Settings, options: DemoOptions, *, progress: Callable[[str], None], **kwargs: Any) -> Runtime:
    from training.demo_model import ensure_demo_model

    demo = ensure_demo_model(settings, progress=progress)
    store = Store.open(demo.settings.db_url, migrate=True)
    try:
        return attach(demo.settings, Engine(_load(demo.settings), demo.settings), store, options, offline=True, **kwargs)
    except BaseException:
        store.dispose()
        raise


def attach(
    settings: Settings,
    engine: Engine,
    store: Store,
    options: DemoOptions | None = None,
    *,
    adapter: str | Path | None = None,
    offline: bool = False,
    notices: Sequence[str] = (),
    zerogpu: bool = False,
) -> Runtime:
    """A Runtime around an engine and a store that exist already: registers `adapter` (loaded first, in
    the same transaction, so an adapter that does not fit registers nothing) or, on a store with no
    active version, the bare base; then serves the active version or raises ModelLoadError."""
    options = options or DemoOptions()
    with store.session() as s:
        if adapter is not None:
            _register_adapter(s, engine, settings.model, Path(adapter))
        st.ensure_base_version(s, settings.model)
    stream_fn = None
    if zerogpu:
        import spaces  # imported before CUDA was touched by demo.spaces.prepare()

        stream_fn = spaces.GPU(duration=120)(worker_stream(engine))
    # Batching needs the model in this process (not ZeroGPU's worker, not a remote server, which batches itself).
    scheduler = Scheduler(engine, max_batch=settings.max_batch) if isinstance(engine, Engine) and not zerogpu and settings.max_batch > 1 else None
    runtime = Runtime(settings, engine, store, offline=offline, poll_s=options.poll_s, stream_fn=stream_fn, scheduler=scheduler,
                      notices=([OFFLINE_BANNER] if offline else []) + list(notices))
    runtime.sync(force=True, strict=True)
    warm_up_in_background(engine)  # returns at once where sync switched versions and started it already
    return runtime


def warm_up_in_background(engine: Any) -> None:
    """With `cpu_decode: compiled`, compile the served version's decode step now (at start, and after a
    promotion changes the version), so that clinicians' answers do not pay for it."""
    if isinstance(engine, Engine) and engine.settings.cpu_decode == "compiled":
        threading.Thread(target=engine.warm_up, name="dermaloop-warm-up", daemon=True).start()


def _register_adapter(s, engine: Engine, base_model: str, adapter: Path) -> None:
    """`--adapter DIR`: serve it as the active version (registered once, found again by its path). The
    adapter is loaded inside the transaction: if it does not fit the base, nothing is registered."""
    path = str(adapter.expanduser().resolve())
    if not (Path(path) / "adapter_config.json").exists():
        raise ModelLoadError(f"adapter not found: {path} has no adapter_config.json")
    for v in st.list_versions(s):
        if v.adapter_path == path:
            engine.add_adapter(v.name, path)
            st.promote(s, v.id, forced=True, reason="served with --adapter")
            return
    active = st.active_version(s)
    v = st.register_version(s, base_model=base_model, adapter_path=path, parent_id=active.id if active else None,
                            status="active", note="served with --adapter")
    engine.add_adapter(v.name, path)
