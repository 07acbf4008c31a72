"""``fedcifar run``: a local federation, from the checks before anything starts to the summary at its end."""

from __future__ import annotations

import argparse
import signal
import time
from pathlib import Path

from fedcifar.cli.common import APP_DIR, add_shared_network, console, interrupt, own_network
from fedcifar.cli.progress import follow_with_progress, print_summary
from fedcifar.config import RunConfig, app_defaults, parse_overrides

LOCAL_MLFLOW_STORE = "sqlite:///mlflow.db"  # MLflow's own default store, which `mlflow ui` opens


def add_parser(sub) -> None:
    run = sub.add_parser("run", help="run a local federation (SuperLink + SuperNodes as processes)")
    run.add_argument("--clients", type=int, default=None, help="number of SuperNodes (default 2)")
    run.add_argument("--rounds", type=int, default=None, help="rounds (default: num-server-rounds)")
    run.add_argument(
        "--data", help="CIFAR-10 folder (parquet or cifar-10-batches-py); default $FEDCIFAR_DATA or the hub"
    )
    where = run.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, help="output folder (default: a new folder under runs/)")
    where.add_argument(
        "--resume",
        type=Path,
        metavar="DIR",
        help="continue the run whose outputs are in DIR after its last completed round",
    )
    run.add_argument(
        "-c",
        "--run-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a [tool.flwr.app.config] value, e.g. -c learning-rate=0.05",
    )
    run.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="server metrics port; client i uses PORT+1+i (default: free ports)",
    )
    run.add_argument(
        "--linger",
        type=float,
        default=0.0,
        help="keep the federation and its metrics endpoints up this many seconds after the run",
    )
    run.add_argument("--app", type=Path, default=APP_DIR, help="Flower app folder (default: this project)")
    run.add_argument(
        "--insecure",
        action="store_true",
        help="plain HTTP and no SuperNode authentication (default: TLS with a throwaway CA, signed nodes); "
        "without authentication a node is whoever it claims to be",
    )
    add_shared_network(run)
    track = run.add_argument_group("experiment tracking (MLflow; the ServerApp's alone, never sent to a node)")
    track.add_argument(
        "--mlflow",
        nargs="?",
        const=LOCAL_MLFLOW_STORE,
        metavar="URI",
        help="track the run in MLflow: a tracking server's URI (credentials from MLFLOW_TRACKING_USERNAME, "
        "MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN), or without one "
        f"{LOCAL_MLFLOW_STORE} (open it with `mlflow ui` in this folder)",
    )
    track.add_argument("--mlflow-experiment", default=None, help="the MLflow experiment (default fedcifar)")
    track.add_argument("--mlflow-model", default=None, help="the registered model (default fedcifar-cifar10)")
    track.add_argument(
        "--mlflow-per-slot",
        action="store_true",
        help="also each slot's train loss, examples and seconds, by site: un-noised figures of each site's "
        "data, refused under central DP",
    )
    run.set_defaults(handler=cmd_run)


