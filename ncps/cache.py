"""The read-through cache: no HTTP and no SQL here, only the decisions.

narinfo: database hit -> serve; miss -> ask the upstreams in priority order,
parse, check the store path and the signature, rewrite the URL to our own
``nar/<key>.nar[.ext]``, persist, start fetching the NAR, serve.

NAR: committed object -> serve the file; download in flight -> tail it;
otherwise -> start the download described by a stored narinfo (through
:class:`ncps.nars.NarFetcher`: bounded, clients before prefetches, failover
to other upstreams with the same NAR).  A NAR nobody has a narinfo for is
not fetched: we could not verify it.

A narinfo no upstream has is answered 404 only if at least one upstream said
so; when none could answer (errors, timeouts, backoff, rejected narinfos) it
is :class:`~ncps.errors.UpstreamsUnavailable` (503): Nix remembers a 404 for
an hour.  One that every upstream said it does not have is remembered as
missing for ``negative_ttl`` seconds (:mod:`ncps.negative`).
"""

from __future__ import annotations

import datetime
import os
from collections import OrderedDict
from collections.abc import AsyncIterator

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ncps import narinfo as narinfo_mod
from ncps.coalesce import Coalescer
from ncps.db.queries import TOUCH_INTERVAL, Database, NarFile, NarInfoRecord
from ncps.download import NarDownload
from ncps.errors import NotFound, UpstreamError, UpstreamsUnavailable
from ncps.logs import ncps_observer
from ncps.narinfo import NarInfo, NarInfoError
from ncps.nars import NarFetcher, announced_length
from ncps.narsink import VERIFIABLE_COMPRESSIONS
from ncps.negative import NegativeCache
from ncps.nix32 import encode as nix32_encode
from ncps.signing import SecretKey, TrustedKeys, sign_narinfo
from ncps.storage.base import (
    ZSTD_NONE,
    NarStore,
    StoredNar,
    nar_file_name,
    served_compression,
    stored_name,
)
from ncps.storage.local import LocalStore
from ncps.threads import Runner
from ncps.upstream import BackingOff, UpstreamPool, resolve_nar_url

log = Logger(observer=ncps_observer)

# How many signed narinfo texts to keep in memory (about 1 KiB each).
RENDERED_NARINFOS = 20_000
# How many committed NARs' rows to keep in memory (about 300 bytes each).
KNOWN_NAR_FILES = 50_000


class Rejected(Exception):
    """An upstream narinfo we will not store or serve."""


@attrs.frozen
class NarBody:
    """What to send for a NAR request: a readable descriptor, owned by the caller.

    ``download`` is set while the NAR is still arriving; ``size`` is the
    length to announce (``None`` when not known in advance).
    """

    fd: int | None
    size: int | None
    download: NarDownload | None = None
    # A committed object that is not a local file (S3): read with
    # ``stored.read_thd`` on the ``reader`` pool.
    stored: StoredNar | None = None
    # The pool of the object's store (set for every committed object).
    reader: Runner | None = None
    # "zstd" for a Compression: none NAR stored zstd-compressed: ``size``
    # is then the stored length and ``nar_size`` the NAR's own.
    encoding: str | None = None
    nar_size: int | None = None


@attrs.frozen
class NarHead:
    """What a HEAD of a NAR announces, in the terms of :class:`NarBody`."""

    size: int | None
    encoding: str | None = None
    nar_size: int | None = None
    # Whether a GET of it honours a byte range (a stored NAR, not one
    # still arriving).
    ranges: bool = False


def nar_key_for(ni: NarInfo) -> str:
    """The name we store and serve a NAR under: FileHash, else NarHash, in nix32."""
    h = (
        ni.file_hash
        if ni.file_hash is not None and ni.file_hash.algorithm == "sha256"
        else ni.nar_hash
    )
    return nix32_encode(h.digest)


__all__ = ["Cache", "NarBody", "NarHead", "Rejected", "announced_length", "nar_key_for"]


