"""A bit-exact fingerprint of a list of tensors (dtype, shape and bytes), to prove that what a
generator loaded is what the learner sent."""

from __future__ import annotations

import hashlib
from typing import Any, Iterable


class Fingerprint:
    """SHA-1 over (name, dtype, shape, raw bytes) of each tensor fed to ``update``, in that order;
    incremental, so a stream of tensors is hashed as it passes and nothing is kept."""

    def __init__(self) -> None:
        self._h = hashlib.sha1()

    def update(self, name: str, t: Any) -> None:
        import torch

        t = t.detach().to("cpu").contiguous()
        self._h.update(f"{name}|{str(t.dtype)}|{tuple(t.shape)}|".encode())
        if t.numel():
            self._h.update(t.view(torch.uint8).numpy())  # the buffer itself, no copy

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def weights_fingerprint(named: Iterable) -> str:
    """The Fingerprint of each (name, tensor) of ``named``, in the given order."""
    fp = Fingerprint()
    for name, t in named:
        fp.update(name, t)
    return fp.hexdigest()
