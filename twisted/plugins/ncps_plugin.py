"""twistd/twist dropin: ``twistd ncps`` / ``twist ncps`` start the Nix binary-cache proxy."""

from twisted.application.service import ServiceMaker

ncps = ServiceMaker(
    "ncps", "ncps.tap", "Nix binary-cache proxy (caching, verifying substituter)", "ncps"
)
