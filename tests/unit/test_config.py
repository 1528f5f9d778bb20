"""ncps.config: precedence, file formats, defaults and error messages."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import yaml

from ncps.config import (
    SETTINGS,
    Config,
    _read_config_file,
    check_database_url,
    load_config,
    redact_url,
)
from ncps.errors import ConfigError
from ncps.testing import TEST_CACHE_KEY, TEST_UPSTREAM_KEY, WRONG_UPSTREAM_KEY

KEY_A = TEST_UPSTREAM_KEY.public_key().to_text()
KEY_B = TEST_CACHE_KEY.public_key().to_text()
KEY_C = attrs.evolve(WRONG_UPSTREAM_KEY, name="third-1").public_key().to_text()


@pytest.fixture
def environ(tmp_path: Path) -> dict[str, str]:
    """An environment that points HOME and XDG_CONFIG_HOME at empty directories."""
    home = tmp_path / "home"
    home.mkdir()
    return {"HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")}


def base_flags(tmp_path: Path) -> dict[str, Any]:
    return {
        "cache-hostname": "cache.example.org",
        "cache-storage-local": str(tmp_path / "storage"),
        "cache-upstream-url": ["https://cache.nixos.org"],
        "cache-upstream-public-key": [KEY_A],
    }


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{"a.b": 1} -> {"a": {"b": 1}}"""
    tree: dict[str, Any] = {}
    for dotted, value in flat.items():
        *parents, leaf = dotted.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


@attrs.frozen
class Case:
    """Two different valid values for one setting and how to read it back.

    ``y`` differs from the default, so an environment value is observable.
    File values are given as they would be written in YAML (lists as lists).
    """

    flag: str
    env: str
    key: str
    x: Any
    y: Any
    read: Callable[[Config], Any]
    expect: Callable[[Any], Any] = lambda v: v
    multiple: bool = False


def cases(tmp: Path) -> list[Case]:
    secret_x = tmp / "x.sk"
    secret_y = tmp / "y.sk"
    netrc_x = tmp / "x.netrc"
    netrc_y = tmp / "y.netrc"
    return [
        Case(
            "cache-hostname",
            "CACHE_HOSTNAME",
            "cache.hostname",
            "x.example",
            "y.example",
            lambda c: c.hostname,
        ),
        Case(
            "cache-storage-local",
            "CACHE_STORAGE_LOCAL",
            "cache.storage.local",
            str(tmp / "sx"),
            str(tmp / "sy"),
            lambda c: c.backend.storage_local,
            Path,
        ),
        Case(
            "cache-database-url",
            "CACHE_DATABASE_URL",
            "cache.database-url",
            f"sqlite:{tmp}/x.db",
            f"sqlite:{tmp}/y.db",
            lambda c: c.backend.database_url,
        ),
        Case(
            "cache-temp-path",
            "CACHE_TEMP_PATH",
            "cache.temp-path",
            str(tmp / "tx"),
            str(tmp / "ty"),
            lambda c: c.backend.temp_path,
            Path,
        ),
        Case(
            "cache-upstream-url",
            "CACHE_UPSTREAM_URLS",
            "cache.upstream.urls",
            ["https://x1.example", "https://x2.example"],
            ["https://y.example"],
            lambda c: c.upstream_urls,
            tuple,
            multiple=True,
        ),
        Case(
            "cache-upstream-public-key",
            "CACHE_UPSTREAM_PUBLIC_KEYS",
            "cache.upstream.public-keys",
            [KEY_B, KEY_C],
            [KEY_C],
            lambda c: tuple(k.to_text() for k in c.upstream_public_keys),
            tuple,
            multiple=True,
        ),
        Case(
            "cache-upstream-dialer-timeout",
            "CACHE_UPSTREAM_DIALER_TIMEOUT",
            "cache.upstream.dialer-timeout",
            "1500ms",
            "1m",
            lambda c: c.dialer_timeout,
            lambda v: {"1500ms": 1.5, "1m": 60.0}[v],
        ),
        Case(
            "cache-upstream-response-header-timeout",
            "CACHE_UPSTREAM_RESPONSE_HEADER_TIMEOUT",
            "cache.upstream.response-header-timeout",
            "2s",
            "1h",
            lambda c: c.response_header_timeout,
            lambda v: {"2s": 2.0, "1h": 3600.0}[v],
        ),
        Case(
            "cache-sign-narinfo",
            "CACHE_SIGN_NARINFO",
            "cache.sign-narinfo",
            "true",
            "false",
            lambda c: c.sign_narinfo,
            lambda v: v == "true",
        ),
        Case(
            "cache-secret-key-path",
            "CACHE_SECRET_KEY_PATH",
            "cache.secret-key-path",
            str(secret_x),
            str(secret_y),
            lambda c: c.secret_key_path,
            Path,
        ),
        Case(
            "netrc-file",
            "NETRC_FILE",
            "cache.netrc-file",
            str(netrc_x),
            str(netrc_y),
            lambda c: c.netrc_file,
            Path,
        ),
        Case(
            "server-addr",
            "SERVER_ADDR",
            "server.addr",
            "127.0.0.1:1111",
            "[::1]:2222",
            lambda c: (c.listen_host, c.listen_port),
            lambda v: {
                "127.0.0.1:1111": ("127.0.0.1", 1111),
                "[::1]:2222": ("::1", 2222),
            }[v],
        ),
        Case(
            "log-level",
            "LOG_LEVEL",
            "log.level",
            "debug",
            "error",
            lambda c: c.log_level,
        ),
    ]


