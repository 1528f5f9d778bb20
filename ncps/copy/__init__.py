"""``ncps copy``: copy a whole cache from one backend to another.

Any pair of backends: local disk or S3 for the NARs, SQLite, PostgreSQL or
MySQL for the metadata.  The order keeps the target consistent at every
moment, so an interrupted run is simply run again:

1. ``config`` rows (the signing key): a key the target holds with another
   value stops the copy before anything is written; absent ones are copied.
2. NAR objects that have a ``nar_files`` row in the source and none in the
   target: streamed into a target temp file, checked (size, and sha256 where
   the key is the file's hash), fsynced and committed; only then is the row
   written.  A bad or missing object is reported, and the copy goes on.
3. ``narinfos`` rows the target lacks (first writer wins, as in the daemon).

Rows keep every column but ``id`` (the target numbers its own rows), so the
timestamps travel with them.  When both sides share the same storage (SQLite
to PostgreSQL in place) objects are not transferred, only checked by size.

This is a command, not the daemon: there is no reactor.  NARs are copied on a
:class:`~concurrent.futures.ThreadPoolExecutor` the command owns; every
``*_thd`` store method and every transaction runs on its threads or on the
main thread.  Environment variables are not read: with two sides they would
be ambiguous.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TextIO

import attrs
from twisted.python import usage

from ncps.copy.nars import NarCopier, Tally, copy_nars
from ncps.copy.options import (
    BACKEND_SETTINGS,
    DEFAULT_JOBS,
    FILE_ONLY_SETTINGS,
    MAX_JOBS,
    SIDE_PARAMETERS,
    SIDES,
    CopyOptions,
    check_distinct,
    side_message,
)
from ncps.copy.progress import Progress, human_bytes
from ncps.copy.sides import (
    BATCH_ROWS,
    CopyError,
    Side,
    _conflict_message,
    config_rows_thd,
    copy_config_thd,
    existing_hashes_thd,
    insert_rows_thd,
    iter_batches,
    keys_with_file_hash_thd,
    missing_in_target,
    open_source,
    open_target,
    rows_after_thd,
)
from ncps.db.schema import nar_files, narinfos
from ncps.errors import ConfigError, StartupError

__all__ = [
    "BACKEND_SETTINGS",
    "BATCH_ROWS",
    "DEFAULT_JOBS",
    "EXIT_CONFIG",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "FILE_ONLY_SETTINGS",
    "MAX_JOBS",
    "SIDES",
    "SIDE_PARAMETERS",
    "CopyError",
    "CopyOptions",
    "NarCopier",
    "Progress",
    "RowTally",
    "Side",
    "Survey",
    "Tally",
    "check_distinct",
    "config_rows_thd",
    "copy_cache",
    "copy_config_thd",
    "copy_narinfos",
    "copy_nars",
    "existing_hashes_thd",
    "human_bytes",
    "insert_rows_thd",
    "iter_batches",
    "keys_with_file_hash_thd",
    "missing_in_target",
    "open_source",
    "open_target",
    "rows_after_thd",
    "run",
    "side_message",
    "survey",
]

EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_CONFIG = 0, 1, 130, 78


# -- survey (the dry run, and the totals for the progress bar) -------------------------


@attrs.define
class Survey:
    nars_missing: int = 0
    nar_bytes_missing: int = 0
    nars_present: int = 0
    nar_bytes_present: int = 0
    narinfos_missing: int = 0
    narinfos_present: int = 0
    config_missing: list[str] = attrs.Factory(list)
    config_present: int = 0


def survey(source: Side, target: Side) -> Survey:
    """What the target lacks.  Raises CopyError on a config conflict."""
    result = Survey()
    source_config = source.call(config_rows_thd)
    target_config = target.call(config_rows_thd) if target.db is not None else {}
    for key, row in sorted(source_config.items()):
        if key not in target_config:
            result.config_missing.append(key)
        elif target_config[key]["value"] != row["value"]:
            raise CopyError(_conflict_message(key))
        else:
            result.config_present += 1
    for rows in iter_batches(source, nar_files, full=False):
        missing = missing_in_target(target, nar_files, rows)
        result.nars_missing += len(missing)
        result.nar_bytes_missing += sum(int(r["file_size"]) for r in missing)
        result.nars_present += len(rows) - len(missing)
        result.nar_bytes_present += sum(int(r["file_size"]) for r in rows)
    result.nar_bytes_present -= result.nar_bytes_missing
    for rows in iter_batches(source, narinfos, full=False):
        missing = missing_in_target(target, narinfos, rows)
        result.narinfos_missing += len(missing)
        result.narinfos_present += len(rows) - len(missing)
    return result


# -- the command -----------------------------------------------------------------------


@attrs.define
class RowTally:
    copied: int = 0
    skipped: int = 0


def copy_narinfos(source: Side, target: Side) -> RowTally:
    tally = RowTally()
    for rows in iter_batches(source, narinfos, full=True):
        missing = missing_in_target(target, narinfos, rows)
        inserted = target.call(insert_rows_thd, narinfos, missing) if missing else 0
        tally.copied += inserted
        tally.skipped += len(rows) - inserted
    return tally


def _write_dry_run(out: TextIO, s: Survey) -> None:
    missing_config = f" ({', '.join(s.config_missing)})" if s.config_missing else ""
    out.write(
        "dry run: nothing was written to the target\n"
        f"NARs:      would copy {s.nars_missing} "
        f"({human_bytes(s.nar_bytes_missing)}), already in target "
        f"{s.nars_present} ({human_bytes(s.nar_bytes_present)})\n"
        f"narinfos:  would copy {s.narinfos_missing}, already in target "
        f"{s.narinfos_present}\n"
        f"config:    would copy {len(s.config_missing)}{missing_config}, already "
        f"in target {s.config_present}\n"
    )


def _write_summary(
    out: TextIO, nars: Tally, infos: RowTally, config_copied: int, config_kept: int
) -> None:
    out.write(
        f"NARs:      copied {nars.copied} ({human_bytes(nars.copied_bytes)}), "
        f"skipped {nars.skipped} ({human_bytes(nars.skipped_bytes)}), "
        f"failed {nars.failed} ({human_bytes(nars.failed_bytes)})\n"
        f"narinfos:  copied {infos.copied}, skipped {infos.skipped}, failed 0\n"
        f"config:    copied {config_copied}, skipped {config_kept}, failed 0\n"
    )
    if nars.size_only:
        out.write(
            f"note: {nars.size_only} NAR(s) checked by size only (their key is "
            "not the sha256 of the file)\n"
        )


def copy_cache(
    source: Side,
    target: Side,
    *,
    jobs: int,
    dry_run: bool,
    show_progress: bool,
    shared_storage: bool,
    out: TextIO,
    err: TextIO,
) -> int:
    """Copy (or, dry, survey) ``source`` into ``target``; return the exit status."""
    plan = survey(source, target)
    if dry_run:
        _write_dry_run(out, plan)
        return EXIT_OK
    if shared_storage:
        err.write(
            "ncps copy: both sides use the same storage: objects are checked, "
            "not copied\n"
        )
    source_config = source.call(config_rows_thd)
    config_rows = [source_config[k] for k in plan.config_missing]
    config_copied = target.call(copy_config_thd, config_rows)
    progress = Progress(
        err if show_progress else None,
        total_nars=plan.nars_missing,
        total_bytes=plan.nar_bytes_missing,
        tty=show_progress and err.isatty(),
    )
    complete = False
    try:
        nars = copy_nars(
            source,
            target,
            jobs=jobs,
            progress=progress,
            shared_storage=shared_storage,
        )
        complete = True
    finally:
        progress.close(complete=complete)
    infos = copy_narinfos(source, target)
    for problem in nars.problems:
        err.write(f"ncps copy: failed: {problem}\n")
    config_kept = len(source_config) - config_copied
    _write_summary(out, nars, infos, config_copied, config_kept)
    return EXIT_FAILED if nars.failed else EXIT_OK


def run(argv: Sequence[str]) -> int:
    """``ncps copy [flags]``; returns the exit status (see the module docstring)."""
    out, err = sys.stdout, sys.stderr
    options = CopyOptions()
    try:
        options.parseOptions(list(argv))
    except usage.UsageError as e:
        err.write(f"ncps copy: {e}\n{options}")
        return 2
    sides: list[Side] = []
    try:
        try:
            jobs = options.jobs()
            source_backend = options.backend("from")
            target_backend = options.backend("to")
            shared = check_distinct(source_backend, target_backend)
            pool_size = jobs + 2
            source_backend, target_backend = (
                attrs.evolve(
                    b,
                    pool_max_open=max(b.pool_max_open, pool_size),
                    pool_max_idle=max(b.pool_max_idle, min(pool_size, 5)),
                )
                for b in (source_backend, target_backend)
            )
            sides.append(open_source(source_backend))
            sides.append(
                open_target(
                    target_backend, dry_run=options["dry-run"], shared_storage=shared
                )
            )
        except (ConfigError, StartupError) as e:
            err.write(f"ncps copy: {e}\n")
            return EXIT_CONFIG
        return copy_cache(
            sides[0],
            sides[1],
            jobs=jobs,
            dry_run=bool(options["dry-run"]),
            show_progress=not options["no-progress"],
            shared_storage=shared,
            out=out,
            err=err,
        )
    except CopyError as e:
        err.write(f"ncps copy: {e}\n")
        return EXIT_FAILED
    except KeyboardInterrupt:
        err.write("ncps copy: interrupted; run it again to resume\n")
        return EXIT_INTERRUPTED
    finally:
        for side in sides:
            side.close()
