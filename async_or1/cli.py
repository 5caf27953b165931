"""Command line: argument parsing only.

Nothing heavy is imported at module level: torch, DeepSpeed, transformers and zmq are
imported inside the command functions, after parsing, so ``async-or1 --help`` is instant.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

# A dotted override (``schedule.0.steps=1``, ``name=x``): a key path, '=', any value.
_OVERRIDE = re.compile(r"^[A-Za-z_][\w]*(\.[\w]+)*=")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train with RL: generators + learner from one config",
                       description="Start generators and learner from one config; Ctrl-C stops them all.")
    p.add_argument("--config", "-c", default=None, help="YAML config (default: configs/cpu-tiny.yaml if present)")
    p.add_argument("--dry-run", action="store_true", help="print the fully resolved config and exit")
    p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory of the same name")
    p.add_argument("--role", choices=["all", "learner", "generator"], default="all",
                   help="multi-node runs: start only the learner (under torchrun/deepspeed) or one generator here")
    p.add_argument("--generator-id", type=int, default=None, help="with --role generator")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. algo.clip_high=0.265 schedule.0.steps=10")


def _add_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="list every config field with its default and documentation")
    p.add_argument("--config", "-c", default=None, help="also validate this YAML file")


def _add_reward(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reward", help="score responses with the math verifier or the code sandbox")
    p.add_argument("kind", choices=["math", "code"])
    p.add_argument("--jsonl", help="rows {id, response, gold} (math) or {id, response, tests} (code)")
    p.add_argument("--workers", type=int, default=2, help="worker processes")
    p.add_argument("--timeout", type=float, default=10.0, help="hard wall-clock limit per row, seconds")
    p.add_argument("--no-require-think", action="store_true",
                   help="grade the whole response when '</think>' is missing (non-reasoning models)")
    p.add_argument("--isolation", choices=["namespaces", "plain"], default="namespaces",
                   help="code: isolation the sandbox must have (it refuses to run with less); 'plain' = rlimits only")
    p.add_argument("--probe", action="store_true",
                   help="code: only run the sandbox self-check and print what it measured as JSON (exit 2 if short)")


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="data tools")
    dsub = p.add_subparsers(dest="data_cmd", required=True)
    f = dsub.add_parser("filter", help="offline difficulty filter: N rollouts per problem, drop 0/N and N/N")
    f.add_argument("--model", required=True, help="local model path")
    f.add_argument("--data", required=True, help="parquet or JSONL rows")
    f.add_argument("--n", type=int, default=16, help="rollouts per problem")
    f.add_argument("--out", required=True, help="output file (.jsonl or .parquet)")
    f.add_argument("--model-name", default=None, help="key under extra_info.model_difficulty (default: model dir name)")
    f.add_argument("--max-response-tokens", type=int, default=None,
                   help="default: the config's last stage's max_response_tokens")
    f.add_argument("--temperature", type=float, default=1.0)
    f.add_argument("--config", "-c", default=None, help="config whose generator pool samples (engine, devices, "
                   "dtype, rewards; default: configs/cpu-tiny.yaml if present)")
    f.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. generation.devices=[0,1]")


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="avg@k and unbiased pass@k of a model on a data set")
    p.add_argument("--model", required=True, help="local model path (or 'embedded', 'embedded-small')")
    p.add_argument("--data", default=None, help="rows: training layout or AIME-style {problem, answer} "
                                                "(default with a built-in model: its held-out split)")
    p.add_argument("--k", type=int, default=32, help="samples per problem")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-response-tokens", type=int, default=None,
                   help="default: the config's eval.max_response_tokens (0: its last stage's)")
    p.add_argument("--out", default=None, help="output directory for samples.jsonl and summary.json")
    p.add_argument("--max-problems", type=int, default=0, help="evaluate the first N problems (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", "-c", default=None, help="config whose generator pool samples (engine, devices, "
                   "dtype, rewards; default: configs/cpu-tiny.yaml if present)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.dtype=bfloat16")


def _add_plot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="PNG plots of a run from its metrics.jsonl")
    p.add_argument("run_dir", help="runs/NAME")


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks")
    bsub = p.add_subparsers(dest="bench_cmd", required=True)
    t = bsub.add_parser("throughput", help="async vs on-policy on the same work, interleaved")
    t.add_argument("--config", "-c", default="configs/cpu-tiny.yaml")
    t.add_argument("--modes", default="alone,on-policy,async",
                   help="comma list of alone (each pool by itself on the same work: the ceiling), on-policy, async")
    t.add_argument("--max-staleness", default="1,2,4", help="comma list of η values for the async mode")
    t.add_argument("--steps", type=int, default=20, help="training steps per run")
    t.add_argument("--repeats", type=int, default=1, help="interleaved rounds over all modes")
    t.add_argument("--reward-threshold", type=float, default=None,
                   help="sampled reward to time each mode to (default: 75%% of the way from the runs' start "
                        "to the weakest run's end, every round; with --lr-from, of the own-best-lr runs)")
    t.add_argument("--lr-from", default=None, metavar="SWEEP_JSON",
                   help="an `async-or1 bench staleness --lrs` report: also run each mode at the lr where it ended "
                        "with the highest sampled reward, and report time-to-reward at the same lr and at each "
                        "mode's own best lr, labelled")
    t.add_argument("--out", default="bench/results/throughput.json")
    t.add_argument("overrides", nargs="*", help="dotted config overrides applied to every run")
    s = bsub.add_parser("staleness", help="learning under staleness: max_staleness × corrections (+ the paper's "
                                          "N_SGD/N_reuse ablation), interleaved, noise-aware")
    s.add_argument("--config", "-c", default="configs/cpu-tiny.yaml")
    s.add_argument("--max-staleness", default="0,1,2,4,8", help="comma list of η values")
    s.add_argument("--corrections", default="none,tis,m2po", help="comma list of algo.correction values")
    s.add_argument("--steps", type=int, default=40, help="training steps per run")
    s.add_argument("--repeats", type=int, default=2, help="interleaved rounds (seed + round); a difference "
                                                          "within the spread across rounds is reported as none")
    s.add_argument("--lrs", default="", help="comma list of learner.lr values: the grid at each (default: the "
                                              "config's lr)")
    s.add_argument("--cell", action="append", default=[], metavar="TAG:ETA:LR:OVERRIDES",
                   help="a hypothesis test beyond the grid, compared with the same cell without its overrides "
                        "(correction 'none'; LR empty: the config's), e.g. "
                        "noclip:2:3e-4:algo.clip_low=0.999,algo.clip_high=1000; repeatable")
    s.add_argument("--no-ablation", action="store_true", help="skip the (N_SGD, N_reuse) = (4, 1), (1, 2) cells")
    s.add_argument("--eval-every", type=int, default=0, help="held-out avg@k every N steps too (eval leases "
                                                             "on the run's generators); 0: after the run only")
    s.add_argument("--out", default="bench/results/staleness.json")
    s.add_argument("--resume", action="store_true", help="reuse the runs an interrupted invocation (same config, "
                                                         "steps and overrides) recorded in OUT's .runs.jsonl")
    s.add_argument("overrides", nargs="*", help="dotted config overrides applied to every run")


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="plan a GPU run: the real controller on a virtual clock with cost models",
                       description="Discrete-event simulation of the run a config describes: the real controller, "
                                   "replay buffer and prompt source over the in-process transport, engines and "
                                   "learner as calibrated cost models (sim.* in `async-or1 config`). Reports "
                                   "throughput, idle time, staleness and length bias per budget, mode, η and split.")
    p.add_argument("--config", "-c", required=True, help="YAML config (e.g. configs/r1-distill-32b.yaml)")
    p.add_argument("--gpus", default=None, help="comma list of GPU budgets (default: the config's GPUs)")
    p.add_argument("--modes", default="on-policy,async", help="comma list of on-policy, async")
    p.add_argument("--max-staleness", default="1,2,4", help="comma list of η values for the async mode")
    p.add_argument("--split", default="config", help="generator:learner GPU ratio G:L, 'auto' (search per budget, "
                                                     "mode and η) or 'config' (the config's own ratio)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps simulated (the schedule's first N)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default bench/results/simulate-<config name>.json; "
                                              "a PNG is written beside it)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. sim.hardware=h200")


def _add_embedded(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embedded", help="build (or rebuild) the embedded tiny model and task")
    p.add_argument("--small", action="store_true", help="the embedded-small model and task instead "
                                                       "(configs/cpu-small.yaml)")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.add_argument("--cache-dir", default=None)


def _add_keys(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keys", help="make a run's CURVE keys ahead of time (multi-node --role runs)",
                       description="Key pairs for the learner and each generator, secrets mode 0600. Copy the "
                                   "directory to every node and set transport.keys_dir to it.")
    p.add_argument("--dir", required=True, help="directory to write (replaces keys already there)")
    p.add_argument("--generators", type=int, required=True, help="generation.num_generators of the run")


def _add_doctor(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="check this machine and install for a run (one screen; non-zero exit if "
                                      "something would break it)")
    p.add_argument("--config", "-c", default=None, help="YAML config to check against (default: "
                                                        "configs/cpu-tiny.yaml if present)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, as for train")


def _add_slurm(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("slurm", help="write an sbatch script: a Ray cluster over the job's nodes, then the run on it",
                       description="Print a Slurm batch script that starts a Ray head on the job's first node and "
                                   "workers on the others, runs `async-or1 train --config F launch.backend=ray` and "
                                   "stops Ray. Submit it with `sbatch`; arguments after its name go to `train`.")
    p.add_argument("--config", "-c", required=True, help="YAML config of the run (on a file system every node sees)")
    p.add_argument("--nodes", type=int, required=True, help="nodes of the job")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node (0: a CPU-only cluster)")
    p.add_argument("--partition", default=None, help="Slurm partition")
    p.add_argument("--time", default=None, help="Slurm time limit, e.g. 2-00:00:00")
    p.add_argument("--ray-port", type=int, default=6379, help="port of the Ray head (GCS) on the first node")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, passed on to `async-or1 train`")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="async-or1",
        description="Asynchronous actor-learner RL for long chain-of-thought reasoning (Skywork-OR1 MAGIC).")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for add in (_add_train, _add_config, _add_reward, _add_data, _add_eval, _add_plot, _add_bench, _add_simulate,
                _add_embedded, _add_keys, _add_doctor, _add_slurm):
        add(sub)
    return parser


def _default_config_path(path: str | None) -> str | None:
    from pathlib import Path

    if path is not None:
        return path
    candidate = Path("configs/cpu-tiny.yaml")
    return str(candidate) if candidate.is_file() else None


def cmd_train(args: argparse.Namespace) -> int:
    from async_or1.config import dump_yaml, load_config

    cfg = load_config(_default_config_path(args.config), args.overrides)
    if args.dry_run:
        print(dump_yaml(cfg), end="")
        return 0
    if args.role != "all":
        from async_or1.launch import run_role

        return run_role(cfg, args.role, args.generator_id, args.resume)
    from async_or1.launch import train

    return train(cfg, resume=args.resume, overwrite=args.overwrite)


def cmd_config(args: argparse.Namespace) -> int:
    from async_or1.config import describe, load_config

    if args.config:
        load_config(args.config)
        print(f"# {args.config}: valid")
    print("\n".join(describe()))
    return 0


def cmd_reward(args: argparse.Namespace) -> int:
    from async_or1.rewards.cli import main

    if args.probe:
        if args.kind != "code":
            raise SystemExit("async-or1 reward: --probe checks the code sandbox: use `async-or1 reward code --probe`")
        from async_or1.rewards.cli import probe_main

        return probe_main(args.isolation)
    if not args.jsonl:
        raise SystemExit("async-or1 reward: --jsonl F is required (or --probe)")
    return main(args.kind, args.jsonl, workers=args.workers, timeout_s=args.timeout,
                require_think=not args.no_require_think, isolation=args.isolation)


def cmd_data(args: argparse.Namespace) -> int:
    from async_or1.config import load_config
    from async_or1.launch_pool import filter_main

    cfg = load_config(_default_config_path(args.config), args.overrides)
    return filter_main(cfg, model=args.model, data=args.data, n=args.n, out=args.out, model_name=args.model_name,
                       max_response_tokens=args.max_response_tokens, temperature=args.temperature)


def cmd_eval(args: argparse.Namespace) -> int:
    from async_or1.config import load_config
    from async_or1.launch_pool import eval_main

    cfg = load_config(_default_config_path(args.config), args.overrides)
    return eval_main(cfg, model=args.model, data=args.data, k=args.k, temperature=args.temperature,
                     max_response_tokens=args.max_response_tokens, out=args.out, max_problems=args.max_problems,
                     seed=args.seed)


def cmd_plot(args: argparse.Namespace) -> int:
    from async_or1.plots import main

    return main(args.run_dir)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.bench_cmd == "staleness":
        from async_or1.bench.staleness import main as staleness

        return staleness(config=args.config, max_staleness=args.max_staleness, corrections=args.corrections,
                         steps=args.steps, repeats=args.repeats, out=args.out, ablation=not args.no_ablation,
                         eval_every=args.eval_every, overrides=args.overrides, resume=args.resume,
                         lrs=args.lrs, tagged=args.cell)
    from async_or1.bench.throughput import main

    return main(config=args.config, modes=args.modes, max_staleness=args.max_staleness, steps=args.steps,
                repeats=args.repeats, out=args.out, overrides=args.overrides,
                reward_threshold=args.reward_threshold, lr_from=args.lr_from)


def _int_list(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"async-or1 simulate: {what}: expected a comma list of integers, got {text!r}") from None


def cmd_simulate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from async_or1.config import load_config

    cfg = load_config(args.config, args.overrides)
    modes = [x.strip() for x in args.modes.split(",") if x.strip()]
    bad = sorted(set(modes) - {"on-policy", "async"})
    if bad or not modes:
        raise SystemExit(f"async-or1 simulate: --modes: unknown {bad or modes} (use on-policy, async)")
    etas = _int_list(args.max_staleness, "--max-staleness")
    out = Path(args.out or f"bench/results/simulate-{cfg.name}.json")
    from async_or1.sim.driver import SimError, resolve_model
    from async_or1.sim.plan import config_split, study, summary_line

    try:
        mdl = resolve_model(cfg)
        gpus = _int_list(args.gpus, "--gpus") if args.gpus else [sum(config_split(cfg, mdl.tp))]
        res = study(cfg, gpus=gpus, modes=modes, etas=etas, split=args.split, steps=args.steps, seed=args.seed,
                    out=out)
    except (ValueError, SimError) as e:
        print(f"async-or1 simulate: {e}", file=sys.stderr)
        return 2
    print(summary_line(res, out))
    return 0


def cmd_embedded(args: argparse.Namespace) -> int:
    from async_or1.embedded import ensure_embedded

    if args.small:
        from async_or1.embedded.small import ensure_small

        paths = ensure_small(args.cache_dir, force=args.force)
    else:
        paths = ensure_embedded(args.cache_dir, force=args.force)
    print(f"model: {paths.model}\ntrain rows: {paths.train}\nheld-out rows: {paths.heldout}")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from async_or1.transport.keys import make_keys

    d = make_keys(args.dir, args.generators)
    print(f"CURVE keys for the learner and {args.generators} generator(s) in {d}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from async_or1.config import load_config
    from async_or1.doctor import main

    path = _default_config_path(args.config)
    return main(load_config(path, args.overrides), path)


def cmd_slurm(args: argparse.Namespace) -> int:
    from async_or1.launch.slurm import main

    return main(args.config, args.overrides, args.nodes, args.gpus_per_node, args.partition, args.time, args.ray_port)


COMMANDS = {"train": cmd_train, "config": cmd_config, "reward": cmd_reward, "data": cmd_data, "eval": cmd_eval,
            "plot": cmd_plot, "bench": cmd_bench, "simulate": cmd_simulate, "embedded": cmd_embedded,
            "keys": cmd_keys, "doctor": cmd_doctor, "slurm": cmd_slurm}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; dotted overrides may stand anywhere after the subcommand.

    argparse fills a ``nargs="*"`` positional from one run of positionals only, so overrides split
    by an option (``--config F a=1 --overwrite b=2``) would leave ``b=2`` unrecognized. Every
    leftover that has the shape of an override joins ``overrides``, in command-line order (a
    later one wins); anything else is the usual error."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        takes = isinstance(getattr(args, "overrides", None), list)
        if not takes or not all(_OVERRIDE.match(x) for x in extra):
            bad = [x for x in extra if not (takes and _OVERRIDE.match(x))]
            parser.error(f"unrecognized arguments: {' '.join(bad)}")
        args.overrides = args.overrides + extra
    return args


def main(argv: list[str] | None = None) -> int:
    # Before torch loads OpenMP (and inherited by every child): idle OpenMP threads sleep instead of
    # spinning. With spinning, a multi-threaded process on a shared machine waits at every parallel
    # region for a thread another process has descheduled: the embedded build's SFT ran 16 s/step
    # with two spinning threads, 0.74 s/step with two sleeping ones, 2.8 s/step with one (load 16
    # on 2 cores). Set OMP_WAIT_POLICY=ACTIVE to get spinning back on a machine of your own.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = parse_args(argv)
    from async_or1.config import ConfigError

    try:
        return COMMANDS[args.cmd](args)
    except ConfigError as e:
        print(f"async-or1: config error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        from async_or1.data.prepare import DataError

        if not isinstance(e, DataError):
            raise
        # Found before anything started: nothing to resume, nothing to clean up.
        print(f"async-or1: data error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("async-or1: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
