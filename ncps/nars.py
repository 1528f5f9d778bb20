"""Upstream NAR downloads: admission, sharing, failover, and their resources.

One *job* per NAR (key and compression) on this process: the clients that ask
for the NAR and the prefetch that a narinfo miss starts all share it.  A job
first waits for a slot (:mod:`ncps.scheduler`): client jobs ahead of
prefetches, a prefetch promoted the moment a client asks for its NAR.  Then
it tries the NAR's sources in turn: the upstream that served the narinfo,
then every other upstream that has the same store path with the same NAR (see
``Cache.other_sources``).  A source that fails before its body flows (status,
timeout, connection) costs the waiting clients nothing but time: they get the
download of the next source.  A download that fails later (a broken body, too
slow, failed verification) aborts the clients already streaming it, and the
job goes on with the next source, so the cache is still filled and later
clients succeed.  A failure of our own (temp dir, store, database) ends the
job at once as a :class:`~ncps.errors.StorageError`: no source would help.

Upstream health: the pool records what it sees of a NAR request (no answer,
a 5xx, or an answer); a body that breaks, stalls or crawls after its headers
is recorded here.  Bad bytes are not a health failure: the upstream answered.

A job owns its slot until the last download it started holds no descriptor
and no connection any more.  The job itself belongs to no request: a client
that goes away (Klein cancels its Deferred) only detaches, and a job still
waiting for a slot is dropped only when nobody needs it any more.

Everything here runs on the reactor thread; blocking work goes to the pools.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ncps import transparent
from ncps.db.queries import Database, NarFile, NarInfoRecord
from ncps.download import NarDownload
from ncps.errors import (
    DatabaseUnavailable,
    IntegrityError,
    NotFound,
    Overloaded,
    StorageError,
    UpstreamError,
)
from ncps.logs import ncps_observer
from ncps.narinfo import NarInfo
from ncps.narsink import VERIFIABLE_COMPRESSIONS, Expected, NarSink
from ncps.scheduler import DownloadSlots, State, Ticket
from ncps.storage.base import ZSTD_NONE, NarStore
from ncps.threads import Runner
from ncps.upstream import UpstreamPool

log = Logger(observer=ncps_observer)

# A client waits at most this long for a download slot, then gets a 503.
CLIENT_WAIT = 60.0

NarKey = tuple[str, str]  # (nar_key, compression)
# The upstream NAR URLs, after the record's own, to try when it fails.
Sources = Callable[[NarInfoRecord], AsyncIterator[str]]


def announced_length(ni: NarInfo) -> int | None:
    """The Content-Length of a NAR known before it is whole, if any."""
    if ni.file_size is not None:
        return ni.file_size
    if ni.compression == "none":
        return ni.nar_size
    return None


class _Job:
    """One NAR being fetched: its ticket, its waiting clients, its download."""

    def __init__(self, key: NarKey, record: NarInfoRecord, ticket: Ticket) -> None:
        self.key = key
        self.record = record
        self.ticket = ticket
        self.prefetch = not ticket.urgent
        self.waiters: list[Deferred[NarDownload]] = []
        self.timers: dict[Deferred[NarDownload], IDelayedCall] = {}

    def stop_timers(self) -> None:
        for call in self.timers.values():
            if call.active():
                call.cancel()
        self.timers.clear()

    def hand_out(self, result: NarDownload | Failure) -> None:
        self.stop_timers()
        waiters, self.waiters = self.waiters, []
        for d in waiters:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)


class NarFetcher:
    """Every upstream NAR download of this process (see the module docstring)."""

    def __init__(
        self,
        *,
        clock: IReactorTime,
        db: Database,
        store: NarStore,
        upstreams: UpstreamPool,
        io: Runner,
        store_io: Runner,
        other_sources: Sources,
        max_downloads: int,
        on_commit: Callable[[NarFile], None] | None = None,
        transparent_zstd: bool = False,
    ) -> None:
        """``on_commit`` is called with every nar_files row written.  With
        ``transparent_zstd``, ``Compression: none`` NARs are committed
        zstd-compressed when that pays (:mod:`ncps.transparent`)."""
        self._clock = clock
        self._transparent_zstd = transparent_zstd
        self._on_commit = on_commit
        self._db = db
        self._store = store
        self._upstreams = upstreams
        self._io = io
        self._store_io = store_io
        self._other_sources = other_sources
        self.slots = DownloadSlots(max_downloads)
        self._jobs: dict[NarKey, _Job] = {}
        self._downloads: dict[NarKey, NarDownload] = {}

    def in_flight(self, key: NarKey) -> NarDownload | None:
        """The download of ``key`` clients can tail now, if any."""
        download = self._downloads.get(key)
        if download is not None and not download.done:
            return download
        return None

    def fetch(self, record: NarInfoRecord) -> Deferred[NarDownload]:
        """The download of ``record``'s NAR, once it has started.

        Fails with the last source's error when no source works, or with
        :class:`Overloaded` after :data:`CLIENT_WAIT` seconds without a slot.
        Cancelling the Deferred detaches only this caller.
        """
        key = (record.nar_key, record.narinfo.compression)
        download = self.in_flight(key)
        if download is not None:
            return succeed(download)
        job = self._jobs.get(key)
        new = job is None
        if job is None:
            job = self._jobs[key] = _Job(key, record, self.slots.client())
        else:
            job.ticket.promote()
        waiter: Deferred[NarDownload] = Deferred(lambda d: self._leave(job, d))
        job.waiters.append(waiter)
        if job.ticket.state is State.WAITING:
            job.timers[waiter] = self._clock.callLater(
                CLIENT_WAIT, self._waited_too_long, job, waiter
            )
        if new:
            self._launch(job)  # may even finish at once (in tests)
        return waiter

    def prefetch(self, record: NarInfoRecord) -> None:
        """Fetch ``record``'s NAR in the background, if a slot can be had.

        Never fails and never blocks: when too many prefetches wait already
        the NAR is left for a client to ask for.
        """
        key = (record.nar_key, record.narinfo.compression)
        if key in self._jobs or self.in_flight(key) is not None:
            return
        ticket = self.slots.prefetch()
        if ticket is None:
            log.debug(
                "too many prefetches waiting; not prefetching {url}",
                url=record.narinfo.url,
            )
            return
        job = self._jobs[key] = _Job(key, record, ticket)
        self._launch(job)

    # -- jobs ----------------------------------------------------------------------

    def _launch(self, job: _Job) -> None:
        def crashed(f: Failure) -> None:
            log.failure("NAR download job for {key}", f, key=job.key)

        Deferred.fromCoroutine(self._run(job)).addErrback(crashed)

    def _leave(self, job: _Job, waiter: Deferred[NarDownload]) -> None:
        """A client went away (cancelled) or gave up (too long a wait)."""
        if waiter in job.waiters:
            job.waiters.remove(waiter)
        call = job.timers.pop(waiter, None)
        if call is not None and call.active():
            call.cancel()
        if (
            not job.waiters
            and not job.prefetch
            and job.ticket.state is State.WAITING
            and self._jobs.get(job.key) is job
        ):
            # Nobody needs it any more and it holds nothing yet.
            del self._jobs[job.key]
            job.ticket.release()

    def _waited_too_long(self, job: _Job, waiter: Deferred[NarDownload]) -> None:
        job.timers.pop(waiter, None)
        self._leave(job, waiter)
        log.warn(
            "no download slot for {url} after {wait:g} s ({running} running, "
            "{waiting} waiting)",
            url=job.record.narinfo.url,
            wait=CLIENT_WAIT,
            running=self.slots.running,
            waiting=self.slots.waiting,
        )
        waiter.errback(Overloaded(f"no download slot for {job.record.narinfo.url}"))

    async def _run(self, job: _Job) -> None:
        try:
            await job.ticket.granted
        except CancelledError:
            return  # dropped while waiting: it held nothing
        job.stop_timers()
        try:
            if job.prefetch and not job.waiters:
                ni = job.record.narinfo
                key = job.record.nar_key
                stored = await self._db.find_nar_file(key, ni.compression)
                if stored is not None:
                    return
            result = await self._try_sources(job)
        except Exception:
            job.hand_out(Failure())
        else:
            if job.waiters:
                job.hand_out(result)
        finally:
            if self._jobs.get(job.key) is job:
                del self._jobs[job.key]
            job.ticket.release()
            # Late comers after the end: never leave them hanging.
            job.hand_out(Failure(NotFound(job.record.narinfo.url)))

    async def _try_sources(self, job: _Job) -> NarDownload:
        """Download from each source in turn until one commits; the download.

        Raises the most telling error when every source failed.
        """
        errors: list[Exception] = []
        async for url in self._sources(job.record):
            try:
                download = await self._open(job.record, url)
            except (NotFound, UpstreamError, IntegrityError) as e:
                log.warn(
                    "NAR {name} from {url}: {why}",
                    name=job.record.narinfo.url,
                    url=url,
                    why=str(e),
                )
                errors.append(e)
                continue
            except OSError as e:
                log.error(
                    "NAR {name}: no temp file for the download: {why}",
                    name=job.record.narinfo.url,
                    why=str(e),
                )
                raise _ours(e) from None
            if download.failure is None:
                # The body flows: the clients tail it from here on.
                self._downloads[job.key] = download
                job.hand_out(download)
            ours: Exception | None = None
            try:
                await download.when_done()
            except UpstreamError as e:
                # The body broke, stalled or crawled: the pool only saw its
                # headers (an answer), so this failure is recorded here.
                upstream = self._upstreams.upstream_for(url)
                self._upstreams.record_failure(upstream, str(e))
                errors.append(e)
            except IntegrityError as e:
                errors.append(e)  # bad bytes, but the upstream is alive
            except (OSError, StorageError, DatabaseUnavailable) as e:
                ours = _ours(e)
            except Exception as e:
                errors.append(e)
            await download.when_released()
            if self._downloads.get(job.key) is download:
                del self._downloads[job.key]
            if download.committed:
                return download
            if ours is not None:
                # Our temp dir, store or database failed: another source
                # would not help.
                raise ours
        raise _most_telling(errors, job.record.narinfo.url)

    async def _sources(self, record: NarInfoRecord) -> AsyncIterator[str]:
        yield record.upstream_url
        async for url in self._other_sources(record):
            log.info(
                "NAR {name}: trying {url} instead", name=record.narinfo.url, url=url
            )
            yield url

    # -- one download --------------------------------------------------------------

    async def _open(self, record: NarInfoRecord, url: str) -> NarDownload:
        """Request ``url`` and set up its download; every resource is released
        on every error path (the response's connection, the temp file and its
        descriptors)."""
        ni = record.narinfo
        if ni.compression not in VERIFIABLE_COMPRESSIONS:
            raise IntegrityError(f"cannot verify NARs compressed with {ni.compression}")
        expected = Expected(
            compression=ni.compression,
            nar_hash=ni.nar_hash,
            nar_size=ni.nar_size,
            file_hash=ni.file_hash,
            file_size=ni.file_size,
        )
        upstream = self._upstreams.upstream_for(url)
        response = await self._upstreams.open_nar(upstream, url)
        opened: tuple[int, Path] | None = None
        sink: NarSink | None = None
        try:
            opened = await self._io.run(self._store.new_temp_file_thd, record.nar_key)
            fd, temp = opened
            sink = NarSink(fd, expected)
            read_fd = os.open(temp, os.O_RDONLY)
        except BaseException:
            self._upstreams.abort(response)
            if opened is not None:
                if sink is not None:
                    sink.close_thd()  # an os.close: fine on the reactor
                else:
                    os.close(opened[0])
                await self._discard(opened[1])
            raise
        download = NarDownload(
            clock=self._clock,
            name=ni.url,
            temp_path=temp,
            sink=sink,
            run_io=self._io.run,
            commit=lambda: Deferred.fromCoroutine(self._commit(record, temp, download)),
            discard=lambda: self._io.run(self._store.discard_thd, temp),
            expected_length=announced_length(ni),
            read_fd=read_fd,
        )
        # Debug only: a line per path costs the reactor more than the request
        # itself on a cold closure; "cached ... verified" says it happened.
        log.debug("fetching {url} from {upstream}", url=ni.url, upstream=url)
        response.deliverBody(download.body_protocol())
        return download

    async def _pack(self, nar_key: str, temp: Path) -> tuple[Path, int] | None:
        """The verified NAR ``temp`` zstd-compressed into a new temp file:
        (its path, its size); None when that does not pay or fails (the NAR
        is then kept as it came)."""

        def pack_thd() -> tuple[Path, int] | None:
            fd, packed = self._store.new_temp_file_thd(nar_key)
            try:
                size = transparent.pack_thd(temp, fd)
            except BaseException:
                os.close(fd)
                self._store.discard_thd(packed)
                raise
            os.close(fd)
            if size is None:
                self._store.discard_thd(packed)
                return None
            return packed, size

        try:
            result: tuple[Path, int] | None = await self._io.run(pack_thd)
        except Exception as e:
            # Keep the verified NAR as it came rather than lose the download.
            log.warn("compressing NAR {key}: {why}", key=nar_key, why=str(e))
            return None
        return result

    async def _discard(self, temp: Path) -> None:
        try:
            await self._io.run(self._store.discard_thd, temp)
        except Exception as e:
            log.warn("deleting temp file {path}: {why}", path=str(temp), why=str(e))

    async def _commit(
        self, record: NarInfoRecord, temp: Path, download: NarDownload
    ) -> None:
        ni = record.narinfo
        form, size = ni.compression, download.written
        if ni.compression == "none" and self._transparent_zstd:
            packed = await self._pack(record.nar_key, temp)
            if packed is not None:
                packed_temp, size = packed
                try:
                    await self._store_io.run(
                        self._store.commit_thd, packed_temp, record.nar_key, ZSTD_NONE
                    )
                except BaseException:
                    await self._discard(packed_temp)
                    raise
                form = ZSTD_NONE
                await self._discard(temp)
        if form == ni.compression:
            await self._store_io.run(self._store.commit_thd, temp, record.nar_key, form)
        nar_file = NarFile(
            nar_key=record.nar_key,
            compression=form,
            file_size=size,
            nar_hash=ni.nar_hash,
            nar_size=ni.nar_size,
        )
        recorded: NarFile = await self._db.put_nar_file(nar_file)
        if recorded.compression == form and recorded.file_size != size:
            # An earlier row for this very object, whose bytes we just
            # replaced (it was found damaged, or packed by another zstd):
            # the object now in place is the truth, or every request would
            # see a mismatch and fetch it again.
            recorded = await self._db.replace_nar_file(nar_file)
        if self._on_commit is not None:
            self._on_commit(recorded)
        log.info(
            "cached {url} ({size} bytes, verified)", url=ni.url, size=download.written
        )


def _ours(e: Exception) -> Exception:
    """A failure of our own temp dir, store or database, as clients see it
    (a 503: it may pass)."""
    if isinstance(e, OSError):
        return StorageError(f"local NAR storage: {e}")
    return e


def _most_telling(errors: list[Exception], name: str) -> Exception:
    """What to tell the clients when no source worked: an upstream or
    integrity failure over a "not found", "not found" when nobody had it."""
    for e in errors:
        if not isinstance(e, NotFound):
            return e
    return errors[0] if errors else NotFound(name)
