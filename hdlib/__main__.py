"""The one command-line tool:

    python -m hdlib run params/X.yaml [key=value ...] [--only STAGE | --from STAGE] [--force]
    python -m hdlib train TASK params/X.yaml [--fraction F] [--adaptation A] [key=value ...]
    python -m hdlib sample --study-dir results/X --generator G --fraction F --draw D --request R.pt
    python -m hdlib encode --study-dir results/X     # one shard of the latent cache (under a launcher)
    python -m hdlib pretrain params/pretrain_demo.yaml [key=value ...]
    python -m hdlib export results/X OUT           # diffusers folder + latent classifiers + filters
    python -m hdlib augment SOURCE OUT --per-class N   # OUT/<class>/*.png + manifest.csv
    python -m hdlib config params/X.yaml [key=value ...]
    python -m hdlib readme params/default.yaml      # refresh README.md's results block

`key=value` overrides may come before or after the flags. Errors are one line (exit 2).
"""

from __future__ import annotations

import argparse
import sys

import yaml

from .config import load_config, resolve_device
from .errors import one_line_errors
from .pretrain import add_pretrain_parser
from .pretrain import main as pretrain_main
from .study.context import config_from_results, launched_rank
from .study.latents import encode_shard
from .study.train import TASKS, train_task
from .tools.export import augment_dataset, export_study
from .tools.readme import readme_path, sync_readme
from .tools.runner import run_study
from .tools.sample import sample_main, serve_main


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m hdlib", description="HistoDiffusion study tool",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="execute the study's notebooks with papermill")
    run.add_argument("params", help="parameter file, e.g. params/default.yaml")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. downstream.seeds=[0,1]")
    group = run.add_mutually_exclusive_group()
    group.add_argument("--only", metavar="STAGE", help="run just this stage (e.g. 01 or 01_autoencoder)")
    group.add_argument("--from", dest="start", metavar="STAGE", help="run this stage and all after it")
    run.add_argument("--force", action="store_true", help="re-run stages even if their inputs are unchanged")
    run.add_argument("--accept-code", action="store_true",
                     help="keep results whose inputs are unchanged but whose hdlib code changed, recording the "
                          "current code (without it such a stage stops the run with a one-line message)")


    tr = sub.add_parser("train", help="train one model of a study (resumable; works under accelerate launch)")
    tr.add_argument("task", choices=TASKS)
    tr.add_argument("params")
    tr.add_argument("overrides", nargs="*")
    tr.add_argument("--fraction", type=float)
    tr.add_argument("--adaptation", choices=("labeled", "target_unlabeled"))
    tr.add_argument("--draw", type=int, help="label draw (a downstream seed) for models of a labeled subset")
    tr.add_argument("--mixed_precision", choices=("no", "bf16", "fp16"))
    tr.add_argument("--checkpointing_steps", type=int, help="override the task's checkpointing_steps")

    sa = sub.add_parser("sample", help="one shard of a sampling request per process (under a launcher)")
    sa.add_argument("--study-dir", required=True, help="results/<study> (its config.json is used)")
    sa.add_argument("--generator", required=True)
    sa.add_argument("--fraction", type=float, required=True)
    sa.add_argument("--draw", type=int, required=True)
    sa_mode = sa.add_mutually_exclusive_group(required=True)
    sa_mode.add_argument("--request", help="a .pt file with the request's labels and seeds")
    sa_mode.add_argument("--serve", metavar="FOLDER",
                         help="answer round after round of requests in FOLDER until it holds sampling.stop")
    sa.add_argument("--adaptation", default="none")
    sa.add_argument("--guidance-scale", type=float)
    sa.add_argument("--guidance-interval", type=int, nargs="*",
                    help="T_LOW T_HIGH: guide only at these timesteps; none given = every step (default: the config's)")

    en = sub.add_parser("encode", help="one shard of the latent cache per process (under the launcher)")
    en.add_argument("--study-dir", required=True)

    ex = sub.add_parser("export", help="a study's models as a diffusers folder (+ latent classifiers, filters)")
    ex.add_argument("study_dir")
    ex.add_argument("out")

    au = sub.add_parser("augment", help="a filtered synthetic class-folder dataset from a study or export")
    au.add_argument("source", help="results/<study> or an exported folder")
    au.add_argument("out")
    au.add_argument("--per-class", type=int)
    au.add_argument("--as-study", action="store_true",
                    help="from an export: the study's own kept set again (its seeds, quota and selection)")
    au.add_argument("--fraction", type=float)
    au.add_argument("--draw", type=int)
    au.add_argument("--guidance-scale", type=float)
    au.add_argument("--no-filter", action="store_true", help="keep the first N candidates per class unfiltered")
    au.add_argument("--device", default="auto")

    add_pretrain_parser(sub)

    show = sub.add_parser("config", help="print the resolved configuration")
    show.add_argument("params")
    show.add_argument("overrides", nargs="*")

    rd = sub.add_parser("readme", help="write the default study's results block into README.md")
    rd.add_argument("params")
    rd.add_argument("overrides", nargs="*")
    return ap


def parse(argv=None) -> tuple[argparse.Namespace, list[str]]:
    """(arguments, key=value overrides); overrides may come before or after the flags."""
    parser = _parser()
    args, rest = parser.parse_known_args(argv)  # overrides after a flag are left over here
    stray = [r for r in rest if r.startswith("-") or "=" not in r or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    return args, list(getattr(args, "overrides", []) or []) + rest


@one_line_errors
def main(argv=None) -> int:
    args, overrides = parse(argv)
    if args.command == "run":

        run_study(args.params, overrides, only=args.only, start=args.start, force=args.force,
                  accept_code=args.accept_code)
    elif args.command == "train":

        if args.mixed_precision:
            overrides.append(f"study.mixed_precision={args.mixed_precision}")
        if args.checkpointing_steps:
            overrides += [f"{section}.checkpointing_steps={args.checkpointing_steps}" for section in
                          ("autoencoder.train", "diffusion.pretrain", "diffusion.adapt", "diffusion.scratch",
                           "diffusion.classifier_free", "latent_classifier.train")]
        cfg = load_config(args.params, overrides)
        train_task(cfg, args.task, args.fraction, args.adaptation, args.draw)
    elif args.command == "sample":

        if args.serve:
            return serve_main(args.study_dir, args.generator, args.fraction, args.draw, args.serve, args.adaptation,
                              args.guidance_scale, args.guidance_interval)
        return sample_main(args.study_dir, args.generator, args.fraction, args.draw, args.request,
                           args.adaptation, args.guidance_scale, args.guidance_interval)
    elif args.command == "encode":


        rank, world = launched_rank()  # each rank encodes its shard (PartialState on a CPU said rank 0 of 1)
        encode_shard(config_from_results(args.study_dir), rank, world)
    elif args.command == "export":

        print(export_study(args.study_dir, args.out))
    elif args.command == "augment":

        print(augment_dataset(args.source, args.out, args.per_class, args.fraction, args.draw, args.guidance_scale,
                              filtered=not args.no_filter, device=resolve_device(args.device), as_study=args.as_study))
    elif args.command == "pretrain":

        return pretrain_main(args.params, overrides, compare=args.compare, sweep=args.sweep, assess=args.assess,
                             curve=args.curve)
    elif args.command == "readme":

        path = readme_path()
        print(("updated " if sync_readme(load_config(args.params, overrides).results_dir, path) else "unchanged ") + str(path))
    else:


        print(yaml.safe_dump(load_config(args.params, overrides).to_dict(), sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
