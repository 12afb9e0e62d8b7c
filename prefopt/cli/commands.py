"""The ``prefopt`` command line."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from prefopt import __version__
from prefopt.errors import PrefoptError


def _cmd_losses(args: argparse.Namespace) -> int:
    from prefopt.losses.base import DATA_KINDS, reference_for, takes_of
    from prefopt.plugins.registry import describe, get_registry
    from prefopt.testing.losscheck import needs_by_config

    reg = get_registry()
    rows = []
    for e in sorted(reg.losses.values(), key=lambda e: e.name):
        by_config, depends = needs_by_config(e.cls)
        reference = reference_for(by_config[0][1]) if by_config else e.cls.reference
        needs = [{"config": c, "features": sorted(f.value for f in n), "reference": reference_for(n).name.lower()} for c, n in by_config]
        takes = [k for k in DATA_KINDS if k in takes_of(e.cls)]
        rows.append({"name": e.name, "package": e.dist, "version": e.version, "takes": takes, "needs_reference": reference.name.lower(),
                     "needs": needs, "needs_depend_on_config": depends, "fields": describe(e.cls)})
    conflicts = {name: [f"{e.dist} {e.version}" for e in entries] for name, entries in reg.conflicts.items()}
    broken = [{"plugin": p.name, "package": p.dist, "version": p.version, "error": p.error} for p in reg.broken]
    if args.json:
        print(json.dumps({"losses": rows, "conflicts": conflicts, "broken": broken}, indent=2, default=str))
        return 0
    for row in rows:
        print(f"{row['name']}  ({row['package']} {row['version']}; reference: {row['needs_reference']})")
        print(f"    takes: {', '.join(row['takes'])}{' (rankings through data.pairs_from)' if row['takes'] == ['pairs'] else ''}")
        print(f"    needs: {_needs_line(row)}")
        for f in row["fields"]:
            default = "required" if f["required"] else f"default {f['default']!r}"
            bound = f", {f['bounds']}" if f["bounds"] else ""
            print(f"    {f['name']}: {f['type']}, {default}{bound}. {f['description']}")
    for name, providers in conflicts.items():
        print(f"{name}  CONFLICT: provided by {' and '.join(providers)}")
    for b in broken:
        print(f"BROKEN {b['plugin']} ({b['package']} {b['version']}): {b['error']}")
    return 0


def _needs_line(row: dict) -> str:
    """The features each listed config needs, e.g. ``policy_logps, ref_logps (default); policy_logps (reference_free=True)``."""
    parts = []
    for n in row["needs"]:
        label = ", ".join(f"{k}={v!r}" for k, v in n["config"].items()) or "default"
        parts.append(f"{', '.join(n['features'])} ({label})" if row["needs_depend_on_config"] or len(row["needs"]) > 1 else ", ".join(n["features"]))
    text = "; ".join(parts) or ("computed from the config (no valid default)" if row["needs_depend_on_config"] else "invalid declaration")
    return text + ("; they depend on the config" if row["needs_depend_on_config"] else "")


def _cmd_plugins(args: argparse.Namespace) -> int:
    from prefopt.plugins.manager import plugins
    from prefopt.plugins.registry import get_registry

    reg = get_registry()
    rows = []
    for p in plugins():
        # a plugin's own losses: another entry point of the same distribution may be the one providing them
        error = p.error or next((b.error for b in reg.broken if b.name == p.name and b.dist == p.dist), None)
        mine = lambda e, p=p: e.dist == p.dist and e.plugin in ("", p.name)  # noqa: E731
        names = [] if error else sorted(e.name for e in reg.losses.values() if mine(e))
        names += [] if error else sorted(n for n, entries in reg.conflicts.items() if any(mine(e) for e in entries))
        rows.append({"plugin": p.name, "package": p.dist, "version": p.version, "losses": names, "error": error})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        status = f"FAILED: {r['error']}" if r["error"] else ", ".join(r["losses"]) or "(no losses)"
        print(f"{r['package']} {r['version']} [{r['plugin']}]: {status}")
    return 0


def _load(args: argparse.Namespace):
    import logging

    from prefopt.config import describe_paths, load_config

    config = load_config(args.config, args.set)
    logging.getLogger("prefopt").info("%s", describe_paths(config))
    return config


def _cmd_validate(args: argparse.Namespace) -> int:
    from prefopt.testing.losscheck import smoke_test
    from prefopt.training.preflight import preflight

    config = _load(args)
    loss = config.build_loss()
    smoke_test(loss)  # the loss runs on inputs of exactly its declared features, before any model is loaded
    try:
        preflight(config, resume=args.resume, overwrite=args.overwrite, protect=[args.config])
        if args.resume:  # what --resume refuses before loading anything (versions, weights, processes, config)
            from prefopt.training.distributed import world_size
            from prefopt.training.resume import check_before_loading

            check_before_loading(config, world_size())
    except PrefoptError as exc:
        raise type(exc)(f"{args.config}: {exc}") from None
    print(f"{args.config}: valid (loss: {loss!r})")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import shlex

    from prefopt.training.distributed import is_main_process
    from prefopt.training.trainer import format_summary, train

    # the resume command printed on interruption repeats the --set overrides
    command = shlex.join([args.config, *(x for item in args.set for x in ("--set", item))])
    config = _load(args)
    summary = train(config, resume=args.resume, overwrite=args.overwrite, config_path=command, config_file=args.config)
    if summary.get("interrupted"):
        return 130
    if is_main_process():  # several processes return the same summary; one prints it
        print(format_summary(summary))
    return 0


def _cmd_precompute(args: argparse.Namespace) -> int:
    from prefopt.training.distributed import is_main_process
    from prefopt.training.preflight import preflight
    from prefopt.training.trainer import precompute_reference

    config = _load(args)
    preflight(config, output=False)  # it writes only the cache
    done = precompute_reference(config)
    for name, what in done.items() if is_main_process() else ():
        print(f"reference cache ({name}): {what}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from prefopt.cli.report import plot, summary_table

    print(summary_table(args.run_dir))
    print(f"curves: {plot(args.run_dir, args.out)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefopt", description="Preference optimisation for language models.")
    parser.add_argument("--version", action="version", version=f"prefopt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("report", help="plot a run's curves to a PNG and print its before/after table")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a trainer.output_dir")
    p.add_argument("--out", help="where to write the PNG (default: RUN_DIR/report.png)")
    p.set_defaults(func=_cmd_report)
    p = sub.add_parser("losses", help="list installed losses and their config fields")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_losses)
    p = sub.add_parser("plugins", help="list installed plugin packages and the losses each provides")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_plugins)
    for name, func, text in (
        ("train", _cmd_train, "train a policy as CONFIG says"),
        ("validate", _cmd_validate, "check CONFIG, loss parameters included, without training"),
        ("precompute-ref", _cmd_precompute, "fill the reference log-prob cache ahead of training"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("config", help="YAML run config")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field, e.g. trainer.lr=1e-6")
        if name in ("train", "validate"):  # validate checks output_dir as train would with the same flags
            p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint in output_dir")
            p.add_argument("--overwrite", action="store_true", help="start again in a non-empty output_dir prefopt created, moving its contents aside to OUTPUT_DIR.old-TIMESTAMP")
        p.set_defaults(func=func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging()
    try:
        return args.func(args)
    except PrefoptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _setup_logging() -> None:
    import logging

    from prefopt.training.distributed import is_main_process

    if not is_main_process():  # one process of several speaks; the others only report errors
        logging.getLogger("prefopt").setLevel(logging.ERROR)
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[prefopt] %(message)s"))
    logger = logging.getLogger("prefopt")
    if not logger.handlers:
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


if __name__ == "__main__":
    sys.exit(main())