CASE_FLAGS = [c.flag for c in cases(Path("/"))]


def _case(tmp_path: Path, flag: str) -> Case:
    for path in ("x.sk", "y.sk", "x.netrc", "y.netrc"):
        (tmp_path / path).write_text("")
    return next(c for c in cases(tmp_path) if c.flag == flag)


def _env_text(case: Case, value: Any) -> str:
    return ",".join(value) if case.multiple else value


def _load(
    tmp_path: Path,
    environ: dict[str, str],
    case: Case,
    flag: Any = None,
    file: Any = None,
    env: Any = None,
) -> Config:
    flags = base_flags(tmp_path)
    flags.pop(case.flag, None)
    if flag is not None:
        flags[case.flag] = flag
    if env is not None:
        environ[case.env] = _env_text(case, env)
    config_file = None
    if file is not None:
        config_file = tmp_path / "ncps.yaml"
        config_file.write_text(yaml.safe_dump(nest({case.key: file})))
    return load_config(flags, environ, str(config_file) if config_file else None)


@pytest.mark.parametrize("flag", CASE_FLAGS)
def test_flag_beats_file_and_env(
    tmp_path: Path, environ: dict[str, str], flag: str
) -> None:
    case = _case(tmp_path, flag)
    config = _load(tmp_path, environ, case, flag=case.x, file=case.y, env=case.y)
    assert case.read(config) == case.expect(case.x)


@pytest.mark.parametrize("flag", CASE_FLAGS)
def test_file_beats_env(tmp_path: Path, environ: dict[str, str], flag: str) -> None:
    case = _case(tmp_path, flag)
    config = _load(tmp_path, environ, case, file=case.x, env=case.y)
    assert case.read(config) == case.expect(case.x)


@pytest.mark.parametrize("flag", CASE_FLAGS)
def test_env_beats_default(tmp_path: Path, environ: dict[str, str], flag: str) -> None:
    case = _case(tmp_path, flag)
    config = _load(tmp_path, environ, case, env=case.y)
    assert case.read(config) == case.expect(case.y)


def test_repeated_flag_keeps_every_value_in_order(
    tmp_path: Path, environ: dict[str, str]
) -> None:
    flags = base_flags(tmp_path)
    flags["cache-upstream-url"] = ["https://b.example", "https://a.example"]
    config = load_config(flags, environ)
    assert config.upstream_urls == ("https://b.example", "https://a.example")


