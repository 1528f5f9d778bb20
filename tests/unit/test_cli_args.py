"""The command line, as the Go ncps's users type it.

Global flags before the command, ``s`` for ``serve``, ``--version``,
``migrate up``/``down``, bare booleans, comma lists, deprecated aliases and
Go settings not supported yet, for ``ncps serve`` (``ncps.tap.Options``),
``ncps migrate`` and ``ncps copy``.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from twisted.logger import LogEvent, Logger
from twisted.python import usage

from ncps import cli
from ncps.config import Config
from ncps.copy.options import CopyOptions
from ncps.db import engine as db_engine
from ncps.errors import ConfigError
from ncps.logs import event_as_json_line
from ncps.settings import (
    ALIASES,
    GLOBAL_FLAGS,
    SETTINGS,
    UNSUPPORTED,
    UNSUPPORTED_GLOBAL_FLAGS,
)
from ncps.tap import Options
from ncps.testing import TEST_CACHE_KEY, TEST_UPSTREAM_KEY

KEY_A = TEST_UPSTREAM_KEY.public_key().to_text()
KEY_B = TEST_CACHE_KEY.public_key().to_text()


@pytest.fixture(autouse=True)
def clean_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No ncps variable from the caller's environment, and no config file."""
    names = (
        [s.env for s in SETTINGS]
        + [a.env for a in ALIASES]
        + [u.env for u in UNSUPPORTED if u.env]
        + ["NCPS_CONFIG_FILE"]
    )
    for name in names:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))


def local_flags(tmp_path: Path) -> list[str]:
    return [
        "--cache-hostname=cache.example.org",
        f"--cache-storage-local={tmp_path / 'storage'}",
        "--cache-upstream-url=https://cache.nixos.org",
        f"--cache-upstream-public-key={KEY_A}",
    ]


def serve_config(argv: Sequence[str]) -> tuple[Config, tuple[str, ...]]:
    """What ``ncps serve <argv>`` would run with, and its warning lines."""
    options = Options()
    options.parseOptions(list(argv))
    assert options.config is not None
    return options.config, options.warnings


def write_yaml(path: Path, data: object) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


# -- global flags before the command -----------------------------------------------


@pytest.mark.parametrize(
    ("argv", "flags", "command", "rest"),
    [
        (
            ["--config=c.yaml", "serve", "--server-addr=:1"],
            ["--config=c.yaml"],
            "serve",
            ["--server-addr=:1"],
        ),
        (
            ["--config", "c.yaml", "--log-level", "debug", "--log-format=json", "s"],
            ["--config=c.yaml", "--log-level=debug", "--log-format=json"],
            "s",
            [],
        ),
        # The command's own arguments are left alone, whatever they look like.
        (
            ["migrate", "--log-level", "up"],
            [],
            "migrate",
            ["--log-level", "up"],
        ),
        (["-v"], ["--version"], None, []),
        (["-h", "copy"], ["--help"], "copy", []),
        (["--", "serve"], [], "serve", []),
        # A harmless value of a Go global flag not supported yet is dropped.
        (["--prometheus-enabled=false", "serve"], [], "serve", []),
        (
            ["--analytics-reporting-enabled=false", "--use-xz-binary=0", "serve"],
            [],
            "serve",
            [],
        ),
    ],
)
def test_global_flags_are_split_off_before_the_command(
    argv: list[str], flags: list[str], command: str | None, rest: list[str]
) -> None:
    assert cli.split_global_flags(argv) == (flags, command, rest)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cache-hostname=x", "serve"], "unknown flag --cache-hostname before"),
        (["--conf=c.yaml", "serve"], "unknown flag --conf"),  # no abbreviations
        (["--config"], "--config: needs a value"),
        (["--config", "--log-level=info", "serve"], "--config: needs a value"),
        (["-x", "serve"], "unknown flag -x before the command"),
    ],
)
def test_bad_global_flags_are_usage_errors(argv: list[str], message: str) -> None:
    with pytest.raises(usage.UsageError, match=re.escape(message)):
        cli.split_global_flags(argv)


