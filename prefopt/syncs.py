"""Counting the operations that make the host wait for the device.

On CUDA these block the CPU until queued kernels finish (``.item()``, ``.tolist()``,
``bool(t)``, ``nonzero`` and other data-dependent shapes, copies to the host). The
counter sees them on any device, so a CPU test can bound what a GPU step would wait for.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
# Ops whose result on the host depends on device data: each is a device-to-host sync on CUDA.
SYNC_OPS = {
    _aten._local_scalar_dense.default,  # .item(), float(t), bool(t), .tolist() per element
    _aten.nonzero.default,
    _aten.masked_select.default,
    _aten.unique_consecutive.default,
    _aten._unique2.default,
    _aten.equal.default,
    _aten.is_nonzero.default,
    _aten.repeat_interleave.Tensor,
}


class SyncCounter(TorchDispatchMode):
    """``with SyncCounter() as c: ...`` then ``c.count`` (``c.ops`` says which); ``.tolist()`` counts once."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self._tolist: Any = None

    def __enter__(self) -> "SyncCounter":
        # tolist() reads a CPU tensor's memory without dispatching an op: count it here
        self._tolist = original = torch.Tensor.tolist
        counter = self

        def tolist(t: torch.Tensor) -> Any:
            counter.ops["tolist"] += 1
            with torch.utils._python_dispatch._disable_current_modes():
                return original(t)

        torch.Tensor.tolist = tolist  # type: ignore[method-assign]
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        torch.Tensor.tolist = self._tolist  # type: ignore[method-assign]
        return super().__exit__(*exc)

    @property
    def count(self) -> int:
        return sum(self.ops.values())

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in SYNC_OPS:
            self.ops[str(func.overloadpacket.__name__)] += 1
        if func is _aten._to_copy.default and kwargs and kwargs.get("device") is not None:
            src = args[0].device
            if src.type != "cpu" and torch.device(kwargs["device"]).type == "cpu":
                self.ops["to_host"] += 1
        return func(*args, **(kwargs or {}))
