"""Listing a staging's sources as a stream of pages, from many folders at once where the store allows it.

A store that can list one folder level at a time (:class:`scalebus.backends.base.FolderLister`) is walked by a
small pool of threads (``staging.list_concurrency``), each listing one folder and queueing the sub-folders it
finds for whichever thread is free; any other store is listed with ``list_files`` on one thread per source. Files
reach the staging in pages (:data:`PAGE_FILES` files, or what arrived within :data:`PAGE_WAIT_S`) through a
bounded queue, so planning and downloading start with the first page while listing continues, and a listing far
ahead of the downloads waits instead of filling memory.

The first failure of any listing stops the others and is raised to the reader of the pages. A sub-folder that
has gone by the time it is listed (deleted meanwhile) is skipped; the sources themselves must exist.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import structlog

from scalebus import errors
from scalebus.backends import base
from scalebus.transfer import kit

log = structlog.get_logger(__name__)

PAGE_FILES = 1000
"""Most files in one page handed to the planner."""
PAGE_WAIT_S = 0.05
"""A page is handed on once its first file is this old (checked as files arrive), so a slow listing still
feeds the downloads."""
QUEUED_PAGES = 16
"""Pages waiting for the planner before the listing threads wait (about 16 × 1,000 listed files in memory)."""
STOP_WAIT_S = 30.0
"""Leaving a listing early waits this long for a listing thread's request in flight to end (it stops at its
next file), so the caller may close the stores afterwards."""
_POLL_S = 0.1


@dataclass(frozen=True, slots=True)
class Page:
    """Files from one folder (or one stretch of a recursive listing) of source ``source`` (its index)."""

    source: int
    objects: list[base.RemoteObject]


@dataclass(frozen=True, slots=True)
class _Folder:
    source: int
    uri: str
    rel_prefix: str
    top: bool
    by_level: bool


WAITING: Any = object()
"""What :meth:`SourceListing.next_page` returns when no page arrived within its timeout."""
_END: Any = object()


class SourceListing:
    """The pages of ``sources`` (listed through ``stores``, one per source) on at most ``concurrency`` threads.
    Use as a context manager: leaving it stops the listing threads."""

    def __init__(self, stores: Sequence[base.ObjectSource], sources: Sequence[str], *, concurrency: int) -> None:
        self._stores = stores
        self._concurrency = max(1, concurrency)
        self._pages: queue.Queue[Any] = queue.Queue(maxsize=QUEUED_PAGES)
        self._cond = threading.Condition()
        self._work: list[_Folder] = [
            _Folder(i, uri, "", True, isinstance(store, base.FolderLister))
            for i, (uri, store) in enumerate(zip(sources, stores, strict=True))
        ]
        self._work.reverse()  # taken from the end: the sources in order, then depth first
        self._threads = 0
        self._started: list[threading.Thread] = []
        self._idle = 0
        self._busy = 0
        self._exited = 0
        self._stopped = threading.Event()
        self._failure: BaseException | None = None
        self._finished = False
        self._all_listed = False
        self.listed_files = 0
        """Files listed so far (queued or handed on)."""

    def __enter__(self) -> SourceListing:
        with self._cond:
            for _ in range(min(self._concurrency, len(self._work)) or 1):
                self._start_thread()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
        deadline = time.monotonic() + STOP_WAIT_S
        for thread in list(self._started):
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning("staging.list.still_running", thread=thread.name, waited_s=STOP_WAIT_S)

    @property
    def all_listed(self) -> bool:
        """Whether every listing thread is done (all pages are queued, ``listed_files`` is the total), which can
        be long before the pages are all handed on."""
        return self._all_listed

    @property
    def finished(self) -> bool:
        """Whether every page has been handed on (``next_page`` returned ``None``)."""
        return self._finished

    def stop(self) -> None:
        self._stopped.set()
        with self._cond:
            self._cond.notify_all()

    def next_page(self, timeout: float) -> Page | None:
        """The next page; ``None`` once the listing is complete; :data:`WAITING` if none came within
        ``timeout`` seconds. Raises the listing's failure."""
        if self._finished:
            return None
        if self._failure is not None:
            self._finished = True
            raise self._failure
        try:
            item = self._pages.get(timeout=timeout)
        except queue.Empty:
            return WAITING  # type: ignore[no-any-return]
        if item is _END:
            self._finished = True
            if self._failure is not None:
                raise self._failure
            return None
        page: Page = item
        return page

    def _start_thread(self) -> None:
        """Under the condition."""
        self._threads += 1
        thread = kit.thread_in_context(self._work_loop, name=f"stage-list-{self._threads}")
        self._started.append(thread)
        thread.start()

    def _work_loop(self) -> None:
        while (folder := self._take()) is not None:
            try:
                self._list(folder)
            except errors.ObjectNotFoundError as exc:
                if folder.top:
                    self._fail(exc)
                else:
                    log.debug("staging.list.folder_gone", uri=folder.uri)
            except BaseException as exc:
                self._fail(exc)
            finally:
                with self._cond:
                    self._busy -= 1
                    self._cond.notify_all()
        with self._cond:
            self._exited += 1
            last = self._exited == self._threads
        if last:
            self._all_listed = True
            self._put(_END, final=True)

    def _take(self) -> _Folder | None:
        """The next folder to list, or ``None`` when there is none left (or the listing stopped)."""
        with self._cond:
            while not self._work and self._busy and not self._stopped.is_set():
                self._idle += 1
                self._cond.wait()
                self._idle -= 1
            if self._stopped.is_set() or not self._work:
                self._cond.notify_all()
                return None
            self._busy += 1
            return self._work.pop()

    def _list(self, folder: _Folder) -> None:
        store = self._stores[folder.source]
        if folder.by_level:
            entries: Any = cast(base.FolderLister, store).list_level(folder.uri, folder.rel_prefix)
        else:
            entries = store.list_files(folder.uri)
        try:
            self._pages_of(folder.source, entries)
        finally:
            close = getattr(entries, "close", None)
            if close is not None:
                close()  # a listing left early lets go of its page (and connection) now, not at collection

    def _pages_of(self, source: int, entries: Any) -> None:
        page: list[base.RemoteObject] = []
        started = 0.0
        for entry in entries:
            if self._stopped.is_set():
                return
            if type(entry) is base.SubFolder:
                self._add_folder(_Folder(source, entry.uri, entry.rel_prefix, False, True))
                continue
            if not page:
                started = time.monotonic()
            page.append(entry)
            if len(page) >= PAGE_FILES or time.monotonic() - started >= PAGE_WAIT_S:
                self._put(Page(source, page))
                page = []
        if page:
            self._put(Page(source, page))

    def _add_folder(self, folder: _Folder) -> None:
        with self._cond:
            self._work.append(folder)
            if not self._idle and self._threads < self._concurrency:
                self._start_thread()
            self._cond.notify()

    def _put(self, item: Any, *, final: bool = False) -> None:
        """Queue a page (waiting while the planner is behind) unless the listing stopped; the end marker always
        goes in."""
        if isinstance(item, Page):
            with self._cond:
                self.listed_files += len(item.objects)
        while final or not self._stopped.is_set():
            try:
                self._pages.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                if final and self._stopped.is_set():
                    self._drop_one()

    def _drop_one(self) -> None:
        """Make room for the end marker after a stop: nobody will read the pages queued before it."""
        with contextlib.suppress(queue.Empty):
            self._pages.get_nowait()

    def _fail(self, exc: BaseException) -> None:
        with self._cond:
            if self._failure is None:
                self._failure = exc
        self.stop()
