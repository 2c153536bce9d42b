"""The runtime's error types: pteenet's own, or stand-ins when this folder runs alone.

The runtime folder may be copied beside an exported cascade without the rest of pteenet
(numpy and onnxruntime alone); then these stand-ins take the place of :mod:`pteenet.errors`.
"""

try:
    from pteenet.errors import BundleError, DataError, OptionError
except ImportError:  # copied alone, outside the pteenet package

    class OptionError(Exception):  # type: ignore[no-redef]
        """A bad argument or a missing optional dependency."""

    class BundleError(Exception):  # type: ignore[no-redef]
        """A missing or corrupt exported folder."""

    class DataError(Exception):  # type: ignore[no-redef]
        """An image that cannot be read."""


__all__ = ["BundleError", "DataError", "OptionError"]
