"""`python -m hpc_rlhf.config show|check CONFIG.yaml [section.field=value ...]`,
`python -m hpc_rlhf.config docs [SECTION]`, or
`python -m hpc_rlhf.config from-openrlhf [-o OUT.yaml] -- <an OpenRLHF train command line>`."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from hpc_rlhf.config import ConfigError, JobConfig, config_from_dict, load_config, sizes, to_yaml


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


def _from_openrlhf(argv: list[str]) -> int:
    """Write the config of an OpenRLHF command line; list what did not map; check it."""
    import yaml

    from hpc_rlhf.config.openrlhf import convert, to_nested
    out_path = None
    if argv[:1] == ["-o"] and len(argv) > 1:
        out_path, argv = argv[1], argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    try:
        conv = convert(argv)
    except ValueError as e:
        print(f"from-openrlhf: {e}", file=sys.stderr)
        return 2
    text = yaml.safe_dump(to_nested(conv.values), sort_keys=False)
    if out_path:
        with open(out_path, "w") as f:
            f.write(text)
        print(f"wrote {out_path} (train.trainer={conv.trainer})")
    else:
        print(text, end="")
    for flag, value, why in conv.unmapped:
        print(f"not mapped: --{flag}{' ' + value if value else ''}: {why}", file=sys.stderr)
    for note in conv.notes:
        print(f"note: {note}", file=sys.stderr)
    try:
        config_from_dict(to_nested(conv.values), "the converted config")
    except ConfigError as e:
        print(f"the config does not pass `config check` yet:\n{e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["from-openrlhf"]:
        return _from_openrlhf(argv[1:])
    p = argparse.ArgumentParser(prog="python -m hpc_rlhf.config",
                                description="Show, check or document a job config.")
    p.add_argument("command", choices=("show", "check", "docs", "from-openrlhf"))
    p.add_argument("config", nargs="?", help="YAML file (omit for the defaults)")
    p.add_argument("overrides", nargs="*", help="section.field=value")
    p.add_argument("--in-job", action="store_true",
                   help="check: also compare the config with the SLURM allocation this runs in "
                   "(the sbatch scripts' first step)")
    args = p.parse_intermixed_args(argv)  # options may come anywhere (scripts add "$@" last)
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
        return 0
    # The files, models, datasets and reward code the job reads (an entry point may import the
    # launch layer; the config package itself never does).
    from hpc_rlhf.launch.preflight import allocation_problems, format_findings, preflight
    found = preflight(cfg)
    if args.in_job:
        found.problems += allocation_problems(cfg)
    source = f"{args.config or 'the defaults'}{' + overrides' if args.overrides else ''}"
    report = format_findings(found, source)
    if report:
        print(report, file=sys.stderr)
    if found.problems:
        return 2
    print(f"ok: {args.config or 'defaults'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
