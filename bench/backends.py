"""The Backends figures: S3 vs local storage, and narinfo lookups per database.

``s3_nar_throughput``: one NAR of the fixture served warm (committed) by an ncps with
S3 storage (moto, path-style) and by an ncps with local storage, curl, 1 and 4
connections; plus moto's own GET throughput of the same object through boto3, the
ceiling any S3-backed server has on this machine.

``db_narinfo_rps``: ncps on SQLite, PostgreSQL and MariaDB (local storage each), with
the same ``--db-narinfos`` signed narinfo rows written straight into each database.
"hot": wrk on one narinfo, answered from ncps's memory of rendered narinfos.
"database-bound": wrk cycling through all the rows in order, more of them than that
memory holds (``ncps.cache.RENDERED_NARINFOS``), so every request is a database read
plus a render; the cursor carries on across runs, so no run starts on rows still in
memory.  The rows' last access time lies ahead, so no access-time UPDATE is written:
these are read-only figures.

The servers (moto, PostgreSQL, MariaDB) come from ``tests/servers.py``; each section
stops its daemons and destroys its servers when it ends, failed or not.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import sqlite3
import sys
import threading
import time
from pathlib import Path

import measure
from measure import MB, median
from procs import REPO, BenchError, KleinBaseline, Ncps, http_get

if str(REPO) not in sys.path:  # ncps and tests.servers, imported where used
    sys.path.insert(0, str(REPO))

DB_KINDS = ("sqlite", "postgresql", "mariadb")
S3_CHUNK = 1 << 20  # what ncps reads an S3 object body by (ncps.streaming)


def _servers():
    import tests.servers

    return tests.servers


def start_ncps(
    bench, stack: contextlib.ExitStack, tag: str, storage_args: list[str] | None
) -> Ncps:
    """A fresh daemon (its own dir under the run dir), stopped when ``stack`` ends."""
    from nixenv import remove_tree

    workdir = bench.runs / f"ncps-{tag}"
    remove_tree(workdir)
    daemon = Ncps(
        workdir,
        bench.upstream.url,
        bench.fx["pubkey"],
        bench.args.ncps_arg,
        None,
        storage_args,
    )
    stack.enter_context(daemon)
    daemon.start()
    return daemon


def wait_committed(db_file: Path, file_size: int, timeout: float = 120.0) -> None:
    """Until the daemon's SQLite database has a ``nar_files`` row of that size:
    the row is written once the object is whole in storage."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if db_file.exists():
            with contextlib.closing(
                sqlite3.connect(f"file:{db_file}?mode=ro", uri=True, timeout=5)
            ) as conn:
                try:
                    row = conn.execute(
                        "SELECT count(*) FROM nar_files WHERE file_size = ?",
                        (file_size,),
                    ).fetchone()
                except sqlite3.OperationalError:  # not migrated yet
                    row = (0,)
            if row[0]:
                return
        time.sleep(0.25)
    raise BenchError(f"no committed NAR of {file_size} bytes in {db_file}")


def pull_nar(daemon: Ncps, entry: dict, db_file: Path) -> str:
    """Fetch ``entry``'s narinfo and NAR through ``daemon`` until committed; URL."""
    from run import narinfo_url

    status, body = http_get(f"{daemon.url}/{entry['hash']}.narinfo")
    if status != 200:
        raise BenchError(f"ncps GET /{entry['hash']}.narinfo -> {status}")
    url = f"{daemon.url}/{narinfo_url(body)}"
    measure.single_stream_mbps(url, entry["FileSize"])
    wait_committed(db_file, entry["FileSize"])
    return url


def moto_get_mbps(client, bucket: str, key: str, size: int, connections: int) -> float:
    """GET the object with boto3 on ``connections`` threads, reading 1 MiB chunks
    like ncps; aggregate MB/s."""
    errors: list[str] = []

    def get() -> None:
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        got = 0
        while chunk := body.read(S3_CHUNK):
            got += len(chunk)
        body.close()
        if got != size:
            errors.append(f"{got} bytes of {size}")

    threads = [threading.Thread(target=get) for _ in range(connections)]
    t = time.monotonic()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elapsed = time.monotonic() - t
    if errors:
        raise BenchError(f"moto GET {key}: {errors[0]}")
    return size * connections / elapsed / MB