@pytest.mark.parametrize(
    "argv",
    [
        ["--otel-enabled", "serve"],
        # Bare means true, as in Go: "false" would be the command.
        ["--analytics-reporting-enabled", "false", "serve"],
        ["--otel-grpc-url", "http://127.0.0.1:4317", "serve"],
        ["--use-xz-binary=true", "serve"],
        ["--log-console-writer-enabled=false", "serve"],
    ],
)
def test_go_global_flags_not_supported_yet_are_refused(argv: list[str]) -> None:
    flag = argv[0].partition("=")[0]
    with pytest.raises(ConfigError, match=f"^{flag}: not supported yet"):
        cli.split_global_flags(argv)


def test_unsupported_global_flag_exits_with_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--otel-enabled", "serve"])
    assert exit_.value.code == 78
    assert (
        capsys.readouterr().err
        == "ncps: --otel-enabled: not supported yet by this ncps\n"
    )


class Recorder:
    def __init__(self, status: int = 0) -> None:
        self.calls: list[list[str]] = []
        self.status = status

    def __call__(self, argv: Sequence[str]) -> int:
        self.calls.append(list(argv))
        return self.status


@pytest.fixture
def fake_serve(monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    serve = Recorder(status=3)
    monkeypatch.setitem(cli.COMMANDS, "serve", serve)
    monkeypatch.setitem(cli.COMMANDS, "s", serve)
    yield serve


@pytest.mark.parametrize("command", ["serve", "s"])
def test_serve_and_its_alias_get_the_global_flags_first(
    fake_serve: Recorder, command: str
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--config", "c.yaml", "--log-level=debug", command, "--x=1"])
    assert exit_.value.code == 3  # the command's status
    assert fake_serve.calls == [["--config=c.yaml", "--log-level=debug", "--x=1"]]


def test_s_is_serve() -> None:
    assert cli.COMMANDS["s"] is cli.COMMANDS["serve"] is cli.serve


def test_a_global_flag_given_after_the_command_too_wins_after(
    tmp_path: Path, fake_serve: Recorder
) -> None:
    """``ncps --config=a.yaml serve --config=b.yaml`` reads b.yaml; before the
    command alone, a.yaml is read."""
    common = {
        "cache": {
            "storage": {"local": str(tmp_path / "storage")},
            "upstream": {"urls": ["https://cache.nixos.org"], "public-keys": [KEY_A]},
        }
    }
    a = write_yaml(tmp_path / "a.yaml", {**common, "log": {"level": "error"}})
    b = write_yaml(tmp_path / "b.yaml", {**common, "log": {"level": "warn"}})
    host = "--cache-hostname=cache.example.org"
    for argv, level in [
        ([f"--config={a}", "serve", host], "error"),
        ([f"--config={a}", "serve", host, f"--config={b}"], "warn"),
        ([f"--config={a}", "--log-level=trace", "s", host], "debug"),
        (
            [f"--config={a}", "--log-level=trace", "serve", host, "--log-level=panic"],
            "critical",
        ),
    ]:
        fake_serve.calls.clear()
        with pytest.raises(SystemExit):
            cli.main(argv)
        (passed,) = fake_serve.calls
        config, _ = serve_config(passed)
        assert config.log_level == level, argv


def test_log_format_before_the_command_reaches_serve(
    tmp_path: Path, fake_serve: Recorder
) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--log-format", "json", "serve", *local_flags(tmp_path)])
    config, _ = serve_config(fake_serve.calls[0])
    assert config.log_format == "json"


# -- version and help -------------------------------------------------------------


@pytest.mark.parametrize("argv", [["--version"], ["-v"], ["-v", "serve"]])
def test_version(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"ncps version {metadata.version('ncps')}\n"


@pytest.mark.parametrize(
    "options", [Options, cli.MigrateOptions, CopyOptions], ids=lambda o: o.__name__
)
def test_every_command_prints_ncps_version_not_twisted(
    options: type[usage.Options], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        options().parseOptions(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"ncps version {metadata.version('ncps')}\n"


def test_help_names_every_command_and_global_flag(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for command in cli.COMMANDS:
        assert re.search(rf"\b{command}\b", text), command
    for flag in GLOBAL_FLAGS:
        assert f"--{flag}=" in text, flag
    assert "--version" in text and "-v" in text
    # Each Go global flag refused is named, alone or by a "prefix-*".
    prefixes = re.findall(r"--([\w-]+?)-?\*", text)
    for flag in UNSUPPORTED_GLOBAL_FLAGS:
        named = f"--{flag}" in text or any(flag.startswith(p) for p in prefixes)
        assert named, flag


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "ncps: no command given\n"),
        (["frobnicate"], "ncps: unknown command 'frobnicate'\n"),
    ],
)
def test_no_or_unknown_command(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith(message)


# -- ncps serve: Go's flag syntax --------------------------------------------------


def test_the_go_minio_line_with_a_bare_boolean(tmp_path: Path) -> None:
    """The bare boolean neither eats the next flag nor is eaten by it."""
    config, warnings = serve_config(
        [
            "--cache-hostname=cache.example.org",
            "--cache-storage-s3-bucket=nix-cache",
            "--cache-storage-s3-endpoint=http://127.0.0.1:9000",
            "--cache-storage-s3-access-key-id=ncps",
            "--cache-storage-s3-secret-access-key=secret",
            "--cache-storage-s3-force-path-style",
            "--cache-database-url=postgresql://ncps:pw@127.0.0.1:5432/ncps",
            "--cache-upstream-url=https://cache.nixos.org",
            f"--cache-upstream-public-key={KEY_A}",
        ]
    )
    s3 = config.backend.storage_s3
    assert s3 is not None and s3.force_path_style
    assert config.backend.database_url == "postgresql://ncps:pw@127.0.0.1:5432/ncps"
    assert warnings == ()


@pytest.mark.parametrize(
    ("given", "signs"),
    [
        ([], True),
        (["--cache-sign-narinfo"], True),
        (["--cache-sign-narinfo=false"], False),
        (["--cache-sign-narinfo=0"], False),
        (["--cache-sign-narinfo=f"], False),
        (["--cache-sign-narinfo=false", "--cache-sign-narinfo"], True),
    ],
)
def test_booleans_bare_or_with_a_value(
    tmp_path: Path, given: list[str], signs: bool
) -> None:
    config, _ = serve_config([*local_flags(tmp_path), *given])
    assert config.sign_narinfo is signs


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (["--cache-sign-narinfo", "false"], "unexpected argument 'false'"),
        (["--server-addr", "--cache-temp-path=/tmp"], "--server-addr: needs a value"),
        (["--cache-host=cache.example.org"], "unknown flag --cache-host"),
        (["--cache-sign-narinfo=maybe"], "--cache-sign-narinfo"),
    ],
)
def test_flag_syntax_errors(tmp_path: Path, given: list[str], message: str) -> None:
    with pytest.raises((usage.UsageError, SystemExit)) as caught:
        serve_config([*local_flags(tmp_path), *given])
    if isinstance(caught.value, usage.UsageError):
        assert message in str(caught.value)
    else:  # a value error found while building the configuration
        assert caught.value.code == 78


def test_value_flags_take_the_next_argument(tmp_path: Path) -> None:
    config, _ = serve_config(
        [
            *local_flags(tmp_path),
            "--server-addr",
            "127.0.0.1:8080",
            "--log-level",
            "warn",
        ]
    )
    assert (config.listen_host, config.listen_port) == ("127.0.0.1", 8080)
    assert config.log_level == "warn"


def test_list_flags_split_on_commas_and_repeat(tmp_path: Path) -> None:
    config, _ = serve_config(
        [
            "--cache-hostname=cache.example.org",
            f"--cache-storage-local={tmp_path}",
            "--cache-upstream-url=https://a.example.org, https://b.example.org",
            "--cache-upstream-url",
            "https://c.example.org",
            f"--cache-upstream-public-key={KEY_A},{KEY_B}",
        ]
    )
    assert config.upstream_urls == (
        "https://a.example.org",
        "https://b.example.org",
        "https://c.example.org",
    )
    assert [k.to_text() for k in config.upstream_public_keys] == [KEY_A, KEY_B]


def test_deprecated_aliases_work_with_one_warning_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UPSTREAM_PUBLIC_KEYS", KEY_A)
    config, warnings = serve_config(
        [
            "--cache-hostname=cache.example.org",
            f"--cache-data-path={tmp_path / 'old'}",
            "--upstream-cache=https://a.example.org",
            "--upstream-cache",
            "https://b.example.org",
            "--upstream-dialer-timeout=7s",
        ]
    )
    assert config.backend.storage_local == tmp_path / "old"
    assert config.upstream_urls == ("https://a.example.org", "https://b.example.org")
    assert [k.to_text() for k in config.upstream_public_keys] == [KEY_A]
    assert config.dialer_timeout == 7.0
    assert len(warnings) == 4, warnings
    for old, new in [
        ("--cache-data-path", "--cache-storage-local"),
        ("--upstream-cache", "--cache-upstream-url"),
        ("--upstream-public-key", "--cache-upstream-public-key"),
        ("--upstream-dialer-timeout", "--cache-upstream-dialer-timeout"),
    ]:
        (line,) = [w for w in warnings if w.startswith(f"{old} ")]
        assert "deprecated" in line and new in line


def test_the_new_name_wins_over_its_alias(tmp_path: Path) -> None:
    config, warnings = serve_config(
        [
            *local_flags(tmp_path),
            f"--cache-data-path={tmp_path / 'old'}",
        ]
    )
    assert config.backend.storage_local == tmp_path / "storage"
    assert len(warnings) == 1


@pytest.mark.parametrize(
    "given",
    [
        ["--cache-max-size=10G"],
        ["--cache-redis-addrs", "127.0.0.1:6379"],
        ["--cache-allow-put-verb"],
        ["--cache-lock-backend=redis"],
    ],
)
def test_go_flags_not_supported_yet_are_refused_with_one_line(
    tmp_path: Path, given: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    flag = given[0].partition("=")[0]
    with pytest.raises(SystemExit) as exit_:
        serve_config([*local_flags(tmp_path), *given])
    assert exit_.value.code == 78
    assert capsys.readouterr().err == f"ncps: {flag}: not supported yet by this ncps\n"


@pytest.mark.parametrize(
    "given",
    [
        ["--cache-allow-put-verb=false"],
        ["--cache-lock-backend=local"],
        ["--prometheus-enabled=false"],
    ],
)
def test_go_flags_asking_for_what_ncps_does_anyway_are_accepted(
    tmp_path: Path, given: list[str]
) -> None:
    serve_config([*local_flags(tmp_path), *given])


def test_unsupported_setting_in_environment_or_file_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CACHE_LRU_SCHEDULE", "0 2 * * *")
    with pytest.raises(SystemExit):
        serve_config(local_flags(tmp_path))
    assert capsys.readouterr().err == (
        "ncps: --cache-lru-schedule: not supported yet by this ncps "
        "(set by CACHE_LRU_SCHEDULE)\n"
    )
    monkeypatch.delenv("CACHE_LRU_SCHEDULE")
    path = write_yaml(tmp_path / "c.yaml", {"cache": {"redis": {"addrs": ["r:6379"]}}})
    with pytest.raises(SystemExit):
        serve_config([*local_flags(tmp_path), f"--config={path}"])
    err = capsys.readouterr().err
    assert err.startswith("ncps: --cache-redis-addrs: not supported yet")
    assert "cache.redis.addrs" in err


def test_s3_endpoint_without_scheme_means_https_with_one_warning(
    tmp_path: Path,
) -> None:
    config, warnings = serve_config(
        [
            "--cache-hostname=cache.example.org",
            "--cache-storage-s3-bucket=nix-cache",
            "--cache-storage-s3-endpoint=minio.example.org:9000",
            "--cache-storage-s3-access-key-id=ncps",
            "--cache-storage-s3-secret-access-key=secret",
            "--cache-database-url=postgresql://ncps:pw@127.0.0.1:5432/ncps",
            "--cache-upstream-url=https://cache.nixos.org",
            f"--cache-upstream-public-key={KEY_A}",
        ]
    )
    assert config.backend.storage_s3 is not None
    assert config.backend.storage_s3.endpoint == "https://minio.example.org:9000"
    (line,) = warnings
    assert line.startswith("--cache-storage-s3-endpoint: ")
    assert "https://minio.example.org:9000" in line
    assert "secret" not in line


# -- --log-format=json -------------------------------------------------------------


@pytest.mark.parametrize("level", ["debug", "info", "warn", "error", "critical"])
def test_json_log_lines_carry_the_event_level(level: str) -> None:
    events: list[LogEvent] = []
    getattr(Logger(namespace="ncps.test", observer=events.append), level)(
        "upstream {url} failed", url="https://a.example.org"
    )
    line = event_as_json_line(events[0])
    assert line is not None and line.endswith("\n")
    record = json.loads(line)
    assert record["level"] == level
    assert record["namespace"] == "ncps.test"
    assert record["message"] == "upstream https://a.example.org failed"
    assert record["url"] == "https://a.example.org"


# -- ncps migrate ------------------------------------------------------------------


def revision(db_file: Path) -> str | None:
    if not db_file.exists():
        return None
    with sqlite3.connect(db_file) as conn:
        tables = conn.execute("select name from sqlite_master").fetchall()
        if ("alembic_version",) not in tables:
            return None
        rows = conn.execute("select version_num from alembic_version").fetchall()
    return str(rows[0][0]) if rows else None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["down"],
            "ncps migrate: down is not supported: ncps migrations only go forward",
        ),
        (["frobnicate"], "ncps migrate: unknown action 'frobnicate'"),
        (["up", "down"], "ncps migrate: unexpected argument 'down'"),
        (["up", "--dry-run", "now"], "ncps migrate: unexpected argument 'now'"),
        (["up", "--cache-database-url"], "--cache-database-url: needs a value"),
        (["up", "--dry"], "unknown flag --dry"),
    ],
)
def test_migrate_usage_errors_are_one_line_and_touch_nothing(
    tmp_path: Path, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status = cli.migrate([f"--cache-storage-local={tmp_path}", *argv])
    assert status == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ncps migrate: "), err
    assert message in err
    assert not (tmp_path / "db").exists()


def test_migrate_down_through_main_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["migrate", "down", f"--cache-storage-local={tmp_path}"])
    assert exit_.value.code == 2
    assert "only go forward" in capsys.readouterr().err


