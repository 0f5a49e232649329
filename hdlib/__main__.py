"""`python -m hdlib run params/X.yaml [key=value ...] [--only STAGE] [--from STAGE]`"""

from __future__ import annotations

import argparse
import sys

from .errors import one_line_errors


@one_line_errors
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hdlib", description="HistoDiffusion study runner")
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute the study's notebooks with papermill")
    run.add_argument("params", help="parameter file, e.g. params/default.yaml")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. downstream.seeds=[0,1]")
    group = run.add_mutually_exclusive_group()
    group.add_argument("--only", metavar="STAGE", help="run just this stage (e.g. 01 or 01_autoencoder)")
    group.add_argument("--from", dest="start", metavar="STAGE", help="run this stage and all after it")
    run.add_argument("--force", action="store_true", help="re-run stages even if their inputs are unchanged")
    pre = sub.add_parser("pretrain", help="train the autoencoder and unconditional LDM on the pool (resumable)")
    pre.add_argument("params", help="parameter file, e.g. params/pretrain_demo.yaml")
    pre.add_argument("overrides", nargs="*")
    show = sub.add_parser("config", help="print the resolved configuration")
    show.add_argument("params")
    show.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    if args.command == "run":
        from .runner import run_study

        run_study(args.params, args.overrides, only=args.only, start=args.start, force=args.force)
    elif args.command == "pretrain":
        from .pretrain import main as pretrain_main

        return pretrain_main(args.params, args.overrides)
    else:
        import yaml

        from .config import load_config

        print(yaml.safe_dump(load_config(args.params, args.overrides).to_dict(), sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
