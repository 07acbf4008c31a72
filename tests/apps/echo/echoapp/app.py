"""Echo: the ServerApp sends a large array to every SuperNode; the ClientApp sends it back."""

import time

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()


@client.train()
def echo(msg: Message, _context: Context) -> Message:
    return Message(content=msg.content, reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    deadline = time.monotonic() + 60
    while len(nodes := list(grid.get_node_ids())) < int(context.run_config["min-nodes"]):
        if time.monotonic() > deadline:
            raise RuntimeError("no SuperNode connected within 60 s")
        time.sleep(0.2)
    payload = np.random.default_rng(0).random(int(context.run_config["size-mib"]) * 2**18, dtype=np.float32)
    content = RecordDict({"echo": ArrayRecord({"payload": Array(payload)})})
    replies = list(grid.send_and_receive([Message(content, node, "train") for node in nodes], timeout=120))
    if len(replies) != len(nodes):
        raise RuntimeError(f"{len(replies)} of {len(nodes)} replies")
    for reply in replies:
        if reply.has_error():
            raise RuntimeError(f"node {reply.metadata.src_node_id}: {reply.error}")
        if not np.array_equal(reply.content["echo"]["payload"].numpy(), payload):
            raise RuntimeError(f"node {reply.metadata.src_node_id} sent back other bytes")
    print(f"echo: {payload.nbytes} bytes there and back from {len(replies)} node(s)", flush=True)
