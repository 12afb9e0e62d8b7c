"""The ``prefopt`` command line."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from prefopt.errors import PrefoptError


def _cmd_losses(args: argparse.Namespace) -> int:
    from prefopt.registry import describe, get_registry

    reg = get_registry()
    rows = [
        {"name": e.name, "package": e.dist, "version": e.version, "needs_reference": e.cls.reference.name.lower(), "fields": describe(e.cls)}
        for e in sorted(reg.losses.values(), key=lambda e: e.name)
    ]
    conflicts = {name: [f"{e.dist} {e.version}" for e in entries] for name, entries in reg.conflicts.items()}
    broken = [{"plugin": p.name, "package": p.dist, "version": p.version, "error": p.error} for p in reg.broken]
    if args.json:
        print(json.dumps({"losses": rows, "conflicts": conflicts, "broken": broken}, indent=2, default=str))
        return 0
    for row in rows:
        print(f"{row['name']}  ({row['package']} {row['version']}; reference: {row['needs_reference']})")
        for f in row["fields"]:
            default = "required" if f["required"] else f"default {f['default']!r}"
            print(f"    {f['name']}: {f['type']}, {default}. {f['description']}")
    for name, providers in conflicts.items():
        print(f"{name}  CONFLICT: provided by {' and '.join(providers)}")
    for b in broken:
        print(f"BROKEN {b['plugin']} ({b['package']} {b['version']}): {b['error']}")
    return 0


def _cmd_plugins(args: argparse.Namespace) -> int:
    from prefopt.plugins import plugins
    from prefopt.registry import get_registry

    reg = get_registry()
    rows = []
    for p in plugins():
        names = sorted(e.name for e in reg.losses.values() if e.dist == p.dist)
        names += sorted(n for n, entries in reg.conflicts.items() if any(e.dist == p.dist for e in entries))
        rows.append({"plugin": p.name, "package": p.dist, "version": p.version, "losses": names, "error": p.error})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        status = f"FAILED: {r['error']}" if r["error"] else ", ".join(r["losses"]) or "(no losses)"
        print(f"{r['package']} {r['version']} [{r['plugin']}]: {status}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefopt", description="Preference optimisation for language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("losses", help="list installed losses and their config fields")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_losses)
    p = sub.add_parser("plugins", help="list installed plugin packages and the losses each provides")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_plugins)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PrefoptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
