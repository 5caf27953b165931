"""The Ray backend: the run's processes on a Ray cluster, each in an actor Ray placed and restarts.

    connect (the cluster can hold the run?) → place: learner ranks in one placement group, one
    actor per generator → ports and addresses from the nodes they landed on → launch.json →
    each actor starts its process → supervise (a generator actor that dies is restarted by Ray
    and its process started again; a learner that dies stops the run) → stop in order → tear down

Each actor (``ProcessHost``) runs exactly the process the local backend would spawn (the learner
loop, the generator worker, unchanged) as its child, through the local backend's ``Child``: the
process keeps its own main thread for its SIGTERM handler (a learner checkpoints on it), dies with
its actor (PR_SET_PDEATHSIG), and logs into ``<run_dir>/logs/`` as in a local run. So output_dir,
the model and the data must be on a file system every node sees (checked before anything starts).

A generator's process that exits without being told to stop takes its actor down with it, so a
crashed process and a killed actor are one case: Ray restarts the actor (``max_restarts`` =
``generation.max_restarts``), wherever its resources are free, and the supervisor starts the
process in it again. The learner holds the leases of a dead generator and re-issues them, and its
weight group is re-formed with the new process before the next broadcast (weights/group.py).

Ray itself is imported only here, and only when ``launch.backend`` is ``ray``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise SystemExit("launch.backend=ray needs Ray on every node: pip install 'async-or1[ray]'") from None
    return ray


def interface_of(ip: str) -> str:
    """The network interface that holds ``ip`` (loopback addresses: ``lo``). Gloo and NCCL listen on
    the interface their host name resolves to unless told; on a cluster node that may not be the
    address Ray connects the nodes on."""
    import ipaddress

    import psutil

    addr = ipaddress.ip_address(ip)
    if addr.is_loopback:
        return "lo"
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == ip for a in addrs):
            return name
    raise RuntimeError(f"no network interface of this node holds {ip}, the address Ray reports for it")


def free_ports(host: str, n: int) -> list[int]:
    """``n`` distinct ports free on ``host`` now (held together while they are picked)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class ProcessHost:
    """One process of the run, hosted by a Ray actor: where it landed, ports free there, and the
    process itself (``run``), which it signals on ``stop``."""

    def __init__(self, name: str, log_path: str) -> None:
        import ray

        self.name, self.log_path = name, Path(log_path)
        self.child = None
        self.stopping = False
        ctx = ray.get_runtime_context()
        self.node_id, self.ip = ctx.get_node_id(), ray.util.get_node_ip_address()
        with warnings.catch_warnings():  # Ray's own property calls a deprecated one of its own
            warnings.simplefilter("ignore")
            restarted = ctx.was_current_actor_reconstructed
        if restarted:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with self.log_path.open("a") as f:
                f.write(f"async-or1: Ray restarted the actor of {name} on node {self.node_id[:12]} ({self.ip}), "
                        f"pid {os.getpid()}\n")

    def __repr__(self) -> str:  # Ray prefixes the output it forwards from this actor with it
        return self.name.replace(" ", "_")

    def where(self) -> dict:
        return {"node_id": self.node_id, "ip": self.ip, "hostname": socket.gethostname(), "pid": os.getpid()}

    def free_ports(self, n: int) -> list[int]:
        return free_ports(self.ip, n)

    def check(self, paths: list[str], sandbox: dict | None) -> str | None:
        """Why this node cannot run its process (None: it can): a path of the run it does not see
        (output_dir, model and data must be on a shared file system), or a code sandbox short of
        ``rewards.code_isolation`` here."""
        missing = [p for p in paths if not Path(p).exists()]
        if missing:
            return (f"node {self.ip} ({socket.gethostname()}) does not see {', '.join(missing)}: output_dir, the "
                    "model and the data must be on a file system every Ray node mounts at the same path")
        if sandbox is not None:
            from async_or1.config import config_from_dict
            from async_or1.launch import check_code_sandbox

            try:
                check_code_sandbox(config_from_dict(sandbox["config"]), sandbox["train_files"])
            except SystemExit as e:
                return f"node {self.ip}: {e}"
        return None

    async def run(self, args: list[str], env: dict, devices: str | None, kind: str, to_terminal: bool,
                  restart_on_failure: bool) -> int:
        """Run ``python args...`` to its end; its exit code. With ``restart_on_failure``, a failed
        exit that no ``stop`` asked for ends this actor too, so that Ray restarts it."""
        from async_or1.launch.local import Child
        from async_or1.launch_spec import child_env

        self.stopping = False
        # Started from the event loop's thread, which lives as long as the actor: the child's death
        # signal follows the thread that forked it.
        self.child = Child(self.name, [sys.executable, *args], {**child_env(devices, kind), **env}, self.log_path,
                           stdout_to_terminal=to_terminal)
        self.child.start()
        while (rc := self.child.poll()) is None:
            await asyncio.sleep(0.2)
        if rc != 0 and restart_on_failure and not self.stopping:
            with self.log_path.open("a") as f:
                f.write(f"async-or1: {self.name} exited with {rc}; ending its actor so that Ray restarts it\n")
            os._exit(1)
        return rc

    async def stop(self, sig: int) -> None:
        self.stopping = True
        if self.child is not None:
            self.child.signal(sig)

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _demands(cfg: Any, kind: str) -> tuple[dict, dict]:
    """(one learner rank's bundle, one generator's resources) in Ray's resource names."""
    la, gpu = cfg.launch, kind == "cuda"
    learner = {"CPU": la.ray_learner_cpus, "GPU": 1 if gpu else 0, **la.ray_learner_resources}
    gen_gpus = (cfg.generation.sglang_tp_size if cfg.generation.engine == "sglang" else 1) if gpu else 0
    generator = {"CPU": la.ray_generator_cpus, "GPU": gen_gpus, **la.ray_generator_resources}
    return ({k: v for k, v in learner.items() if v}, {k: v for k, v in generator.items() if v})


