"""Old home of the device helpers, kept so that ``dgc_pyro.inference.device`` imports keep working.

The helpers live in :mod:`dgc_pyro.device`, below every layer that places tensors (checkpoint loading included).
"""

from dgc_pyro.device import DEVICE_CHOICES, auto_device, resolve_device

__all__ = ["DEVICE_CHOICES", "auto_device", "resolve_device"]
