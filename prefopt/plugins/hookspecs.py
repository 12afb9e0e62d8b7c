"""The hooks a prefopt plugin can implement. Built-in losses use them too."""
from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("prefopt")
hookimpl = pluggy.HookimplMarker("prefopt")


@hookspec
def register_losses() -> list[type]:
    """Return the :class:`prefopt.Loss` subclasses this plugin provides."""