def s3_nar_throughput(bench) -> dict:
    servers = _servers()
    # The biggest NAR of the closure (the 96 MB blob): big enough to stream for a
    # while, small enough for moto to hold in memory and upload quickly.
    entry = max(bench.fx["closure"], key=lambda p: p["FileSize"])
    size = entry["FileSize"]
    rounds = max(bench.args.rounds, 5)
    with contextlib.ExitStack() as stack:
        s3 = servers.S3Server.create(bench.runs / "servers")
        stack.callback(s3.destroy)
        bucket = s3.new_bucket()
        s3_daemon = start_ncps(
            bench,
            stack,
            "s3",
            [
                f"--cache-storage-s3-bucket={bucket}",
                f"--cache-storage-s3-endpoint={s3.endpoint}",
                f"--cache-storage-s3-region={s3.region}",
                f"--cache-storage-s3-access-key-id={s3.access_key_id}",
                f"--cache-storage-s3-secret-access-key={s3.secret_access_key}",
                "--cache-storage-s3-force-path-style=true",
                "--cache-temp-path={workdir}/tmp",
                "--cache-database-url=sqlite:{workdir}/db/ncps.sqlite3",
            ],
        )
        local_daemon = start_ncps(bench, stack, "local", None)
        urls = {
            "s3": pull_nar(s3_daemon, entry, s3_daemon.workdir / "db/ncps.sqlite3"),
            "local": pull_nar(
                local_daemon, entry, local_daemon.storage / "db/ncps.sqlite3"
            ),
        }
        client = s3.client()
        objects = client.list_objects_v2(Bucket=bucket).get("Contents", [])
        keys = [o["Key"] for o in objects if o["Size"] == size]
        if not keys:
            raise BenchError(f"no object of {size} bytes in bucket {bucket}")
        key = keys[0]

        def fetch(name: str, connections: int) -> float:
            if name == "moto":
                return moto_get_mbps(client, bucket, key, size, connections)
            if connections == 1:
                return measure.single_stream_mbps(urls[name], size)
            return measure.parallel_mbps(urls[name], size, connections)

        names = ["s3", "local", "moto"]
        for name in names:  # warm-up: page cache, connections, moto's first GET
            fetch(name, 1)
        single: dict[str, list[float]] = {n: [] for n in names}
        par: dict[str, list[float]] = {n: [] for n in names}
        for r in range(rounds):
            for name in names[r % 3 :] + names[: r % 3]:
                single[name].append(fetch(name, 1))
        for r in range(max(3, rounds // 2)):
            for name in names[r % 3 :] + names[: r % 3]:
                par[name].append(fetch(name, 4))
    res: dict = {
        "store_path": entry["path"],
        "bytes": size,
        "compression": entry["Compression"],
        "object_key": key,
        "rounds": rounds,
        "s3": "moto server (tests/servers.py), path-style, ncps with SQLite",
        "baseline": "ncps with local storage (SQLite), same NAR",
        "moto_raw": "boto3 get_object of the same object, 1 MiB reads (1 or 4 threads)",
    }
    for name in names:
        res[f"{name}_MBps"] = [round(x, 1) for x in single[name]]
        res[f"{name}_median_MBps"] = round(median(single[name]), 1)
        res[f"{name}_c4_MBps"] = [round(x, 1) for x in par[name]]
        res[f"{name}_c4_median_MBps"] = round(median(par[name]), 1)
    res["ratio"] = round(median(single["s3"]) / median(single["local"]), 3)
    res["ratio_c4"] = round(median(par["s3"]) / median(par["local"]), 3)
    res["ratio_meaning"] = "ncps-S3 / ncps-local MB/s"
    res["s3_vs_moto_raw"] = round(median(single["s3"]) / median(single["moto"]), 3)
    res["s3_vs_moto_raw_c4"] = round(median(par["s3"]) / median(par["moto"]), 3)
    return res


# -- narinfos per database ---------------------------------------------------------


def make_records(count: int, secret_key_file: Path, upstream_url: str) -> list:
    """``count`` distinct narinfo records, signed by the fixture's upstream key
    (the one every daemon trusts), shaped like the fixture's (~600 bytes)."""
    import attrs

    from ncps.cache import nar_key_for
    from ncps.db.queries import NarInfoRecord
    from ncps.narinfo import NarInfo
    from ncps.nix32 import encode
    from ncps.nixhash import NixHash
    from ncps.signing import SecretKey, sign_narinfo
    from ncps.testing import store_path

    key = SecretKey.parse(secret_key_file.read_text().strip())
    paths = [store_path(f"bench-db-{i}", b"ncps-bench-db") for i in range(count)]
    records = []
    for i, path in enumerate(paths):
        nar_hash = NixHash("sha256", hashlib.sha256(path.encode()).digest())
        ni = NarInfo(
            store_path=path,
            url="",
            compression="zstd",
            nar_hash=nar_hash,
            nar_size=100_000 + i,
            file_hash=NixHash("sha256", hashlib.sha256(nar_hash.digest).digest()),
            file_size=50_000 + i,
            references=tuple(
                sorted(p.rsplit("/", 1)[1] for p in {paths[i], paths[i - 1]})
            ),
            deriver=f"{path.rsplit('/', 1)[1][:32]}-bench-db-{i}.drv",
            system="x86_64-linux",
        )
        nar_key = nar_key_for(ni)
        ni = sign_narinfo(attrs.evolve(ni, url=f"nar/{nar_key}.nar.zst"), key)
        upstream_nar = f"{upstream_url}/nar/{encode(ni.file_hash.digest)}.nar.zst"
        records.append(
            NarInfoRecord(narinfo=ni, nar_key=nar_key, upstream_url=upstream_nar)
        )
    return records


def narinfo_row(record, now: datetime.datetime, accessed: datetime.datetime) -> dict:
    """The ``narinfos`` row ``ncps.db.queries.put_narinfo_thd`` writes for it."""
    from ncps.db.queries import narinfo_values

    return narinfo_values(record, now, accessed)


def populate(database_url: str, records: list) -> float:
    """Bulk-insert ``records`` into the (migrated) database; seconds taken.

    Checks one row reads back as the record (``get_narinfo_thd``)."""
    from sqlalchemy import func, insert, select

    from ncps.db.engine import open_engine
    from ncps.db.queries import get_narinfo_thd
    from ncps.db.schema import narinfos

    now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    ahead = now + datetime.timedelta(days=1)  # never due for an access-time UPDATE
    rows = [narinfo_row(r, now, ahead) for r in records]
    engine = open_engine(database_url)
    t = time.monotonic()
    try:
        with engine.begin() as conn:
            for i in range(0, len(rows), 2000):
                conn.execute(insert(narinfos), rows[i : i + 2000])
        with engine.connect() as conn:
            stored = get_narinfo_thd(conn, records[-1].narinfo.hash_part)
            count = conn.execute(select(func.count()).select_from(narinfos)).scalar()
    finally:
        engine.dispose()
    if stored is None or stored.narinfo != records[-1].narinfo:
        raise BenchError(f"{database_url}: a stored narinfo does not read back")
    if count < len(records):
        raise BenchError(f"{database_url}: {count} narinfo rows, not {len(records)}")
    return time.monotonic() - t


LUA_CYCLE = """\
-- bench/backends.py: GET /<hash>.narinfo for each line of {hashes}, in order,
-- starting after line {offset}, wrapping around.
local names = {{}}
for line in io.lines("{hashes}") do names[#names + 1] = "/" .. line .. ".narinfo" end
local i = {offset}
request = function()
  i = i + 1
  if i > #names then i = 1 end
  return wrk.format("GET", names[i])
end
"""


class Cycler:
    """wrk runs cycling through the hashes; each run goes on where the last ended."""

    def __init__(self, workdir: Path, hashes_file: Path, count: int) -> None:
        self.workdir = workdir
        self.hashes_file = hashes_file
        self.count = count
        self.offset = 0
        self.runs = 0

    def run(self, url: str, seconds: int) -> dict:
        self.runs += 1
        script = self.workdir / f"cycle-{self.runs}.lua"
        script.write_text(
            LUA_CYCLE.format(hashes=self.hashes_file, offset=self.offset % self.count)
        )
        result = measure.wrk_rps(url, seconds, script=script)
        self.offset += result["requests"]
        return result


def db_narinfo_rps(bench) -> dict:
    from ncps.cache import RENDERED_NARINFOS

    servers = _servers()
    count = bench.args.db_narinfos
    if count <= RENDERED_NARINFOS * 1.25:
        raise BenchError(
            f"--db-narinfos {count}: must exceed 1.25 x the {RENDERED_NARINFOS} "
            "narinfos ncps keeps in memory, or lookups are not database-bound"
        )
    workdir = bench.runs / "db-narinfo"
    workdir.mkdir(parents=True, exist_ok=True)
    t = time.monotonic()
    records = make_records(
        count + 1, Path(bench.fx["dir"]) / "keys/upstream.sk", bench.upstream.url
    )
    hot_hash = records[-1].narinfo.hash_part  # outside the cycle
    hashes_file = workdir / "hashes"
    hashes_file.write_text("".join(r.narinfo.hash_part + "\n" for r in records[:-1]))
    res: dict = {
        "narinfos": count,
        "memory_cache_entries": RENDERED_NARINFOS,
        "records_s": round(time.monotonic() - t, 1),
        "tool": f"wrk -t1 -c4 -d{bench.args.wrk_seconds}s",
        "rounds": bench.args.wrk_rounds,
        "hot": "one narinfo, answered from ncps's memory",
        "db": f"{count} narinfos in order (Lua script), every one a database read",
        "baseline": "ncps on SQLite (default database, local storage); bare Klein",
        "populate_s": {},
    }
    duration = bench.args.wrk_seconds
    with contextlib.ExitStack() as stack:
        urls: dict[str, str] = {}
        for kind in DB_KINDS:
            if kind == "sqlite":
                daemon = start_ncps(bench, stack, "db-sqlite", None)
                db_url = f"sqlite:{daemon.storage}/db/ncps.sqlite3"
            else:
                cls = (
                    servers.PostgresServer
                    if kind == "postgresql"
                    else servers.MariaDBServer
                )
                server = cls.create(bench.runs / "servers")
                stack.callback(server.destroy)
                db_url = server.new_database()
                daemon = start_ncps(
                    bench,
                    stack,
                    f"db-{kind}",
                    [
                        "--cache-storage-local={workdir}/storage",
                        f"--cache-database-url={db_url}",
                    ],
                )
            res["populate_s"][kind] = round(populate(db_url, records), 2)
            status, body = http_get(f"{daemon.url}/{hot_hash}.narinfo")
            if status != 200 or records[-1].narinfo.store_path.encode() not in body:
                raise BenchError(f"{kind}: GET /{hot_hash}.narinfo -> {status}")
            urls[kind] = daemon.url
        narinfo_file = workdir / "klein-narinfo"
        narinfo_file.write_bytes(body)
        klein = KleinBaseline(workdir / "klein", f"/{hot_hash}.narinfo", narinfo_file)
        stack.enter_context(klein)
        klein.start()
        urls = {"klein": klein.url} | urls
        names = list(urls)
        cyclers = {n: Cycler(workdir, hashes_file, count) for n in names}
        for n in names:  # warm-up: connections, query plans, database caches
            measure.wrk_rps(f"{urls[n]}/{hot_hash}.narinfo", 1)
            cyclers[n].run(urls[n], 2)
        hot: dict[str, list[dict]] = {n: [] for n in names}
        db: dict[str, list[dict]] = {n: [] for n in names}
        for r in range(bench.args.wrk_rounds):
            for n in names[r % len(names) :] + names[: r % len(names)]:
                hot[n].append(
                    measure.wrk_rps(f"{urls[n]}/{hot_hash}.narinfo", duration)
                )
                db[n].append(cyclers[n].run(urls[n], duration))
    for n in names:
        for label, runs in (("hot", hot[n]), ("db", db[n])):
            res[f"{n}_{label}_rps"] = [round(x["rps"]) for x in runs]
            res[f"{n}_{label}_median_rps"] = round(median([x["rps"] for x in runs]))
            res[f"{n}_{label}_latency_p50_p99"] = [(x["p50"], x["p99"]) for x in runs]
            errs = [x["socket_errors"] for x in runs if x["socket_errors"]]
            if errs:
                res[f"{n}_{label}_socket_errors"] = errs
        res[f"{n}_db_requests_total"] = cyclers[n].offset
    for kind in DB_KINDS:
        for label in ("hot", "db"):
            ours = res[f"{kind}_{label}_median_rps"]
            res[f"{kind}_{label}_vs_sqlite"] = round(
                ours / res[f"sqlite_{label}_median_rps"], 3
            )
            res[f"{kind}_{label}_vs_klein"] = round(
                ours / res[f"klein_{label}_median_rps"], 3
            )
    return res
