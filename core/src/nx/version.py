"""The installed nx-core version (its own module, so any part can read it without importing the package root)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("nx-core")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"
