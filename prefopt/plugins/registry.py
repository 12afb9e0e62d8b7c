"""Loss names -> classes, from every plugin; selection and validation of a loss spec."""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

import pydantic

from prefopt.errors import ConfigError, PluginError, UnknownLossError
from prefopt.losses.base import DATA_KINDS, Loss
from prefopt.losses.combined import WeightedLoss
from prefopt.plugins import manager as plugins

# Losses shipped as first-party packages in plugins/<dir>: loss name -> distribution.
# Named (and suggested) in the error when a config selects one that is not installed.
FIRST_PARTY = {
    "simpo": "prefopt-simpo", "orpo": "prefopt-orpo", "slic": "prefopt-slic", "hinge": "prefopt-slic",
    "robust": "prefopt-robust", "wpo": "prefopt-wpo", "ld_dpo": "prefopt-ld-dpo", "plackett_luce": "prefopt-plackett-luce", "kto": "prefopt-kto",
    **dict.fromkeys(["exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down",
                     "discopop", "sigmoid_norm"], "prefopt-trl-losses"),
}


def first_party_hint(name: str) -> str:
    """Where the first-party loss ``name`` comes from and how to install it."""
    dist = FIRST_PARTY[name]
    return f"{name!r} is provided by the first-party package {dist} (pip install ./plugins/{dist.removeprefix('prefopt-')} from the prefopt repository)"


@dataclass(frozen=True)
class LossEntry:
    """A registered loss and the distribution that provides it."""

    name: str
    cls: type[Loss]
    dist: str
    version: str
    plugin: str = ""  # the entry point (plugin) name that registered it


@dataclass
class Registry:
    losses: dict[str, LossEntry] = field(default_factory=dict)
    conflicts: dict[str, list[LossEntry]] = field(default_factory=dict)
    broken: list[plugins.PluginInfo] = field(default_factory=list)


_registry: Registry | None = None
_built_for: object = None  # the plugin manager _registry was built from; a new manager rebuilds it


def reset() -> None:
    global _registry
    _registry = None


def get_registry() -> Registry:
    """All losses of all loaded plugins (built once per process)."""
    global _registry, _built_for
    pm = plugins.get_plugin_manager()
    if _registry is not None and _built_for is pm:
        return _registry
    reg = Registry(broken=[p for p in plugins.plugins() if p.error])
    for impl in pm.hook.register_losses.get_hookimpls():
        info = plugins.plugin_info(impl.plugin_name)
        try:
            classes = list(impl.function())
            for cls in classes:
                _check_class(cls)
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - a broken plugin is flagged, not fatal
            reg.broken.append(
                plugins.PluginInfo(info.name, info.dist, info.version, f"plugin {info.name!r} from {info.dist} {info.version} registered a broken loss: {exc}")
            )
            continue
        for cls in classes:
            entry = LossEntry(cls.name, cls, info.dist, info.version, info.name)
            if cls.name in reg.losses and reg.losses[cls.name].cls is cls:
                continue  # the same class registered twice (e.g. by prefopt.testing.registered) is no clash
            if cls.name in reg.conflicts:
                reg.conflicts[cls.name].append(entry)
            elif cls.name in reg.losses:
                reg.conflicts[cls.name] = [reg.losses.pop(cls.name), entry]
            else:
                reg.losses[cls.name] = entry
    _registry, _built_for = reg, pm
    return reg


def _check_class(cls: Any) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Loss)):
        raise TypeError(f"{cls!r} is not a prefopt.Loss subclass")
    if not isinstance(getattr(cls, "name", None), str) or not cls.name:
        raise TypeError(f"{cls.__name__} has no 'name'")
    if not (isinstance(cls.Config, type) and issubclass(cls.Config, pydantic.BaseModel)):
        raise TypeError(f"{cls.__name__}.Config is not a pydantic model")
    takes = getattr(cls, "takes", None)
    if not (isinstance(takes, frozenset) and takes and takes <= set(DATA_KINDS)):
        raise TypeError(f"{cls.__name__}.takes must be a non-empty frozenset of {', '.join(map(repr, DATA_KINDS))}, got {takes!r}")


