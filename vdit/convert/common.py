"""Helpers shared by weight converters: tensor conversion and key accounting."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np


def as_numpy(x: Any) -> np.ndarray:
    """A torch tensor (any dtype, any device) or array as a float32 numpy array."""
    if hasattr(x, "detach"):  # a torch tensor; bf16 has no numpy path, so cast in torch
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, np.float32)


class KeyTracker:
    """A state dict that records which keys were used.

    ``finish()`` raises if any key is left over, and ``pop`` if a key is missing, so
    a converter cannot silently drop or invent weights.
    """

    def __init__(self, state: Mapping[str, np.ndarray], ignore: Iterable[str] = ()):
        self._state = dict(state)
        self._ignore = tuple(ignore)

    def pop(self, key: str) -> np.ndarray:
        """Returns and consumes ``key``; a missing key is a ValueError naming it."""
        if key not in self._state:
            near = sorted(k for k in self._state if k.split(".")[0] == key.split(".")[0])[:5]
            raise ValueError(f"checkpoint is missing {key!r}" + (f"; similar keys: {near}" if near else ""))
        return self._state.pop(key)

    def finish(self, what: str) -> None:
        """Raises a ValueError listing keys that no parameter consumed."""
        left = sorted(k for k in self._state if not any(i in k for i in self._ignore))
        if left:
            more = f" (+{len(left) - 10} more)" if len(left) > 10 else ""
            raise ValueError(f"{what} checkpoint has {len(left)} unexpected keys: {left[:10]}{more}")


def linear(src: KeyTracker, prefix: str) -> dict:
    """torch ``nn.Linear`` ``{weight (out, in), bias}`` -> ``vdit.layers.Dense`` params."""
    return {"linear": {"kernel": src.pop(f"{prefix}.weight").T, "bias": src.pop(f"{prefix}.bias")}}


def stack_layers(trees: list) -> Any:
    """Stacks per-layer param trees on a new leading axis (the ``layers`` axis of a scan)."""
    import jax

    return jax.tree.map(lambda *xs: np.stack(xs), *trees)
