"""Pure parts of ``ncps copy``: progress lines, flag names in messages, sameness."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from ncps.config import build_backend
from ncps.copy import CopyOptions, Progress, check_distinct, human_bytes, side_message
from ncps.errors import ConfigError

MIB = 1024 * 1024


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_plain_progress_writes_a_line_at_most_every_interval_and_one_at_the_end() -> (
    None
):
    out, clock = io.StringIO(), FakeClock()
    progress = Progress(
        out, total_nars=4, total_bytes=8 * MIB, tty=False, clock=clock, interval=5
    )
    assert out.getvalue() == ""
    clock.now += 1
    progress.add_bytes(2 * MIB)
    progress.nar_done(2 * MIB, 2 * MIB)
    assert out.getvalue() == ""
    clock.now += 4
    progress.add_bytes(2 * MIB)
    assert out.getvalue() == "ncps copy:  50%  1/4 NARs  4.0/8.0 MiB  819.2 KiB/s\n"
    clock.now += 1
    progress.nar_done(2 * MIB, 2 * MIB)
    progress.nar_done(2 * MIB, 0)  # failed before any byte: still counted
    progress.nar_done(2 * MIB, 0)
    progress.close(complete=True)
    last = out.getvalue().splitlines()[-1]
    assert last == "ncps copy: 100%  4/4 NARs  8.0/8.0 MiB  682.7 KiB/s"


def test_terminal_progress_redraws_one_line() -> None:
    out, clock = io.StringIO(), FakeClock()
    progress = Progress(out, total_nars=2, total_bytes=0, tty=True, clock=clock)
    clock.now += 1
    progress.nar_done(0, 0)
    progress.close(complete=True)
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")
    frames = [
        f.removesuffix("\x1b[K\n").removesuffix("\x1b[K") for f in text.split("\r")
    ]
    assert frames[1] == "[....................]   0%  0/2 NARs  0/0 B  0 B/s"
    assert frames[2] == "[##########..........]  50%  1/2 NARs  0/0 B  0 B/s"
    assert frames[-1] == "[####################] 100%  1/1 NARs  0/0 B  0 B/s"


def test_interrupted_progress_does_not_claim_completion() -> None:
    out = io.StringIO()
    progress = Progress(out, total_nars=3, total_bytes=3, tty=False, interval=999)
    progress.add_bytes(1)
    progress.close(complete=False)
    assert out.getvalue().startswith("ncps copy:  33%  0/3 NARs")


def test_human_bytes() -> None:
    assert human_bytes(0) == "0 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(3.5 * 1024**3) == "3.5 GiB"
    assert human_bytes(2 * 1024**4) == "2.0 TiB"


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            "--to-cache-storage-local: required, or --to-cache-storage-s3-bucket "
            "for S3 (or set CACHE_STORAGE_LOCAL or CACHE_STORAGE_S3_BUCKET)",
            "--to-storage-local: required, or --to-storage-s3-bucket for S3",
        ),
        (
            "--to-cache-temp-path: /x is not writable: Permission denied",
            "--to-temp-path: /x is not writable: Permission denied",
        ),
        ("--config: cannot read f: gone", "--to-config: cannot read f: gone"),
        (
            "--cache-storage-local (config key cache.storage.local): expected a "
            "single value, got list",
            "--to-storage-local (config key cache.storage.local): expected a "
            "single value, got list",
        ),
    ],
)
def test_side_message_names_the_copy_flags(message: str, expected: str) -> None:
    assert side_message(message, "to") == expected


def test_options_map_flags_onto_settings(tmp_path: Path) -> None:
    options = CopyOptions()
    options.parseOptions(
        [
            "--from-storage-s3-bucket=b",
            "--from-storage-s3-endpoint=http://127.0.0.1:9000/",
            "--from-storage-s3-access-key-id=k",
            "--from-storage-s3-secret-access-key=s",
            "--from-storage-s3-force-path-style",
            "--from-database-url=postgresql://u@db/ncps",
            f"--to-storage-local={tmp_path}",
        ]
    )
    source = options.backend("from")
    assert source.storage_s3 is not None
    assert source.storage_s3.endpoint == "http://127.0.0.1:9000"
    assert source.storage_s3.force_path_style
    assert source.database_url == "postgresql://u@db/ncps"
    target = options.backend("to")
    assert target.database_url == f"sqlite:{tmp_path}/db/ncps.sqlite3"
    assert options.jobs() == 4


def test_same_database_or_same_everything_is_refused(tmp_path: Path) -> None:
    a = build_backend({"cache-storage-local": str(tmp_path / "a")})
    b = build_backend({"cache-storage-local": str(tmp_path / "b")})
    a_in_pg = build_backend(
        {
            "cache-storage-local": str(tmp_path / "a"),
            "cache-database-url": "postgresql://u@db:5432/ncps",
        }
    )
    b_in_pg = build_backend(
        {
            "cache-storage-local": str(tmp_path / "b"),
            "cache-database-url": "postgres://other@db/ncps",
        }
    )
    assert check_distinct(a, b) is False
    assert check_distinct(a, a_in_pg) is True  # same storage: checked, not copied
    with pytest.raises(ConfigError, match=r"^--to-storage-local: the target is the"):
        check_distinct(a, a)
    with pytest.raises(ConfigError, match=r"^--to-database-url: "):
        check_distinct(a_in_pg, b_in_pg)