def connect(cfg: Any) -> dict:
    """Join the Ray cluster and wait (up to ``launch.ray_start_timeout_s``) until, in total, it has
    what the run asks for. GPU clusters (any node with a GPU) run each learner rank and generator
    on GPUs; else all on CPU cores."""
    ray = _ray()
    try:
        ray.init(address=cfg.launch.ray_address, namespace="async-or1", log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise SystemExit(f"launch.ray_address={cfg.launch.ray_address}: cannot join a Ray cluster ({e}). Start one "
                         "with `ray start --head` (and `ray start --address HEAD:PORT` on the other nodes), or "
                         "see `async-or1 slurm`.") from None
    world, gens = max(1, len(cfg.learner.devices)), cfg.generation.num_generators
    deadline, said = time.monotonic() + cfg.launch.ray_start_timeout_s, False
    while True:  # nodes may still be joining (a cluster brought up inside a Slurm job): wait for them
        total = ray.cluster_resources()
        kind = "cuda" if total.get("GPU", 0) > 0 else "cpu"
        learner, generator = _demands(cfg, kind)
        need: dict[str, float] = {}
        for res, n in ((learner, world), (generator, gens)):
            for k, v in res.items():
                need[k] = need.get(k, 0) + v * n
        short = {k: (v, total.get(k, 0)) for k, v in need.items() if v > total.get(k, 0) + 1e-9}
        if not short:
            break
        what = (", ".join(f"{k} needed {v:g}, cluster has {t:g}" for k, (v, t) in short.items())
                + f" ({world} learner rank(s) × {learner}, {gens} generator(s) × {generator}; launch.ray_* set them)")
        if time.monotonic() > deadline:
            ray.shutdown()
            raise SystemExit(f"the Ray cluster is too small for this run: {what}")
        if not said:
            print(f"async-or1: waiting up to launch.ray_start_timeout_s={cfg.launch.ray_start_timeout_s:.0f} s for "
                  f"the Ray cluster to grow: {what}", file=sys.stderr, flush=True)
            said = True
        time.sleep(2.0)
    return {"kind": kind, "learner": learner, "generator": generator}


def _absolute(inputs: dict) -> dict:
    """Paths as every node sees them (the launcher's working directory means nothing elsewhere)."""
    out = dict(inputs)
    for k in ("model_path", "tokenizer_path"):
        if Path(out[k]).exists():
            out[k] = str(Path(out[k]).resolve())
    for k in ("train_files", "eval_files"):
        out[k] = [str(Path(f).resolve()) for f in out[k]]
    return out


def _wait(ray: Any, refs: list, timeout_s: float, what: str) -> list:
    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise SystemExit(f"Ray did not place {what} within launch.ray_start_timeout_s={timeout_s:.0f} s: the "
                         f"cluster lacks free resources for it (see `ray status`)") from None


def run(cluster: dict, cfg: Any, inputs: dict, run_dir: Path, resume: bool) -> int:
    """Place, start and supervise the run's processes on the cluster; the learner's exit code
    (130 on Ctrl-C or SIGTERM, as the local backend)."""
    ray = _ray()
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from async_or1.launch import build_spec
    from async_or1.launch.local import generator_args, learner_args, rank_env
    from async_or1.launch_spec import write_spec

    kind, timeout_s = cluster["kind"], cfg.launch.ray_start_timeout_s
    run_dir = run_dir.resolve()
    logs = run_dir / "logs"
    world, n_gens = max(1, len(cfg.learner.devices)), cfg.generation.num_generators
    host_cls = ray.remote(ProcessHost)

    def actor_options(res: dict) -> dict:
        extra = {k: v for k, v in res.items() if k not in ("CPU", "GPU")}
        return {"num_cpus": res.get("CPU", 0), "num_gpus": res.get("GPU", 0), "resources": extra or None}

    pg = placement_group([cluster["learner"]] * world, strategy="PACK", name=f"async-or1-{cfg.name}-learner")
    learners, gens = [], []
    try:
        _wait(ray, [pg.ready()], timeout_s, f"the {world} learner rank(s) ({cluster['learner']} each)")
        for r in range(world):
            learners.append(host_cls.options(
                **actor_options(cluster["learner"]), max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r),
            ).remote(f"learner rank {r}", str(logs / f"learner_{r}.log")))
        for g in range(n_gens):
            gens.append(host_cls.options(
                **actor_options(cluster["generator"]), max_restarts=cfg.generation.max_restarts, max_task_retries=0,
            ).remote(f"generator {g}", str(logs / f"generator_{g}.log")))
        where_l = _wait(ray, [a.where.remote() for a in learners], timeout_s, "the learner ranks")
        where_g = _wait(ray, [a.where.remote() for a in gens], timeout_s,
                        f"{n_gens} generator(s) ({cluster['generator']} each)")

        # Every address and port is the learner rank 0 node's, picked there.
        head = where_l[0]["ip"]
        zmq_port, weights_port, master_port = ray.get(learners[0].free_ports.remote(3))
        t = cfg.transport
        placed = replace(cfg, transport=replace(t, host=head, learner_address=head, port=t.port or zmq_port,
                                                weights_port=t.weights_port or weights_port))
        inputs = _absolute(inputs)
        spec = build_spec(placed, inputs, run_dir, kind=kind, learner_master_port=master_port)
        spec["keys_dir"] = str(Path(spec["keys_dir"]).resolve())
        spec_path = run_dir / "launch.json"
        write_spec(spec_path, spec)
        placement = {"learner": [{"rank": r, **w} for r, w in enumerate(where_l)],
                     "generators": [{"id": g, **w} for g, w in enumerate(where_g)]}
        _write_placement(run_dir, placement)

        paths = [str(spec_path), inputs["model_path"], *inputs["train_files"]]
        sandbox = ({"config": spec["config"], "train_files": inputs["train_files"]}
                   if "code" in cfg.data.abilities else None)
        # Learner rank 0 reads the held-out rows too: the evaluations are its eval leases.
        problems = [p for p in ray.get([a.check.remote(paths + list(inputs["eval_files"]), None) for a in learners]
                                       + [a.check.remote(paths, sandbox) for a in gens]) if p]
        if problems:
            raise SystemExit("async-or1: refusing to start: " + "; ".join(sorted(set(problems))))

        # Each learner rank's torch.distributed variables, as torchrun would set them on its node.
        local_rank: dict[str, int] = {}
        learner_env = []
        for r, w in enumerate(where_l):
            lr = local_rank[w["node_id"]] = local_rank.get(w["node_id"], -1) + 1
            per_node = sum(x["node_id"] == w["node_id"] for x in where_l)
            # On GPUs Ray shows each rank's actor only its own GPU, so it is device 0 there.
            learner_env.append(rank_env(r, world, head, master_port, kind, 0 if kind == "cuda" else lr, per_node))

        def pin(devices: list, i: int) -> str | None:
            return devices[i] if devices and kind == "cpu" else None  # Ray assigns GPUs

        def start_learner(r: int) -> Any:
            env = {**_socket_ifname(where_l[r]["ip"]), **learner_env[r]}
            return learners[r].run.remote(learner_args(spec_path, resume), env, pin(cfg.learner.devices, r), kind,
                                          r == 0, False)

        def start_generator(g: int, ip: str) -> Any:
            return gens[g].run.remote(generator_args(spec_path, g), _socket_ifname(ip), pin(cfg.generation.devices, g),
                                      kind, False, True)

        print(f"async-or1: run {run_dir} on Ray: {world} learner rank(s) on "
              f"{sorted({w['ip'] for w in where_l})}, {n_gens} generator(s) on {sorted({w['ip'] for w in where_g})}, "
              f"mode {cfg.mode} (max_staleness {cfg.max_staleness}); logs in {logs}", flush=True)
        running = {start_learner(r): ("learner", r) for r in range(world)}
        running.update({start_generator(g, where_g[g]["ip"]): ("generator", g) for g in range(n_gens)})
        return _supervise(ray, cfg, learners, gens, running, start_generator, placement, run_dir)
    finally:
        for a in learners + gens:
            ray.kill(a, no_restart=True)
        remove_placement_group(pg)
        ray.shutdown()


