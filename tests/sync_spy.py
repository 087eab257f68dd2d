"""A context manager that records host synchronisations made from Python, for the no-sync tests.

Import from a test module as ``from sync_spy import SyncSpy`` (``tests/`` is on ``sys.path``).
"""

from __future__ import annotations

import sys

import torch

__all__ = ["SyncSpy"]


class SyncSpy:
    """Records Python-level host synchronisations (item, tolist, bool/int/float of a tensor, nonzero,
    repeat_interleave without output_size) made outside torch.optim while active."""

    NAMES = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero")

    def __init__(self):
        self.calls: list[str] = []
        self._saved = {}

    def __enter__(self):
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def spy(t, *args, _name=name, _original=original, **kwargs):
                caller = sys._getframe(1).f_code.co_filename
                if "torch/optim" not in caller.replace("\\", "/"):
                    self.calls.append(f"{_name} from {caller}:{sys._getframe(1).f_lineno}")
                return _original(t, *args, **kwargs)

            setattr(torch.Tensor, name, spy)
        self._saved_ri = torch.repeat_interleave

        def repeat_interleave(*args, **kwargs):
            if "output_size" not in kwargs:
                self.calls.append("repeat_interleave without output_size")
            return self._saved_ri(*args, **kwargs)

        torch.repeat_interleave = repeat_interleave
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        torch.repeat_interleave = self._saved_ri
        return False