@pytest.mark.parametrize("action", [["up"], []], ids=["up", "no-action"])
def test_migrate_up_with_bare_and_valued_dry_run(
    tmp_path: Path, action: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    db_file = tmp_path / "db" / "ncps.sqlite3"
    # A bare --dry-run does not take the next flag as its value.
    assert cli.migrate([*action, "--dry-run", f"--cache-storage-local={tmp_path}"]) == 0
    assert "needs migrating" in capsys.readouterr().out
    assert revision(db_file) is None
    assert (
        cli.migrate([f"--cache-storage-local={tmp_path}", *action, "--dry-run=false"])
        == 0
    )
    assert "database migrated from empty to" in capsys.readouterr().out
    assert revision(db_file) == db_engine.head_revision()
    assert (
        cli.migrate(["--dry-run=true", *action, "--cache-storage-local", str(tmp_path)])
        == 0
    )
    assert "up to date" in capsys.readouterr().out


def test_migrate_takes_the_deprecated_storage_alias_with_one_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.migrate(["up", f"--cache-data-path={tmp_path}"]) == 0
    assert revision(tmp_path / "db" / "ncps.sqlite3") == db_engine.head_revision()
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("ncps migrate: warning: --cache-data-path (CACHE_DATA_PATH)")


def test_migrate_reads_the_alias_variable_and_the_go_file_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CACHE_DATA_PATH", str(tmp_path / "env"))
    assert cli.migrate(["up"]) == 0
    assert revision(tmp_path / "env" / "db" / "ncps.sqlite3") is not None
    assert "CACHE_DATA_PATH" in capsys.readouterr().err
    # The Go migrate command's key cache.database.url; the file beats the env.
    url = f"sqlite:{tmp_path / 'file.sqlite3'}"
    path = write_yaml(tmp_path / "c.yaml", {"cache": {"database": {"url": url}}})
    assert cli.migrate(["up", "--config", str(path)]) == 0
    assert revision(tmp_path / "file.sqlite3") == db_engine.head_revision()


def test_global_config_before_migrate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:{tmp_path / 'g.sqlite3'}"
    path = write_yaml(tmp_path / "c.yaml", {"cache": {"database-url": url}})
    with pytest.raises(SystemExit) as exit_:
        cli.main([f"--config={path}", "--log-level=debug", "migrate", "up"])
    assert exit_.value.code == 0
    assert revision(tmp_path / "g.sqlite3") == db_engine.head_revision()


def test_migrate_checks_log_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = cli.migrate(
        ["up", f"--cache-storage-local={tmp_path}", "--log-level=loud"]
    )
    assert status == 78
    assert capsys.readouterr().err.startswith("ncps migrate: --log-level: 'loud'")


# -- ncps copy ---------------------------------------------------------------------


def copy_options(argv: list[str]) -> CopyOptions:
    options = CopyOptions()
    options.parseOptions(argv)
    return options


@pytest.mark.parametrize(
    ("given", "dry_run", "path_style"),
    [
        ([], False, False),
        (["--dry-run", "--from-storage-s3-force-path-style"], True, True),
        (["--dry-run=true", "--from-storage-s3-force-path-style=false"], True, False),
        (["--dry-run=false", "--from-storage-s3-force-path-style=1"], False, True),
    ],
)
def test_copy_booleans_bare_or_with_a_value(
    tmp_path: Path, given: list[str], dry_run: bool, path_style: bool
) -> None:
    options = copy_options(
        [
            "--from-storage-s3-bucket=b",
            "--from-storage-s3-endpoint=http://127.0.0.1:9000",
            "--from-storage-s3-access-key-id=k",
            "--from-storage-s3-secret-access-key=s",
            "--from-database-url=postgresql://u@db/ncps",
            *given,
            "-j",
            "8",
            "--to-storage-local",
            str(tmp_path),
        ]
    )
    assert bool(options["dry-run"]) is dry_run
    source = options.backend("from")
    assert source.storage_s3 is not None
    assert source.storage_s3.force_path_style is path_style
    assert options.backend("to").storage_local == tmp_path
    assert options.jobs() == 8


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (["--dry-run=perhaps"], "--dry-run: invalid boolean"),
        (["--otel-enabled"], "--otel-enabled: not supported yet"),
        (["--log-level=loud"], "--log-level: 'loud'"),
        (["--from-storage"], "unknown flag --from-storage"),
    ],
)
def test_copy_flag_errors(given: list[str], message: str) -> None:
    with pytest.raises(usage.UsageError, match=re.escape(message)):
        copy_options(given)


