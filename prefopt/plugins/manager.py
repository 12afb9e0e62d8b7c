"""Plugin manager: built-in losses and the ``prefopt`` entry-point group.

``PREFOPT_LOAD_PLUGINS`` selects external plugins: unset loads all, an empty
string loads none, a comma list loads only those (entry-point or distribution
names; a name no installed plugin has is an error). A plugin that fails to load is recorded, not raised, so one broken
package never takes the CLI down; selecting its loss raises its error.
"""
from __future__ import annotations

import importlib.metadata as md
import os
from dataclasses import dataclass

import pluggy

from prefopt.plugins import hookspecs

GROUP = "prefopt"


@dataclass(frozen=True)
class PluginInfo:
    """One loaded (or failed) plugin and the distribution that provides it."""

    name: str
    dist: str
    version: str
    error: str | None = None


_pm: pluggy.PluginManager | None = None
_infos: dict[str, PluginInfo] = {}  # pluggy plugin name -> info


def _selected() -> set[str] | None:
    value = os.environ.get("PREFOPT_LOAD_PLUGINS")
    if value is None:
        return None
    return {part.strip() for part in value.split(",") if part.strip()}


def _check_selected(wanted: set[str] | None, eps: list[md.EntryPoint]) -> None:
    """Refuse a name in ``PREFOPT_LOAD_PLUGINS`` that no installed plugin has (a typo would load nothing, silently)."""
    installed = {f"{ep.dist.name if ep.dist else 'unknown'} ({ep.name})": {ep.name, ep.dist.name if ep.dist else ""} for ep in eps}
    known = set().union(*installed.values()) if installed else set()
    unknown = sorted((wanted or set()) - known)
    if unknown:
        import difflib

        from prefopt.errors import PluginError

        close = difflib.get_close_matches(unknown[0], sorted(known - {""}), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise PluginError(f"PREFOPT_LOAD_PLUGINS names {', '.join(map(repr, unknown))}, which no installed plugin has; installed "
                          f"plugins (distribution (entry point)): {', '.join(sorted(installed)) or 'none'}{hint}")


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    wanted = _selected()
    eps = sorted(md.entry_points(group=GROUP), key=lambda e: (e.name, e.value))
    _check_selected(wanted, eps)
    for ep in eps:
        dist = ep.dist.name if ep.dist else "unknown"
        version = ep.dist.version if ep.dist else "?"
        if wanted is not None and ep.name not in wanted and dist not in wanted:
            continue
        # pluggy would silently skip a second entry point of the same name: keep
        # both under distinct names so a loss-name clash is reported, not hidden.
        name = ep.name if pm.get_plugin(ep.name) is None else f"{ep.name}@{dist}"
        try:
            module = ep.load()
            pm.register(module, name=name)
            pm.check_pending()
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - any plugin failure (sys.exit() included) is reported, not raised
            if pm.get_plugin(name) is not None:
                pm.unregister(name=name)
            error = f"plugin {ep.name!r} from distribution {dist} {version} ({ep.value}) failed to load: {type(exc).__name__}: {exc}"
            _infos[name] = PluginInfo(ep.name, dist, version, error)
            continue
        _infos[name] = PluginInfo(ep.name, dist, version)


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with built-ins and selected entry points loaded."""
    global _pm
    if _pm is None:
        pm = pluggy.PluginManager("prefopt")
        pm.add_hookspecs(hookspecs)
        from prefopt.plugins import builtin

        pm.register(builtin, name="prefopt")
        _infos["prefopt"] = PluginInfo("prefopt", "prefopt", md.version("prefopt") if _installed() else "dev")
        try:
            _load_entry_points(pm)
        except Exception:
            _infos.clear()
            raise
        _pm = pm
    return _pm


def _installed() -> bool:
    try:
        md.version("prefopt")
        return True
    except md.PackageNotFoundError:
        return False


def plugin_info(name: str) -> PluginInfo:
    """Distribution details of a registered plugin, by its pluggy name."""
    get_plugin_manager()
    return _infos.get(name, PluginInfo(name, name, "?"))


def plugins() -> list[PluginInfo]:
    """Every plugin that was loaded or failed to load (built-ins first)."""
    get_plugin_manager()
    return list(_infos.values())


def reset() -> None:
    """Forget loaded plugins; the next call reloads them (used by tests)."""
    global _pm
    _pm = None
    _infos.clear()
    from prefopt.plugins import registry

    registry.reset()