def test_env_lists_are_comma_separated(tmp_path: Path, environ: dict[str, str]) -> None:
    flags = base_flags(tmp_path)
    del flags["cache-upstream-url"], flags["cache-upstream-public-key"]
    environ["CACHE_UPSTREAM_URLS"] = " https://a.example ,https://b.example,,"
    environ["CACHE_UPSTREAM_PUBLIC_KEYS"] = f"{KEY_A},{KEY_B}"
    config = load_config(flags, environ)
    assert config.upstream_urls == ("https://a.example", "https://b.example")
    assert [k.to_text() for k in config.upstream_public_keys] == [KEY_A, KEY_B]


def test_defaults(tmp_path: Path, environ: dict[str, str]) -> None:
    config = load_config(base_flags(tmp_path), environ)
    storage = tmp_path / "storage"
    assert config.backend.storage_local == storage
    assert config.backend.database_url == f"sqlite:{storage}/db/ncps.sqlite3"
    assert config.backend.temp_path == storage / "store" / "tmp"
    assert config.dialer_timeout == 3.0
    assert config.response_header_timeout == 3.0
    assert (config.listen_host, config.listen_port) == ("", 8501)
    assert config.sign_narinfo is True
    assert config.secret_key_path is None
    assert config.netrc_file is None
    assert config.log_level == "info"


def test_netrc_defaults_to_home_netrc_when_present(
    tmp_path: Path, environ: dict[str, str]
) -> None:
    netrc = Path(environ["HOME"]) / ".netrc"
    netrc.write_text("machine a login b password c\n")
    assert load_config(base_flags(tmp_path), environ).netrc_file == netrc


NESTED = {
    "cache.hostname": "file.example",
    "cache.database-url": "sqlite:/srv/ncps/db.sqlite3",
    "cache.upstream.urls": ["https://u1.example", "https://u2.example"],
    "cache.upstream.public-keys": [KEY_A, KEY_B],
    "cache.upstream.dialer-timeout": "5s",
    "cache.sign-narinfo": False,
    "server.addr": "127.0.0.1:9000",
    "log.level": "warn",
}

TOML_TEXT = f"""
[cache]
hostname = "file.example"
database-url = "sqlite:/srv/ncps/db.sqlite3"
sign-narinfo = false

[cache.upstream]
urls = ["https://u1.example", "https://u2.example"]
public-keys = ["{KEY_A}", "{KEY_B}"]
dialer-timeout = "5s"

[server]
addr = "127.0.0.1:9000"

[log]
level = "warn"
"""


@pytest.mark.parametrize(
    ("suffix", "render"),
    [
        (".yaml", lambda: yaml.safe_dump(nest(NESTED))),
        (".yml", lambda: yaml.safe_dump(nest(NESTED))),
        (".json", lambda: json.dumps(nest(NESTED))),
        (".toml", lambda: TOML_TEXT),
    ],
)
def test_config_file_formats_with_nested_keys(
    tmp_path: Path, environ: dict[str, str], suffix: str, render: Callable[[], str]
) -> None:
    path = tmp_path / f"ncps{suffix}"
    path.write_text(render())
    flags = {"cache-storage-local": str(tmp_path / "storage")}
    config = load_config(flags, environ, str(path))
    assert config.hostname == "file.example"
    assert config.backend.database_url == "sqlite:/srv/ncps/db.sqlite3"
    assert config.upstream_urls == ("https://u1.example", "https://u2.example")
    assert [k.to_text() for k in config.upstream_public_keys] == [KEY_A, KEY_B]
    assert config.dialer_timeout == 5.0
    assert config.response_header_timeout == 3.0
    assert config.sign_narinfo is False
    assert (config.listen_host, config.listen_port) == ("127.0.0.1", 9000)
    assert config.log_level == "warn"