def cmd_run(args: argparse.Namespace, _extra: list[str]) -> int:
    from fedcifar.local import isolation
    from fedcifar.local.federation import FederationError, LocalFederation

    signal.signal(signal.SIGTERM, interrupt)  # a stop request cleans up like Ctrl-C

    said = isolation.inside()  # what the checks below say was said once, before the private network
    app_dir = args.app.resolve()
    if not (app_dir / "pyproject.toml").is_file():
        raise FileNotFoundError(f"{app_dir} holds no pyproject.toml: pass --app with the fedcifar project folder")
    defaults = app_defaults(app_dir)
    overrides = parse_overrides(args.run_config)  # checked with the defaults below, before anything starts
    if args.rounds is not None:
        overrides["num-server-rounds"] = args.rounds
    data_arg = args.data
    if args.resume:
        out_dir = args.resume.resolve()
        history = resumed_history(out_dir)
        overrides = {**history["config"], "resume": True, **overrides}
        clients = args.clients if args.clients is not None else overrides.get("num-partitions") or 2
        if not data_arg and (data_arg := recorded_data(history)) and not said:
            console.print(f"data: {data_arg}, as recorded in {out_dir / 'history.json'} (--data PATH overrides it)")
    else:
        out_dir = (args.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S")).resolve()
        if (out_dir / "model.pt").exists():
            raise ValueError(
                f"{out_dir} holds a run already: continue it with --resume {out_dir}, or pick another --out"
            )
        clients = args.clients if args.clients is not None else 2
        overrides = {**federation_defaults(clients), **overrides}
    if clients < 1:
        raise ValueError(f"--clients must be >= 1, got {clients}")
    overrides["out-dir"] = str(out_dir)
    config = RunConfig.from_flower({**defaults, **overrides})
    server_env = tracking_env(args, config)
    if args.resume:
        done = check_resumable(out_dir, config)
        if not said:
            console.print(f"resuming {out_dir} after round {done} of {config.num_server_rounds}")
    from fedcifar.data import load_split, resolve_source  # torch: after the checks above, which need none

    source = resolve_source(data_arg)  # refuse a bad path before starting anything
    load_split(source, "test")  # ... and data that is not CIFAR-10, or a Hub out of reach
    data = source.location if source.kind != "hub" else None
    own_network(args, data_arg, metrics_ports(args.metrics_port, clients) or [0] * (clients + 1))
    metrics_sockets = isolation.inherited_metrics_sockets()
    network = "a private network" if isolation.inside() else "this machine's loopback, open to every local user"
    console.print(
        f"fedcifar: {clients} SuperNodes on {network}, {config.num_server_rounds} rounds, "
        f"{config.partitioner} partitions, data {source.describe()}, outputs in {out_dir}"
    )
    fed = LocalFederation(
        clients=clients,
        app_dir=app_dir,
        work_dir=out_dir,
        data=data,
        metrics_ports=None if metrics_sockets else metrics_ports(args.metrics_port, clients),
        metrics_sockets=metrics_sockets,
        signed=not args.insecure,
        server_env=server_env,
    )
    if args.insecure:
        console.print(
            "[yellow]--insecure:[/] plain HTTP and no SuperNode authentication: any local process can act as any "
            "node, and the SuperLink's Fleet guard cannot tell them apart"
        )
    try:
        with fed:
            console.print(
                f"metrics: server http://127.0.0.1:{fed.metrics_ports[0]}/metrics, clients "
                + ", ".join(str(p) for p in fed.metrics_ports[1:])
            )
            run_id = fed.submit(overrides)
            history = follow_with_progress(fed, run_id, out_dir, config.num_server_rounds)
            fed.sample_memory()
            if args.linger > 0:
                console.print(f"keeping the federation up {args.linger:.0f}s (--linger)")
                time.sleep(args.linger)
    except FederationError as err:
        console.print(f"[bold red]federation failed:[/] {err}\nlogs: {out_dir / 'logs'}")
        if (out_dir / "model.pt").exists():
            console.print(f"completed rounds are checkpointed: continue with fedcifar run --resume {out_dir}")
        return 1
    print_summary(history, fed.peak_rss, out_dir)
    return 0


def tracking_env(args: argparse.Namespace, config: RunConfig) -> dict[str, str]:
    """The ServerApp's MLflow settings (``server/tracking.py``), or a refusal of what could not work."""
    import os

    from fedcifar.local.federation import SERVER_ONLY_ENV

    if not args.mlflow:
        if args.mlflow_experiment or args.mlflow_model or args.mlflow_per_slot:
            raise ValueError("--mlflow-experiment, --mlflow-model and --mlflow-per-slot need --mlflow [URI]")
        return {}
    from fedcifar.server.tracking import per_slot_refusal

    if refusal := per_slot_refusal(args.mlflow_per_slot, config.dp):
        raise ValueError(f"--mlflow-per-slot: {refusal}; leave it out")
    uri = args.mlflow
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):  # relative: to this folder
        uri = f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    if uri.startswith(("http://", "https://")) and not args.shared_network:
        raise ValueError(
            f"--mlflow {uri}: the federation runs in a private network namespace, out of reach of a tracking "
            "server; add --shared-network, or track to a local store (--mlflow without a URI)"
        )
    # the user's MLflow credentials and settings (FEDCIFAR_MLFLOW_FLUSH_SECONDS too), for the ServerApp alone
    env = {k: v for k, v in os.environ.items() if k.startswith(SERVER_ONLY_ENV)} | {"MLFLOW_TRACKING_URI": uri}
    settings = {
        "FEDCIFAR_MLFLOW_EXPERIMENT": args.mlflow_experiment,
        "FEDCIFAR_MLFLOW_MODEL": args.mlflow_model,
        "FEDCIFAR_MLFLOW_PER_SLOT": "1" if args.mlflow_per_slot else None,
    }
    return env | {k: v for k, v in settings.items() if v}


def resumed_history(out_dir: Path) -> dict:
    """The history of the run in ``out_dir``, to resume it (its run config, its data source)."""
    from fedcifar.server.history import load_history

    history = load_history(out_dir) if out_dir.is_dir() else None
    if history is None:
        raise FileNotFoundError(f"{out_dir} holds no history.json: nothing to resume; start a run with --out {out_dir}")
    return history


def recorded_data(history: dict) -> str | None:
    """The data folder a run was started with (``history.json``'s ``data``: ``parquet:PATH``,
    ``cifar-python:PATH`` or ``hub:...``); None for the Hub."""
    kind, _, location = str(history.get("data", "")).partition(":")
    return location if kind in ("parquet", "cifar-python") and location else None


def check_resumable(out_dir: Path, config: RunConfig) -> int:
    """Refuse, before anything starts, what the ServerApp would refuse: a bad checkpoint, nothing left to do;
    return the last completed round."""
    from fedcifar.server.checkpoint import check_same_training, load_checkpoint
    from fedcifar.server.stopping import early_stop
    from fedcifar.task import Net

    checkpoint = load_checkpoint(out_dir, Net().state_dict())  # a corrupt one is refused here, untouched
    if checkpoint:
        check_same_training(checkpoint, config.training_fingerprint(), out_dir)
    done, rounds = (checkpoint.round if checkpoint else 0), config.num_server_rounds
    if done >= rounds:
        raise ValueError(
            f"the run in {out_dir} completed {done} of {rounds} rounds: pass --rounds N (> {done}) to train further"
        )
    stopped = (checkpoint.history.get("stopped") or {}) if checkpoint else {}
    if stopped.get("reason") == "privacy_budget":  # max-epsilon is kept by a resume: the next release is over it
        raise ValueError(f"the run in {out_dir} stopped after round {stopped['round']}: {stopped['detail']}")
    accuracies = [r["eval_accuracy"] for r in checkpoint.history["rounds"]] if checkpoint else []
    if stop := early_stop(config, accuracies):
        raise ValueError(
            f"the run in {out_dir} stops after round {stop.round}: {stop.detail}; change stop-target-accuracy or "
            "stop-patience (-c) to train further"
        )
    return done


def federation_defaults(clients: int) -> dict:
    """Wait for all local SuperNodes, and check they split the data the same way (-c overrides)."""
    return {"min-nodes": clients, "num-partitions": clients}


def metrics_ports(base: int | None, clients: int) -> list[int] | None:
    return None if base is None else [base + i for i in range(clients + 1)]
