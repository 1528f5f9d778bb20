"""``twistd ncps`` / ``twist ncps``: command-line options and ``makeService``.

The only module that touches the global reactor.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from ncps.config import SETTINGS, Config, environment, load_config
from ncps.errors import ConfigError, StartupError, exit_on_startup_error
from ncps.logs import set_level

_fail = exit_on_startup_error


class Options(usage.Options):
    """Flags named as in the Go ncps; environment variables and a config file too."""

    synopsis = "[options]"
    longdesc = (
        "Nix binary-cache proxy. Precedence: flag > config file > environment > "
        "default. Every flag has an environment variable (shown in brackets) "
        "and a config file key."
    )
    optParameters = [
        ["config", None, None, "YAML, TOML or JSON config file [NCPS_CONFIG_FILE]."]
    ] + [
        [
            s.flag,
            None,
            None,
            f"{s.help} [{s.env}]" + (f" (default: {s.default})" if s.default else ""),
        ]
        for s in SETTINGS
        if not s.multiple
    ]

    def __init__(self) -> None:
        super().__init__()
        self.repeated: dict[str, list[str]] = {
            s.flag: [] for s in SETTINGS if s.multiple
        }
        self.config: Config | None = None

    def opt_cache_upstream_url(self, value: str) -> None:
        """Upstream cache URL; repeatable, at least one [CACHE_UPSTREAM_URLS]."""
        self.repeated["cache-upstream-url"].append(value)

    def opt_cache_upstream_public_key(self, value: str) -> None:
        """Trusted upstream key name:base64; repeatable [CACHE_UPSTREAM_PUBLIC_KEYS]."""
        self.repeated["cache-upstream-public-key"].append(value)

    def given_flags(self) -> dict[str, Any]:
        flags: dict[str, Any] = {
            s.flag: self[s.flag]
            for s in SETTINGS
            if not s.multiple and self[s.flag] is not None
        }
        flags.update({k: v for k, v in self.repeated.items() if v})
        return flags

    def postOptions(self) -> None:
        try:
            self.config = load_config(self.given_flags(), environment(), self["config"])
        except ConfigError as e:
            _fail(str(e))


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from ncps.service import build_service

    assert options.config is not None
    set_level(options.config.log_level)
    try:
        return build_service(options.config, reactor)
    except StartupError as e:
        _fail(str(e))
        raise  # unreachable
