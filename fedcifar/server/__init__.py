"""The ServerApp's parts (``server_app.py`` wires them together).

- ``rounds.py``: the resilient round loop around one of Flower's strategies;
- ``strategies.py``: which strategy (``strategy`` run config) and its parameters;
- ``replies.py``: the checks every reply passes before anything is built from it;
- ``ledger.py``: which node holds which slot, for which site; failures and refusals by slot;
- ``recorder.py``: a round's figures, to the checkpoint, ``history.json`` and Prometheus;
- ``polling.py``: the Grid's send-and-receive, polled finely and ended early.
"""
