"""Counting the operations that make the host wait for the device.

On CUDA these block the CPU until queued kernels finish (``.item()``, ``.tolist()``,
``bool(t)``, ``nonzero`` and other data-dependent shapes, copies to the host, and
blocking copies to the device, such as ``torch.tensor(x, device="cuda")``). The
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
    """``with SyncCounter() as c: ...`` then ``c.count`` (``c.ops`` says which); ``.tolist()`` counts once.
    ``c.calls`` counts every aten operator dispatched inside (a CPU stand-in for kernel launches).

    ``device_only``: count only reads of non-CPU tensors and blocking copies to a non-CPU
    device (on CUDA, what makes the host wait for the GPU). Without it every read counts, and
    so does every tensor made from Python data (on a GPU it would be copied to the device):
    that is how a CPU run stands in for a GPU one.
    """

    def __init__(self, device_only: bool = False) -> None:
        super().__init__()
        self.device_only = device_only
        self.ops: Counter[str] = Counter()
        self.calls = 0
        self._tolist: Any = None

    def _counts(self, tensors: Any) -> bool:
        return not self.device_only or any(isinstance(t, torch.Tensor) and t.device.type != "cpu" for t in tensors)

    def __enter__(self) -> "SyncCounter":
        # tolist() reads a CPU tensor's memory without dispatching an op: count it here
        self._tolist = original = torch.Tensor.tolist
        counter = self

        def tolist(t: torch.Tensor) -> Any:
            if counter._counts([t]):
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
        self.calls += 1
        if func in SYNC_OPS and self._counts(args):
            self.ops[str(func.overloadpacket.__name__)] += 1
        if func is _aten._to_copy.default and kwargs and kwargs.get("device") is not None:
            src, dst = args[0].device.type, torch.device(kwargs["device"]).type
            if src != "cpu" and dst == "cpu":
                self.ops["to_host"] += 1
            elif src == "cpu" and dst != "cpu" and not kwargs.get("non_blocking", False):
                self.ops["to_device"] += 1
        elif func is _aten.copy_.default and args[0].device.type != "cpu" and args[1].device.type == "cpu" and not (
                len(args) > 2 and args[2]):
            self.ops["to_device"] += 1
        elif func is _aten.lift_fresh.default and not self.device_only:
            self.ops["from_python"] += 1  # torch.tensor(...) inside the counted code
        return func(*args, **(kwargs or {}))
