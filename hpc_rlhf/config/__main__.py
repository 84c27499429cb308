"""`python -m hpc_rlhf.config show|check CONFIG.yaml [section.field=value ...]`, or
`python -m hpc_rlhf.config docs [SECTION]`."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from . import ConfigError, JobConfig, load_config, sizes, to_yaml


def _docs(section: str | None = None) -> str:
    """Every field with its default and doc; only `section` when given."""
    lines = []
    for sec in dataclasses.fields(JobConfig):
        if section and sec.name != section:
            continue
        cls = typing.get_type_hints(JobConfig)[sec.name]
        lines.append(f"{sec.name}:")
        for f in dataclasses.fields(cls):
            meta = f.metadata
            extra = f"  choices: {list(meta['choices'])}" if meta.get("choices") else ""
            lines.append(f"  {f.name} = {f.default!r}  # {meta.get('doc', '')}{extra}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hpc_rlhf.config",
                                description="Show, check or document a job config.")
    p.add_argument("command", choices=("show", "check", "docs"))
    p.add_argument("config", nargs="?", help="YAML file (omit for the defaults)")
    p.add_argument("overrides", nargs="*", help="section.field=value")
    args = p.parse_args(argv)
    if args.config and "=" in args.config:  # no YAML given, only overrides
        args.overrides.insert(0, args.config)
        args.config = None
    if args.command == "docs":  # `docs` or `docs SECTION`
        sections = [f.name for f in dataclasses.fields(JobConfig)]
        if args.config and args.config not in sections:
            print(f"config docs: unknown section {args.config!r}; choose one of {sections}",
                  file=sys.stderr)
            return 2
        print(_docs(args.config))
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    if args.command == "show":
        print(to_yaml(cfg), end="")
        derived = dataclasses.asdict(sizes(cfg))
        print("# derived (not settable): " + ", ".join(f"{k}={v}" for k, v in derived.items()))
    else:
        print(f"ok: {args.config or 'defaults'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
