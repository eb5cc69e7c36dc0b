"""nbgateway: a transparent OAuth token gateway for the NationBuilder API.

This module only exposes the installed version; importing it has no side effects.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("nbgateway")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