class Cache:
    """Read-through cache over the database, the NAR store and the upstreams."""

    def __init__(
        self,
        *,
        clock: IReactorTime,
        db: Database,
        store: NarStore,
        upstreams: UpstreamPool,
        trusted: TrustedKeys,
        signer: SecretKey | None,
        io: Runner,
        store_io: Runner | None = None,
        max_downloads: int = 32,
        negative_ttl: float = 10.0,
        transparent_zstd: bool = False,
    ) -> None:
        """``io`` runs temp-file work (writing, hashing, fsync); ``store_io``
        runs the store's own calls (the io pool for local disk, the s3 pool
        for S3).  At most ``max_downloads`` upstream NAR downloads run at
        once; a narinfo no upstream has is answered 404 without asking them
        again for ``negative_ttl`` seconds (0 turns that off).  With
        ``transparent_zstd``, ``Compression: none`` NARs are stored
        zstd-compressed (:mod:`ncps.transparent`)."""
        self._clock = clock
        self._db = db
        self._store = store
        self._store_io = store_io or io
        self._upstreams = upstreams
        self._trusted = trusted
        self._signer = signer
        self._io = io
        self._narinfo_fetches: Coalescer[NarInfoRecord] = Coalescer()
        self._missing = NegativeCache(clock, negative_ttl)
        self.nars = NarFetcher(
            clock=clock,
            db=db,
            store=store,
            upstreams=upstreams,
            io=io,
            store_io=self._store_io,
            other_sources=self.other_sources,
            max_downloads=max_downloads,
            on_commit=self._remember_nar_file,
            transparent_zstd=transparent_zstd,
        )
        # hash -> (signed narinfo text, clock time the next access is recorded)
        self._rendered: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        # (NAR key, compression asked for) -> its nar_files row.  A row is
        # written once and never changed (first writer wins), so a warm NAR
        # request needs no database round trip.
        self._nar_files: OrderedDict[tuple[str, str], NarFile] = OrderedDict()

    # -- narinfo -------------------------------------------------------------------

    async def narinfo_text(self, hash_part: str) -> bytes:
        """The narinfo we serve for ``hash_part``; raises :class:`NotFound` or
        :class:`UpstreamsUnavailable`.

        Recently served narinfos are answered from memory: a stored narinfo
        never changes (first writer wins), so only eviction or deletion,
        which go through this object, could make an entry stale.
        """
        remembered = self.remembered_narinfo_text(hash_part)
        if remembered is not None:
            return remembered
        record = await self.narinfo(hash_part)
        body = self.render(record)
        now = self._clock.seconds()
        self._rendered[hash_part] = (body, now + TOUCH_INTERVAL.total_seconds())
        if len(self._rendered) > RENDERED_NARINFOS:
            self._rendered.popitem(last=False)
        return body

    def remembered_narinfo_text(self, hash_part: str) -> bytes | None:
        """:meth:`narinfo_text` when it is answered from memory, at once."""
        hit = self._rendered.get(hash_part)
        if hit is None:
            return None
        body, touch_due = hit
        self._rendered.move_to_end(hash_part)
        now = self._clock.seconds()
        if now >= touch_due:
            self._rendered[hash_part] = (body, now + TOUCH_INTERVAL.total_seconds())
            d = self._db.touch_narinfo(hash_part)
            d.addErrback(lambda f: log.failure("recording access", f))
        return body

    def on_event(self, kind: str, arg: str) -> None:
        """Another instance sharing the database changed it (``ncps.db.notify``).

        Stored narinfos never change today, but one another instance stores
        or replaces must not be answered from a stale memory copy here; after
        an outage of the notification channel nothing is known, so forget all.
        """
        if kind == "narinfo":
            self._rendered.pop(arg, None)
            self._missing.discard(arg)
        elif kind == "resync":
            self._rendered.clear()
            self._missing.clear()
            self._nar_files.clear()

    def render(self, record: NarInfoRecord) -> bytes:
        """The narinfo text we serve, signed with our key if signing is on."""
        ni = record.narinfo
        if self._signer is not None:
            ni = sign_narinfo(ni, self._signer)
        return ni.to_text().encode("utf-8")

    async def narinfo(self, hash_part: str) -> NarInfoRecord:
        """The narinfo for ``hash_part``.

        Raises :class:`NotFound`, or :class:`UpstreamsUnavailable` when no
        upstream could answer (see :meth:`_fetch_narinfo`).
        """
        record: NarInfoRecord | None = await self._db.get_narinfo(hash_part)
        if record is not None:
            self._touch(record)
            return record
        if hash_part in self._missing:
            raise NotFound(hash_part)
        return await self._narinfo_fetches.run(
            hash_part, lambda: self._fetch_narinfo(hash_part)
        )

    def _now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(
            self._clock.seconds(), datetime.UTC
        ).replace(tzinfo=None)

    def _touch(self, record: NarInfoRecord) -> None:
        last = record.last_accessed_at
        if last is not None and self._now() - last < TOUCH_INTERVAL:
            return
        d = self._db.touch_narinfo(record.narinfo.hash_part)
        d.addErrback(lambda f: log.failure("recording access", f))

    async def _fetch_narinfo(self, hash_part: str) -> NarInfoRecord:
        """Ask the upstreams that are not backing off, in order.

        Raises :class:`NotFound` when every upstream said it does not have
        the narinfo or sent one we must not serve (as Nix itself skips a
        narinfo without a trusted signature), and :class:`UpstreamsUnavailable`
        (503, which Nix retries) when one that might have it could not say:
        it errored, timed out or is backing off.  Nix remembers a 404 for an
        hour, so one is never made up for a passing failure.  An upstream that
        has kept failing until its backoff reached the cap counts as down, and
        a down upstream as absent (as Nix disables a failing substituter):
        otherwise every path no other upstream has would fail clients' builds.
        The pool records each upstream's health (``UpstreamPool._get``).
        """
        await self._upstreams.first_check()
        asked = self._upstreams.available()
        # Upstreams left out for a backoff that is not (yet) an outage, or
        # that gave no definitive answer.
        left_out = [u for u in self._upstreams.upstreams if u not in asked]
        skipped = sum(1 for u in left_out if not u.backoff.down)
        down = len(left_out) - skipped
        rejected = False
        for upstream in asked:
            try:
                text = await self._upstreams.fetch_narinfo(upstream, hash_part)
            except NotFound:
                continue
            except UpstreamError as e:
                # The pool has recorded the failure: a probe of a down
                # upstream that failed again leaves it down.
                if upstream.backoff.down:
                    down += 1
                else:
                    skipped += 1
                if isinstance(e, BackingOff):
                    # Another request is probing it right now: quietly (one
                    # warning per backoff window comes from the pool).
                    continue
                log.warn(
                    "upstream {url} failed for {hash}: {why}",
                    url=upstream.url,
                    hash=hash_part,
                    why=str(e),
                )
                continue
            try:
                record = self.ingest(upstream.url, hash_part, text)
            except Rejected as e:
                # A definitive "nothing we may serve", but not remembered:
                # keys and upstream contents change.
                rejected = True
                log.warn(
                    "rejected narinfo {hash} from {url}: {why}",
                    hash=hash_part,
                    url=upstream.url,
                    why=str(e),
                )
                continue
            stored: NarInfoRecord = await self._db.put_narinfo(record)
            self._missing.discard(hash_part)
            self._prefetch(stored)
            return stored
        if skipped > 0:
            raise UpstreamsUnavailable(
                f"no upstream has {hash_part} and {skipped} could not say "
                f"(failing or backing off)"
            )
        if down == 0 and not rejected:
            # Every upstream said so: remembered, as an outage or a rejected
            # narinfo may be different next time.
            self._missing.add(hash_part)
        raise NotFound(hash_part)

    def ingest(self, base_url: str, hash_part: str, text: bytes) -> NarInfoRecord:
        """Check an upstream narinfo and turn it into what we store.

        Raises :class:`Rejected` for anything we must not serve.
        """
        try:
            ni = narinfo_mod.parse(text)
            narinfo_mod.check_consistency(ni)
        except NarInfoError as e:
            raise Rejected(str(e)) from None
        if ni.hash_part != hash_part:
            raise Rejected(f"StorePath {ni.store_path} does not match {hash_part}")
        if not self._trusted.verify_narinfo(ni):
            raise Rejected("no signature by a trusted upstream key")
        if ni.compression not in VERIFIABLE_COMPRESSIONS:
            raise Rejected(f"Compression {ni.compression} cannot be verified")
        try:
            upstream_url = resolve_nar_url(base_url, ni.url)
        except UpstreamError as e:
            raise Rejected(str(e)) from None
        key = nar_key_for(ni)
        ours = attrs.evolve(ni, url=f"nar/{nar_file_name(key, ni.compression)}")
        return NarInfoRecord(narinfo=ours, nar_key=key, upstream_url=upstream_url)

    # -- NAR -----------------------------------------------------------------------

    async def nar(self, nar_key: str, compression: str) -> NarBody:
        """Open a NAR for sending.

        Raises NotFound, UpstreamError, IntegrityError, or Overloaded when
        no download slot came free in time.
        """
        download = self.nars.in_flight((nar_key, compression))
        if download is not None:
            return NarBody(download.open_reader(), download.expected_length, download)
        recorded = await self._recorded(nar_key, compression)
        if recorded is not None:
            body = await self._open_committed(recorded)
            if body is not None and body.size == recorded.file_size:
                return body
            if body is not None:
                # Changed behind our back (truncated on disk, overwritten in
                # the bucket): never serve it; fetch and verify it again.
                log.error(
                    "stored NAR {name} is {size} bytes, recorded {recorded}; "
                    "fetching it again",
                    name=stored_name(nar_key, recorded.compression),
                    size=body.size,
                    recorded=recorded.file_size,
                )
                self._release(body)
        record: NarInfoRecord | None = await self._db.find_nar_source(
            nar_key, compression
        )
        if record is None:
            raise NotFound(f"{nar_key}.nar ({compression})")
        download = await self.nars.fetch(record)
        if download.done:
            await download.when_done()
            recorded = await self._recorded(nar_key, compression)
            body = None if recorded is None else await self._open_committed(recorded)
            if body is None:
                raise NotFound(f"{nar_key}.nar ({compression})")
            return body
        return NarBody(download.open_reader(), download.expected_length, download)

    def stored_local_nar(self, nar_key: str, compression: str) -> NarBody | None:
        """:meth:`nar` at once, for a NAR known to be whole on local disk;
        None for anything else (ask :meth:`nar`)."""
        store = self._store
        if not isinstance(store, LocalStore):
            return None
        recorded = self._nar_files.get((nar_key, compression))
        if recorded is None or self.nars.in_flight((nar_key, compression)):
            return None
        fd = store.open_fd(nar_key, recorded.compression)
        if fd is None:
            return None
        size = os.fstat(fd).st_size
        if size != recorded.file_size:
            os.close(fd)
            return None  # nar() says why and fetches it again
        self._nar_files.move_to_end((nar_key, compression))
        encoded = recorded.compression == ZSTD_NONE
        return NarBody(
            fd,
            size,
            reader=self._store_io,
            encoding="zstd" if encoded else None,
            nar_size=recorded.nar_size if encoded else None,
        )

    async def nar_head(self, nar_key: str, compression: str) -> NarHead:
        """For HEAD: what the NAR is if stored or arriving (never downloads).

        The size is None when not known yet; raises :class:`NotFound`.
        """
        download = self.nars.in_flight((nar_key, compression))
        if download is not None:
            return NarHead(download.expected_length)
        recorded = await self._recorded(nar_key, compression)
        if recorded is None:
            raise NotFound(f"{nar_key}.nar ({compression})")
        if recorded.compression == ZSTD_NONE:
            return NarHead(recorded.file_size, "zstd", recorded.nar_size)
        return NarHead(recorded.file_size, ranges=True)

    async def _recorded(self, nar_key: str, compression: str) -> NarFile | None:
        """The nar_files row of the stored NAR clients get for ``compression``
        (in whichever form it is stored); None without a row."""
        key = (nar_key, compression)
        nar_file = self._nar_files.get(key)
        if nar_file is not None:
            self._nar_files.move_to_end(key)
            return nar_file
        found: NarFile | None = await self._db.find_nar_file(nar_key, compression)
        if found is None:
            return None
        self._remember_nar_file(found)
        return found

    def _remember_nar_file(self, nar_file: NarFile) -> None:
        """Keep a committed NAR's row (it exists now)."""
        key = (nar_file.nar_key, served_compression(nar_file.compression))
        self._nar_files[key] = nar_file
        self._nar_files.move_to_end(key)
        if len(self._nar_files) > KNOWN_NAR_FILES:
            self._nar_files.popitem(last=False)

    async def _open_committed(self, recorded: NarFile) -> NarBody | None:
        store = self._store
        key, form = recorded.nar_key, recorded.compression
        encoded = form == ZSTD_NONE
        encoding = "zstd" if encoded else None
        nar_size = recorded.nar_size if encoded else None
        if isinstance(store, LocalStore):
            # Opening a local file is as quick as the pool round trip would
            # be; twisted.web.static opens files on the reactor thread too.
            fd = store.open_fd(key, form)
            if fd is not None:
                return NarBody(
                    fd,
                    os.fstat(fd).st_size,
                    reader=self._store_io,
                    encoding=encoding,
                    nar_size=nar_size,
                )
        else:
            stored = await self._store_io.run(store.open_thd, key, form)
            if stored is not None:
                return NarBody(
                    None,
                    stored.size,
                    stored=stored,
                    reader=self._store_io,
                    encoding=encoding,
                    nar_size=nar_size,
                )
        log.warn(
            "NAR {name} is recorded but missing from the {kind} store; fetching "
            "it again",
            name=stored_name(key, form),
            kind=store.kind,
        )
        return None

    def _release(self, body: NarBody) -> None:
        """Close a body that will not be sent."""
        if body.stored is not None and body.reader is not None:
            body.reader.run(body.stored.close_thd).addErrback(
                lambda f: log.warn(
                    "closing a stored NAR: {why}", why=f.getErrorMessage()
                )
            )
        elif body.fd is not None:
            os.close(body.fd)

    def _prefetch(self, record: NarInfoRecord) -> None:
        """Start fetching a new narinfo's NAR; never fails.

        A NAR known to be stored is left alone; any other goes to the
        fetcher, which asks the database once a slot is granted (the NAR of
        a new narinfo is almost never stored: one round trip per path, not
        two).
        """
        if (record.nar_key, record.narinfo.compression) in self._nar_files:
            return
        try:
            self.nars.prefetch(record)
        except Exception:
            log.failure("prefetch of {url}", url=record.narinfo.url)

    async def other_sources(self, record: NarInfoRecord) -> AsyncIterator[str]:
        """NAR URLs on the other upstreams for ``record``'s NAR, for failover.

        An upstream qualifies only when its narinfo for the same store path
        passes every ingest check (signature, store path, URL) and names the
        very object we store: same NarHash, NarSize, compression and file
        key (FileHash, else NarHash).  The bytes are then still checked
        against our stored narinfo, whoever serves them.
        """
        ni = record.narinfo
        primary = self._upstreams.upstream_for(record.upstream_url)
        for upstream in self._upstreams.available():
            if upstream.url == primary.url:
                continue
            try:
                text = await self._upstreams.fetch_narinfo(upstream, ni.hash_part)
                other = self.ingest(upstream.url, ni.hash_part, text)
            except (NotFound, UpstreamError, Rejected):
                continue
            theirs = other.narinfo
            if (
                other.nar_key != record.nar_key
                or theirs.compression != ni.compression
                or theirs.nar_hash != ni.nar_hash
                or theirs.nar_size != ni.nar_size
            ):
                log.info(
                    "{url} has {path} as another file; not failing over to it",
                    url=upstream.url,
                    path=ni.store_path,
                )
                continue
            yield other.upstream_url