def _socket_ifname(ip: str) -> dict:
    """Gloo and NCCL on the interface of the address Ray placed the process at (unless the user chose)."""
    name = interface_of(ip)
    return {k: os.environ.get(k, name) for k in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")}


def _write_placement(run_dir: Path, placement: dict) -> None:
    tmp = run_dir / "ray_placement.json.tmp"
    tmp.write_text(json.dumps(placement, indent=1))
    tmp.replace(run_dir / "ray_placement.json")


def _supervise(ray: Any, cfg: Any, learners: list, gens: list, running: dict, start_generator: Any,
               placement: dict, run_dir: Path) -> int:
    """Until learner rank 0 ends: restart generators Ray brought back, stop on a learner's death,
    Ctrl-C or SIGTERM (what ``ray job stop`` sends) stops in order as the local backend does."""
    from async_or1.launch.local import take_stop_signals

    grace_s, max_restarts = cfg.learner.stop_grace_s, cfg.generation.max_restarts
    restarts = [0] * len(gens)
    take_stop_signals()
    try:
        while True:
            done, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
            for ref in done:
                role, i = running.pop(ref)
                rc, why = _outcome(ray, ref)
                if role == "learner":
                    if rc == 0:
                        if i == 0:
                            return _finish(ray, learners, gens, running)
                        continue
                    print(f"async-or1: learner rank {i} {why}; stopping the run. Last log lines "
                          f"({run_dir / 'logs' / f'learner_{i}.log'}):\n{_tail(ray, learners[i], run_dir, f'learner_{i}')}"
                          f"\nContinue it with --resume.", file=sys.stderr)
                    _stop(ray, learners, gens, running, grace_s)
                    return rc or 1
                if rc == 0:
                    continue  # told to stop by the learner
                if restarts[i] >= max_restarts:
                    print(f"async-or1: generator {i} {why}, {restarts[i] + 1} times; stopping the run. Last log "
                          f"lines:\n{_tail(ray, gens[i], run_dir, f'generator_{i}')}", file=sys.stderr)
                    _stop(ray, learners, gens, running, grace_s)
                    return 1
                restarts[i] += 1
                where = _restarted(ray, gens[i], cfg.launch.ray_start_timeout_s)
                if isinstance(where, str):
                    print(f"async-or1: generator {i} {why} and Ray did not bring its actor back ({where}); "
                          "stopping the run", file=sys.stderr)
                    _stop(ray, learners, gens, running, grace_s)
                    return 1
                placement["generators"][i] = {"id": i, **where, "restarts": restarts[i]}
                _write_placement(run_dir, placement)
                print(f"async-or1: generator {i} {why}; Ray restarted its actor on {where['ip']} "
                      f"({restarts[i]}/{max_restarts}), its process starts again; its prompts are re-issued",
                      file=sys.stderr, flush=True)
                running[start_generator(i, where["ip"])] = ("generator", i)
    except KeyboardInterrupt:
        print(f"async-or1: interrupted; stopping (learners checkpoint first, up to learner.stop_grace_s="
              f"{grace_s:.0f} s). Continue with --resume.", file=sys.stderr)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the checkpoint short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _stop(ray, learners, gens, running, grace_s)
        return 130


def _restarted(ray: Any, actor: Any, timeout_s: float) -> dict | str:
    """Where Ray placed ``actor`` again once it is back (its restart may take a while: the old
    process is reaped, a new one placed wherever resources are free); why not, as text."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get(actor.where.remote(), timeout=max(1.0, deadline - time.monotonic()))
        except ray.exceptions.ActorUnavailableError:  # restarting: ask again
            if time.monotonic() > deadline:
                return f"still unavailable after launch.ray_start_timeout_s={timeout_s:.0f} s"
            time.sleep(1.0)
        except ray.exceptions.GetTimeoutError:
            return f"not placed within launch.ray_start_timeout_s={timeout_s:.0f} s"
        except ray.exceptions.RayActorError as e:
            return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


def _outcome(ray: Any, ref: Any) -> tuple[int | None, str]:
    try:
        rc = ray.get(ref)
        return rc, f"exited with {rc}"
    except ray.exceptions.RayActorError as e:
        return None, f"lost its actor ({type(e).__name__}: {str(e).splitlines()[0][:200]})"


def _tail(ray: Any, actor: Any, run_dir: Path, name: str) -> str:
    try:
        return ray.get(actor.tail.remote(), timeout=10)
    except Exception:  # the actor is gone: its log is on the shared file system
        try:
            return "\n".join((run_dir / "logs" / f"{name}.log").read_text(errors="replace").splitlines()[-30:])
        except OSError:
            return ""


def _wait_for(ray: Any, running: dict, role: str, timeout_s: float) -> None:
    refs = [r for r, (who, _) in running.items() if who == role]
    if refs:
        ray.wait(refs, num_returns=len(refs), timeout=timeout_s)


def _finish(ray: Any, learners: list, gens: list, running: dict) -> int:
    """Learner rank 0 ended the run: the other ranks end with it, generators were told to stop."""
    _wait_for(ray, running, "learner", 60)
    _wait_for(ray, running, "generator", 30)
    _signal(ray, gens, signal.SIGTERM)
    _wait_for(ray, running, "generator", 10)
    return 0


def _signal(ray: Any, actors: list, sig: int) -> None:
    """Signal each actor's process; an actor already gone has nothing to signal."""
    for ref in [a.stop.remote(sig) for a in actors]:
        try:
            ray.get(ref, timeout=30)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass


def _stop(ray: Any, learners: list, gens: list, running: dict, grace_s: float) -> None:
    """Learners first (they checkpoint on SIGTERM, then tell the generators to stop), then generators."""
    _signal(ray, learners, signal.SIGTERM)
    _wait_for(ray, running, "learner", grace_s)
    if any(who == "learner" and not ray.wait([r], timeout=0)[0] for r, (who, _) in running.items()):
        print(f"async-or1: learners still running after {grace_s:.0f} s: killed; a checkpoint being written is "
              "left as a .tmp directory, which --resume ignores", file=sys.stderr)
        _signal(ray, learners, signal.SIGKILL)
    _signal(ray, gens, signal.SIGTERM)
    _wait_for(ray, running, "generator", 30)
    _signal(ray, gens, signal.SIGKILL)