def test_config_file_from_ncps_config_file_env(
    tmp_path: Path, environ: dict[str, str]
) -> None:
    path = tmp_path / "elsewhere.json"
    path.write_text(json.dumps({"cache": {"hostname": "env-file.example"}}))
    environ["NCPS_CONFIG_FILE"] = str(path)
    flags = base_flags(tmp_path)
    del flags["cache-hostname"]
    assert load_config(flags, environ).hostname == "env-file.example"


def test_config_file_from_xdg_config_home(
    tmp_path: Path, environ: dict[str, str]
) -> None:
    path = Path(environ["XDG_CONFIG_HOME"]) / "ncps" / "config.yaml"
    path.parent.mkdir(parents=True)
    path.write_text("cache:\n  hostname: xdg.example\n")
    flags = base_flags(tmp_path)
    del flags["cache-hostname"]
    assert load_config(flags, environ).hostname == "xdg.example"


# -- errors ----------------------------------------------------------------------------


def _error(
    tmp_path: Path,
    environ: dict[str, str],
    config_text: str | None = None,
    drop: tuple[str, ...] = (),
    **flags: Any,
) -> str:
    given = base_flags(tmp_path)
    for flag in drop:
        del given[flag]
    given.update({k.replace("_", "-"): v for k, v in flags.items()})
    path = None
    if config_text is not None:
        path = tmp_path / "ncps.yaml"
        path.write_text(config_text)
    with pytest.raises(ConfigError) as info:
        load_config(given, environ, str(path) if path else None)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("flags", "drop", "prefix"),
    [
        ({}, ("cache-hostname",), "--cache-hostname: required"),
        ({}, ("cache-storage-local",), "--cache-storage-local: required"),
        ({"cache_hostname": "https://cache.example.org"}, (), "--cache-hostname: "),
        ({"cache_hostname": "cache.example.org/path"}, (), "--cache-hostname: "),
        ({}, ("cache-upstream-url",), "--cache-upstream-url: "),
        ({}, ("cache-upstream-public-key",), "--cache-upstream-public-key: "),
        (
            {"cache_upstream_public_key": ["no-colon-here"]},
            (),
            "--cache-upstream-public-key: ",
        ),
        (
            {"cache_upstream_public_key": ["name:AAAA"]},
            (),
            "--cache-upstream-public-key: ",
        ),
        (
            {"cache_upstream_url": ["ftp://cache.example.org"]},
            (),
            "--cache-upstream-url: ",
        ),
        ({"cache_upstream_url": ["cache.example.org"]}, (), "--cache-upstream-url: "),
        (
            {"cache_upstream_url": ["https://u:s3cret@cache.example.org?priority=30"]},
            (),
            "--cache-upstream-url: 'https://u:***@cache.example.org?priority=30' must "
            "not have a query",
        ),
        (
            {"cache_upstream_url": ["https://a.example", "https://a.example"]},
            (),
            "--cache-upstream-url: ",
        ),
        (
            {"cache_upstream_dialer_timeout": "3 parsecs"},
            (),
            "--cache-upstream-dialer-timeout: ",
        ),
        (
            {"cache_upstream_dialer_timeout": "0s"},
            (),
            "--cache-upstream-dialer-timeout: ",
        ),
        (
            {"cache_upstream_response_header_timeout": "3"},
            (),
            "--cache-upstream-response-header-timeout: ",
        ),
        ({"cache_sign_narinfo": "maybe"}, (), "--cache-sign-narinfo: "),
        ({"server_addr": "8501"}, (), "--server-addr: "),
        ({"server_addr": ":http"}, (), "--server-addr: "),
        ({"server_addr": ":70000"}, (), "--server-addr: "),
        ({"log_level": "loud"}, (), "--log-level: "),
        (
            {"cache_database_url": "mongodb://db.example/ncps"},
            (),
            "--cache-database-url: unsupported",
        ),
        (
            {"cache_database_url": "postgresql://u:secret@db.example:5432/"},
            (),
            "--cache-database-url: 'postgresql://u:***@db.example:5432/' needs a "
            "database name",
        ),
        (
            {"cache_database_url": "mysql://u@db.example:port/ncps"},
            (),
            "--cache-database-url: ",
        ),
        (
            {"cache_storage_s3_bucket": "b"},
            (),
            "--cache-storage-local: give either local storage or S3 storage",
        ),
        (
            {
                "cache_storage_s3_bucket": "b",
                "cache_storage_s3_endpoint": "http://127.0.0.1:9000",
                "cache_database_url": "postgresql://db.example/ncps",
            },
            ("cache-storage-local",),
            "--cache-storage-s3-access-key-id: required with S3 storage",
        ),
        (
            {
                "cache_storage_s3_bucket": "b",
                "cache_storage_s3_endpoint": "ftp://127.0.0.1:9000",
                "cache_storage_s3_access_key_id": "k",
                "cache_storage_s3_secret_access_key": "s",
                "cache_database_url": "postgresql://db.example/ncps",
            },
            ("cache-storage-local",),
            "--cache-storage-s3-endpoint: 'ftp://127.0.0.1:9000' must be an http",
        ),
        (
            {
                "cache_storage_s3_bucket": "b",
                "cache_storage_s3_endpoint": "http://127.0.0.1:9000",
                "cache_storage_s3_access_key_id": "k",
                "cache_storage_s3_secret_access_key": "s",
            },
            ("cache-storage-local",),
            "--cache-database-url: required with S3 storage",
        ),
        ({}, ("cache-storage-local",), "--cache-storage-local: required"),
        ({"cache_database_pool_max_open_conns": "many"}, (), "--cache-database-pool"),
        ({"cache_database_pool_max_idle_conns": "-1"}, (), "--cache-database-pool"),
        ({"cache_database_url": "sqlite::memory:"}, (), "--cache-database-url: "),
        (
            {"cache_secret_key_path": "/nonexistent/ncps.sk"},
            (),
            "--cache-secret-key-path: ",
        ),
        ({"netrc_file": "/nonexistent/netrc"}, (), "--netrc-file: "),
    ],
)
def test_validation_errors_start_with_the_flag(
    tmp_path: Path,
    environ: dict[str, str],
    flags: dict[str, Any],
    drop: tuple[str, ...],
    prefix: str,
) -> None:
    assert _error(tmp_path, environ, drop=drop, **flags).startswith(prefix)


