"""stockapp: ClientApp, as in Flower's PyTorch quickstart."""

import time

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from stockapp.task import Net, load_data
from stockapp.task import train as train_fn

app = ClientApp()


@app.train()
def train(msg: Message, context: Context):
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    partition_id = context.node_config["partition-id"]
    num_partitions = context.node_config["num-partitions"]
    trainloader = load_data(
        partition_id, num_partitions, context.run_config["batch-size"], context.node_config["data-path"]
    )
    started = time.perf_counter()
    train_loss = train_fn(
        model,
        trainloader,
        context.run_config["local-epochs"],
        msg.content["config"]["lr"],
        context.run_config["momentum"],
        device,
    )
    metrics = {
        "train_loss": train_loss,
        "num-examples": len(trainloader.dataset),
        "train-seconds": time.perf_counter() - started,
    }
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)
