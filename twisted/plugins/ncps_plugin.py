"""twistd/twist dropin: ``twistd ncps`` and ``twist ncps`` start the Nix cache proxy."""

from twisted.application.service import ServiceMaker

ncps = ServiceMaker(
    "ncps",
    "ncps.tap",
    "Nix binary-cache proxy (caching, verifying substituter)",
    "ncps",
)