def test_bad_value_from_the_environment_names_the_flag(
    tmp_path: Path, environ: dict[str, str]
) -> None:
    environ["CACHE_SIGN_NARINFO"] = "perhaps"
    assert _error(tmp_path, environ).startswith("--cache-sign-narinfo: ")


def test_unknown_config_file_key(tmp_path: Path, environ: dict[str, str]) -> None:
    message = _error(tmp_path, environ, "cache:\n  hostnme: typo.example\n")
    assert message.startswith("--config: ")
    assert "cache.hostnme" in message


def test_config_file_value_of_wrong_shape_names_flag_and_key(
    tmp_path: Path, environ: dict[str, str]
) -> None:
    message = _error(
        tmp_path, environ, "cache:\n  hostname: [a, b]\n", drop=("cache-hostname",)
    )
    assert message.startswith("--cache-hostname (config key cache.hostname): ")


@pytest.mark.parametrize(
    ("name", "text"),
    [("ncps.yaml", "cache: [unclosed\n"), ("ncps.json", "{"), ("ncps.toml", "a = ")],
)
def test_unparsable_config_file(
    tmp_path: Path, environ: dict[str, str], name: str, text: str
) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"^--config: ") as info:
        load_config(base_flags(tmp_path), environ, str(path))
    assert "\n" not in str(info.value)


def test_missing_config_file(tmp_path: Path, environ: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=r"^--config: cannot read"):
        load_config(base_flags(tmp_path), environ, str(tmp_path / "absent.yaml"))


