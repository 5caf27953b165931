"""A bit-exact fingerprint of a list of tensors (dtype, shape and bytes), to prove that what a
generator loaded is what the learner sent."""

from __future__ import annotations

import hashlib
from typing import Iterable


def weights_fingerprint(named: Iterable) -> str:
    """SHA-1 over (name, dtype, shape, raw bytes) of each (name, tensor), in the given order."""
    import torch

    h = hashlib.sha1()
    for name, t in named:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{str(t.dtype)}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