def test_copy_s3_endpoint_without_scheme_warns_once_naming_the_side(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    options = copy_options(
        [
            f"--from-storage-local={tmp_path}",
            "--to-storage-s3-bucket=b",
            "--to-storage-s3-endpoint=minio.example.org:9000",
            "--to-storage-s3-access-key-id=k",
            "--to-storage-s3-secret-access-key=s",
            "--to-database-url=postgresql://u@db/ncps",
        ]
    )
    lines: list[str] = []
    target = options.backend("to", warn=lines.append)
    assert target.storage_s3 is not None
    assert target.storage_s3.endpoint == "https://minio.example.org:9000"
    (line,) = lines
    assert line.startswith("--to-storage-s3-endpoint: 'minio.example.org:9000'")
    options.backend("to")
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("ncps copy: warning: --to-storage-s3-endpoint: ")
    options.backend("from")
    assert capsys.readouterr().err == ""


def test_global_config_is_refused_for_copy(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--config=c.yaml", "copy", "--dry-run"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--from-config" in err


def test_global_log_level_reaches_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    copy = Recorder()
    monkeypatch.setattr(cli, "copy", copy)
    monkeypatch.setitem(cli.COMMANDS, "copy", copy)
    with pytest.raises(SystemExit):
        cli.main(["--log-level", "debug", "copy", "--dry-run"])
    assert copy.calls == [["--log-level=debug", "--dry-run"]]
    copy_options(copy.calls[0])  # copy takes what main hands it