def test_s3_storage_settings(tmp_path: Path, environ: dict[str, str]) -> None:
    flags = base_flags(tmp_path)
    del flags["cache-storage-local"]
    environ.update(
        CACHE_STORAGE_S3_BUCKET="nars",
        CACHE_STORAGE_S3_ENDPOINT="http://127.0.0.1:9000/",
        CACHE_STORAGE_S3_ACCESS_KEY_ID="key",
        CACHE_STORAGE_S3_SECRET_ACCESS_KEY="secret",
        CACHE_STORAGE_S3_FORCE_PATH_STYLE="true",
        CACHE_DATABASE_URL="postgres://ncps:pw@127.0.0.1:5432/ncps",
        CACHE_DATABASE_POOL_MAX_OPEN_CONNS="10",
        CACHE_DATABASE_POOL_MAX_IDLE_CONNS="20",
    )
    backend = load_config(flags, environ).backend
    assert backend.storage_local is None
    s3 = backend.storage_s3
    assert s3 is not None
    assert (s3.bucket, s3.endpoint, s3.region) == (
        "nars",
        "http://127.0.0.1:9000",
        None,
    )
    assert (s3.access_key_id, s3.secret_access_key) == ("key", "secret")
    assert s3.force_path_style is True
    assert "secret" not in repr(s3)
    # Idle connections are capped by the open ones.
    assert (backend.pool_max_open, backend.pool_max_idle) == (10, 10)
    assert backend.temp_path.name == "ncps"


def test_pool_defaults(tmp_path: Path, environ: dict[str, str]) -> None:
    backend = load_config(base_flags(tmp_path), environ).backend
    assert (backend.pool_max_open, backend.pool_max_idle) == (25, 5)


CONTRIB = Path(__file__).resolve().parents[2] / "contrib"


@pytest.mark.parametrize("name", ["config.yaml", "config-s3-postgresql.yaml"])
def test_contrib_examples_load(name: str) -> None:
    config = load_config({}, {}, str(CONTRIB / name))
    assert config.hostname == "cache.example.lan"
    backend = config.backend
    if name == "config.yaml":
        assert backend.storage_local == Path("/var/lib/ncps")
        assert backend.database_url == "sqlite:/var/lib/ncps/db/ncps.sqlite3"
    else:
        assert backend.storage_s3 is not None
        assert backend.storage_s3.bucket == "nix-cache"
        assert backend.storage_s3.force_path_style
        assert backend.database_url.startswith("postgresql://ncps:")
        assert (backend.pool_max_open, backend.pool_max_idle) == (25, 5)
    assert (config.max_downloads, config.negative_ttl) == (32, 10.0)
    assert config.max_connections == 0
    assert (config.read_header_timeout, config.idle_timeout) == (10.0, 60.0)
    assert config.log_level == "info"
    assert config.log_format == ("text" if name == "config.yaml" else "json")


def test_contrib_example_mentions_every_setting() -> None:
    """Each setting's key is in contrib/config.yaml, set or commented out."""
    path = CONTRIB / "config.yaml"
    text = path.read_text()
    given = _read_config_file(str(path))
    for setting in SETTINGS:
        leaf = setting.key.rpartition(".")[2]
        mentioned = setting.key in given or re.search(
            rf"^\s*#\s+{re.escape(leaf)}:", text, re.MULTILINE
        )
        assert mentioned, setting.key


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "postgresql://127.0.0.1:1/db?password=s3cret&sslmode=disable",
            "postgresql://127.0.0.1:1/db?password=***&sslmode=disable",
        ),
        ("mysql://u:s3cret@h/db?PASSWD=s3cret", "mysql://u:***@h/db?PASSWD=***"),
        ("postgresql://u:s3cret@h/db", "postgresql://u:***@h/db"),
    ],
)
def test_database_passwords_are_hidden_in_the_user_info_and_the_query(
    url: str, shown: str
) -> None:
    assert redact_url(url) == shown


def test_a_database_url_that_does_not_parse_is_one_line_naming_the_flag() -> None:
    with pytest.raises(ConfigError) as info:
        check_database_url("postgresql://u:s3cret@[bad/db")
    message = str(info.value)
    assert message.startswith("--cache-database-url: 'postgresql://u:***@[bad/db'")
    assert "s3cret" not in message
