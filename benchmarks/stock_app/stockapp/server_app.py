"""stockapp: ServerApp, as in Flower's PyTorch quickstart, plus a timing record for the benchmark."""

import json
import os
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from stockapp.task import Net, load_centralized_dataset, test

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    out_dir = Path(cfg["out-dir"] or f"runs/{context.run_id}")
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(42)
    arrays = ArrayRecord(Net().state_dict())
    strategy = FedAvg(
        fraction_evaluate=cfg["fraction-evaluate"],
        min_train_nodes=cfg["min-nodes"],
        min_available_nodes=cfg["min-nodes"],
    )
    rounds, last = [], [0.0]

    def global_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = Net()
        model.load_state_dict(arrays.to_torch_state_dict())
        device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
        loss, accuracy = test(model, load_centralized_dataset(cfg["data-path"]), device)
        now = time.perf_counter()
        if server_round > 0:
            train_metrics = result_holder.get(server_round, {})
            rounds.append(
                {
                    "round": server_round,
                    "round_seconds": now - last[0],
                    "eval_loss": loss,
                    "eval_accuracy": accuracy,
                    **train_metrics,
                }
            )
            _save(out_dir, context.run_id, rounds, "running")
        last[0] = now
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    result_holder: dict[int, dict] = {}
    original_aggregate = strategy.aggregate_train

    def aggregate_train(server_round, replies):
        replies = list(replies)
        seconds = [float(m.content["metrics"]["train-seconds"]) for m in replies if not m.has_error()]
        agg_arrays, agg_metrics = original_aggregate(server_round, replies)
        result_holder[server_round] = {
            "train_loss": float(agg_metrics["train_loss"]) if agg_metrics else float("nan"),
            "client_train_seconds": seconds,
            "participating_clients": len(seconds),
        }
        return agg_arrays, agg_metrics

    strategy.aggregate_train = aggregate_train
    strategy.start(
        grid=grid,
        initial_arrays=arrays,
        train_config=ConfigRecord({"lr": cfg["learning-rate"]}),
        num_rounds=cfg["num-server-rounds"],
        evaluate_fn=global_evaluate,
    )
    _save(out_dir, context.run_id, rounds, "completed")


def _save(out_dir: Path, run_id: int, rounds: list, status: str) -> None:
    tmp = out_dir / f".history.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"run_id": run_id, "rounds": rounds, "status": status}))
    os.replace(tmp, out_dir / "history.json")
