"""An isolated environment for Debian's nix-bin (Nix 2.8) run as root without a daemon.

Nothing under /nix is touched and no public cache is contacted: the default store is a
chroot store in the scratch dir, ``substituters`` is empty (each call names the one
under test), build users are off, and the narinfo disk cache never remembers anything.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

NIX_CONFIG = """experimental-features = nix-command
store = {store}
substituters =
build-users-group =
sandbox = false
narinfo-cache-negative-ttl = 0
narinfo-cache-positive-ttl = 0
download-attempts = 1"""


class NixEnv:
    def __init__(self, base: Path) -> None:
        self.base = base
        for d in ("default-store", "xdg-cache", "home"):
            (base / d).mkdir(parents=True, exist_ok=True)
        self.env = {
            k: v for k, v in os.environ.items() if k not in ("NIX_REMOTE", "NIX_PATH")
        }
        self.env.update(
            NIX_CONFIG=NIX_CONFIG.format(store=base / "default-store"),
            XDG_CACHE_HOME=str(base / "xdg-cache"),
            HOME=str(base / "home"),
        )

    def check_output(self, argv: list[str]) -> str:
        proc = subprocess.run(argv, env=self.env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv[:3])}... failed (rc {proc.returncode}):\n"
                f"{proc.stderr[-3000:]}"
            )
        return proc.stdout

    def generate_signing_key(self, name: str, keys: Path) -> tuple[Path, str]:
        """A new binary-cache key pair ``name`` as ``keys/upstream.{sk,pk}``:
        (the secret key file, the public key)."""
        sk, pk = keys / "upstream.sk", keys / "upstream.pk"
        self.check_output(
            ["nix-store", "--generate-binary-cache-key", name, str(sk), str(pk)]
        )
        return sk, pk.read_text().strip()

    def copy_to_cache(
        self, store: Path, cache: Path, params: str, paths: list[str]
    ) -> None:
        """``nix copy`` ``paths`` and their closures from ``store`` into the
        ``file://`` binary cache ``cache``; ``params`` is the store URL's query
        (``compression=zstd&secret-key=...``)."""
        url = f"file://{cache}?{params}"
        self.check_output(["nix", "copy", "--store", str(store), "--to", url, *paths])

    def substitute(
        self,
        client_store: Path,
        paths: list[str],
        url: str,
        keys: list[str],
        timeout: float | None = None,
    ) -> float:
        """Realise ``paths`` into a fresh chroot store from ``url``; return seconds.

        The narinfo disk cache is emptied first so every run asks the server again.
        ``timeout``: kill the client after that many seconds (``TimeoutExpired``).
        """
        remove_tree(client_store)
        remove_tree(self.base / "xdg-cache")
        (self.base / "xdg-cache").mkdir()
        argv = [
            "nix-store",
            "--store",
            str(client_store),
            "-r",
            *paths,
            "--add-root",
            str(self.base / "gcroot"),
            "--option",
            "substituters",
            url,
            "--option",
            "trusted-public-keys",
            " ".join(keys),
        ]
        t = time.monotonic()
        proc = subprocess.run(
            argv, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        elapsed = time.monotonic() - t
        if proc.returncode != 0:
            raise RuntimeError(
                f"nix-store -r from {url} failed (rc {proc.returncode}):\n"
                f"{proc.stderr[-3000:]}"
            )
        return elapsed

    def verify(self, client_store: Path, keys: list[str]) -> None:
        self.check_output(
            [
                "nix",
                "store",
                "verify",
                "--store",
                str(client_store),
                "--all",
                "--option",
                "trusted-public-keys",
                " ".join(keys),
            ]
        )


def append_cache_info(cache: Path) -> None:
    """Let clients query the cache in bulk, at Nix's usual upstream priority."""
    with (cache / "nix-cache-info").open("a") as f:
        f.write("WantMassQuery: 1\nPriority: 40\n")


def remove_tree(path: Path) -> None:
    """rm -rf, also for Nix store trees whose directories are read-only."""
    if not path.exists():
        return

    def make_writable(func, p, _exc):
        os.chmod(os.path.dirname(p), 0o755)
        if os.path.isdir(p) and not os.path.islink(p):
            os.chmod(p, 0o755)
        func(p)

    shutil.rmtree(path, onerror=make_writable)