def get_loss_class(name: str) -> type[Loss]:
    """The loss class registered under ``name``, or an error that says what to do."""
    reg = get_registry()
    if name in reg.losses:
        return reg.losses[name].cls
    if name in reg.conflicts:
        providers = " and ".join(f"{e.dist} {e.version} ({e.cls.__module__}.{e.cls.__qualname__})" for e in reg.conflicts[name])
        raise PluginError(
            f"loss {name!r} is provided by two plugins: {providers}; uninstall one or restrict PREFOPT_LOAD_PLUGINS"
        )
    for info in reg.broken:
        if info.name == name or FIRST_PARTY.get(name) == info.dist:
            raise PluginError(f"loss {name!r} is unavailable: {info.error}")
    installed = sorted(reg.losses)
    message = f"unknown loss {name!r}; installed losses: {', '.join(installed) or 'none'}"
    candidates = sorted((set(installed) | set(FIRST_PARTY)) - {name})
    close = difflib.get_close_matches(name, candidates, n=1)
    if close:
        message += f"; did you mean {close[0]!r}?"
    for known in [name, *close]:
        if known in FIRST_PARTY and known not in reg.losses:
            message += f"; {first_party_hint(known)}"
    if reg.broken:
        message += "; plugins that failed to load: " + ", ".join(p.name for p in reg.broken)
    raise UnknownLossError(message)


def _format_validation(err: pydantic.ValidationError, cls: type[Loss], path: str) -> list[str]:
    from prefopt.yaml_safe import suggest_key

    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"])
        value = "" if e["type"] == "missing" else f" (got {e['input']!r})"
        hint = suggest_key(cls.Config, e["loc"]) if e["type"] == "extra_forbidden" else ""
        lines.append(f"{path}.{where}: loss {cls.name!r}: {e['msg']}{value}{hint}")
    return lines


def build_loss(spec: dict[str, Any] | list[dict[str, Any]], path: str = "loss") -> Loss | WeightedLoss:
    """Validate a loss spec from a config and build it.

    ``{name: dpo, beta: 0.1}`` builds one loss; a list of such mappings, each with an
    optional ``weight`` (default 1), builds their weighted sum. Every problem is
    reported at once in a :class:`ConfigError`, each line naming the field's path.
    """
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(f"{path}: the list of losses is empty")
        terms, problems = [], []
        for i, item in enumerate(spec):
            item = dict(item) if isinstance(item, dict) else item
            weight = item.pop("weight", 1.0) if isinstance(item, dict) else 1.0
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
                problems.append(f"{path}[{i}].weight: must be a number >= 0 (got {weight!r}); a negative weight would turn the loss's sign")
                weight = 0.0  # keep validating this term's loss; the error above is raised below
            try:
                terms.append((float(weight), build_loss(item, f"{path}[{i}]")))
            except (ConfigError, UnknownLossError, PluginError) as exc:
                problems.append(str(exc))
        if problems:
            raise ConfigError("\n".join(problems))
        return WeightedLoss(terms)
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: expected a mapping like {{name: dpo, beta: 0.1}} or a list of them (got {spec!r})")
    params = dict(spec)
    name = params.pop("name", None)
    if not isinstance(name, str):
        raise ConfigError(f"{path}.name: required, the name of an installed loss (see `prefopt losses`)")
    if "weight" in params:
        raise ConfigError(f"{path}.weight: weights apply to a list of losses; write loss: [{{name: {name}, weight: ...}}, ...]")
    try:
        cls = get_loss_class(name)
    except (UnknownLossError, PluginError) as exc:
        raise ConfigError(f"{path}.name: {exc}") from None
    try:
        config = cls.Config(**params)
    except pydantic.ValidationError as exc:
        raise ConfigError("\n".join(_format_validation(exc, cls, path))) from None
    return cls(config)


def describe(cls: type[Loss]) -> list[dict[str, Any]]:
    """Each config field of a loss: name, type, default (or required) and description."""
    out = []
    for fname, finfo in cls.Config.model_fields.items():
        required = finfo.is_required()
        out.append(
            {
                "name": fname,
                "type": _type_name(finfo.annotation),
                "default": None if required else finfo.get_default(call_default_factory=True),
                "required": required,
                "bounds": bounds(finfo),
                "description": finfo.description or "",
            }
        )
    return out


_BOUNDS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))


def bounds(finfo: Any) -> str:
    """A field's declared bounds (pydantic ``Field(gt=, ge=, lt=, le=)``), e.g. ``">= 0, < 0.5"``; ``""`` if none."""
    parts = []
    for item in finfo.metadata:
        parts += [f"{sign} {getattr(item, attr)}" for attr, sign in _BOUNDS if getattr(item, attr, None) is not None]
    return ", ".join(parts)


def _type_name(annotation: Any) -> str:
    name = getattr(annotation, "__name__", None)
    if name and not getattr(annotation, "__args__", None):
        return name
    return str(annotation).replace("typing.", "")
