"""Runs that end before ``num-server-rounds`` (fedcifar/server/stopping.py): early stopping on the
server's own test accuracy, never a client's figure, and the privacy budget (``max-epsilon``), which
no noised release may overspend, thrown-away attempts included; a resume of a stopped run trains no
further. The round loop runs over scripted nodes (tests/scripted.py)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch
from flwr.app import Array, ArrayRecord
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

from fedcifar.config import ConfigError, RunConfig
from fedcifar.server.checkpoint import load_checkpoint
from fedcifar.server.history import History, load_history
from fedcifar.server.privacy import PrivacyAccount
from fedcifar.server.rounds import RoundLoop
from fedcifar.server.stopping import early_stop
from fedcifar.task import MODEL_KEY
from tests.hostile import evaluate_reply
from tests.scripted import ScriptedGrid, by_kind, counter, loop_for
from tests.test_strategies import NODES, RUN, START

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.mark.parametrize(
    "accuracies, rule, stop",
    [
        ([0.1, 0.2, 0.35, 0.5], {"stop_target_accuracy": 0.3}, ("target_accuracy", 3)),
        ([0.1, 0.2, 0.29], {"stop_target_accuracy": 0.3}, None),
        # best round 2 (0.3): 0.305 is no gain above stop-min-delta 0.01, so rounds 3 and 4 are two without one
        ([0.1, 0.3, 0.305, 0.29], {"stop_patience": 2, "stop_min_delta": 0.01}, ("patience", 4)),
        ([0.1, 0.3, 0.305], {"stop_patience": 2, "stop_min_delta": 0.01}, None),
        ([0.1, 0.3, 0.305, 0.29], {"stop_patience": 2}, None),  # without min-delta 0.305 is the new best
        ([0.5, 0.4, 0.3, 0.2], {}, None),  # off by default
    ],
)
def test_the_rules(accuracies, rule, stop):
    """Asked after each round, as the loop asks: the first round that ends the run."""
    stops = [found for k in range(1, len(accuracies) + 1) if (found := early_stop(RunConfig(**rule), accuracies[:k]))]
    assert ((stops[0].reason, stops[0].round) if stops else None) == stop


@pytest.mark.parametrize(
    "config, message",
    [
        ({"max_epsilon": 5.0}, "a privacy budget is kept only under central DP"),
        ({"max_epsilon": 5.0, "dp": "local"}, "a privacy budget is kept only under central DP"),
        ({"max_epsilon": -1.0}, "'max-epsilon' must be in [0, inf)"),
        ({"stop_target_accuracy": 1.5}, "'stop-target-accuracy' must be in [0, 1]"),
        ({"stop_patience": -1}, "'stop-patience' must be >= 0"),
    ],
)
def test_settings_that_cannot_hold_are_refused(config, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        RunConfig(**config).check()


def scored(loop: RoundLoop, accuracies: list[float]) -> None:
    """The server's evaluation gives ``accuracies`` in turn (the initial model's first: 0)."""
    given, evaluate = iter([0.0, *accuracies]), loop.model.evaluate  # which keeps the model for the checkpoint
    loop.model.evaluate = lambda arrays: (evaluate(arrays)[0], next(given))


def test_the_run_stops_at_the_target_on_the_servers_accuracy_not_on_what_a_client_reports(tmp_path):
    # every node reports a perfect accuracy from its own evaluation: that must not stop the run
    flatterers = {
        n: by_kind(train, lambda m, s=slot: evaluate_reply(s, eval_accuracy=1.0))
        for slot, (n, train) in enumerate(NODES.items())
    }
    RUN.update(num_partitions=3, fraction_evaluate=1.0)
    loop = loop_for(
        tmp_path, flatterers, num_server_rounds=10, round_timeout=5.0, fraction_evaluate=1.0, stop_target_accuracy=0.3
    )
    scored(loop, [0.1, 0.2, 0.35, 0.5])
    loop.run(ArrayRecord({MODEL_KEY: Array(START)}), 1)
    RUN.clear()
    history = loop.recorder.history
    assert [r.round for r in history.rounds] == [1, 2, 3]
    assert [r.client_eval_accuracy for r in history.rounds] == [1.0] * 3  # the clients' figure, never read
    assert history.stopped["reason"] == "target_accuracy" and history.stopped["round"] == 3
    assert "test accuracy 0.3500 >= stop-target-accuracy=0.3" in history.stopped["detail"]
    assert load_history(tmp_path)["stopped"] == history.stopped  # history.json says it
    assert counter(loop, "runs_stopped_early", reason="target_accuracy") == 1


def test_a_run_that_reached_its_target_stops_without_waiting_for_nodes_that_left(tmp_path):
    """Round 1 reaches the target while round 2 waits for nodes (they left): the run stops at once,
    not after round-timeout, and no attempt fails."""
    RUN.update(num_partitions=3)
    loop = loop_for(tmp_path, NODES, num_server_rounds=3, round_timeout=30.0, stop_target_accuracy=0.4)
    scored(loop, [0.5])
    scripted, asked = loop.grid._grid, []
    # the nodes list the round loop asks for: every node for round 1, none after
    scripted.get_nodes = lambda: [] if asked.append(1) or len(asked) > 1 else ScriptedGrid.get_nodes(scripted)
    started = time.monotonic()
    loop.run(ArrayRecord({MODEL_KEY: Array(START)}), 1)
    RUN.clear()
    assert time.monotonic() - started < 10
    assert [r.round for r in loop.recorder.history.rounds] == [1]
    assert loop.recorder.history.stopped["reason"] == "target_accuracy"
    assert counter(loop, "failed_round_attempts") == 0


def test_the_run_stops_after_the_patience_and_a_resume_with_the_same_rule_trains_no_further(tmp_path):
    sent = []
    nodes = {n: (lambda m, t=train: sent.append(m.metadata.message_type) or t(m)) for n, train in NODES.items()}
    RUN.update(num_partitions=3)
    rule = {"stop_patience": 2, "stop_min_delta": 0.01}
    loop = loop_for(tmp_path, nodes, num_server_rounds=10, round_timeout=5.0, **rule)
    scored(loop, [0.1, 0.3, 0.305, 0.29, 0.6])
    loop.run(ArrayRecord({MODEL_KEY: Array(START)}), 1)
    assert [r.round for r in loop.recorder.history.rounds] == [1, 2, 3, 4]
    assert len(sent) == 5 * 3  # round 5 trained while round 4 was evaluated: its replies were dropped
    assert loop.recorder.history.stopped["reason"] == "patience"
    assert "the best is round 2's 0.3000" in loop.recorder.history.stopped["detail"]

    sent.clear()
    again = resumed(tmp_path, nodes, num_server_rounds=10, **rule)
    assert sent == [] and again.recorder.history.stopped["round"] == 4  # stopped at once, nothing sent
    further = resumed(tmp_path, nodes, run=False, num_server_rounds=6, stop_patience=5, stop_min_delta=0.01)
    scored(further, [0.4, 0.7])
    further.run(ArrayRecord({MODEL_KEY: Array(START)}), 5)  # another rule trains further, as asked
    RUN.clear()
    assert [r.round for r in further.recorder.history.rounds] == [1, 2, 3, 4, 5, 6]
    assert further.recorder.history.stopped is None and len(sent) == 2 * 3


def epsilon_after(releases: int, **config) -> float:
    accountant = PrivacyAccount(RunConfig(num_partitions=3, **config)).accountant
    accountant.compose(GaussianPrivacyEvent(config["noise_multiplier"], 3, 3), releases)
    return float(accountant.get_privacy_spent().epsilon)


def test_no_release_spends_past_the_budget_thrown_away_attempts_count_and_a_resume_releases_nothing(tmp_path):
    dp = {"dp": "server-fixed", "noise_multiplier": 1.5, "clipping_norm": 1.0}
    # round 1 releases twice (its first aggregate is thrown away), round 2 once: a 4th release is over
    budget = (epsilon_after(3, **dp) + epsilon_after(4, **dp)) / 2
    config = {**dp, "round_retries": 1, "max_epsilon": budget}
    RUN.update(num_partitions=3, **config)
    sent = []
    nodes = {n: (lambda m, t=train: sent.append(m.metadata.message_type) or t(m)) for n, train in NODES.items()}
    loop = loop_for(tmp_path, nodes, num_server_rounds=5, round_timeout=5.0, **config)
    evaluations, evaluate = [], loop.model.evaluate

    def first_aggregate_unusable(arrays):
        evaluations.append(evaluate(arrays))
        return (float("inf"), 0.0) if len(evaluations) == 2 else (1.0, 0.5)

    loop.model.evaluate = first_aggregate_unusable
    loop.run(ArrayRecord({MODEL_KEY: Array(START)}), 1)
    history = loop.recorder.history
    assert [r.round for r in history.rounds] == [1, 2] and [r.attempts for r in history.rounds] == [2, 1]
    assert len(loop.privacy.releases) == 3
    # round 2 trained once from round 1's unusable aggregate (dropped unreleased); round 3 asked no node
    assert len(sent) == 4 * 3
    assert history.rounds[-1].epsilon == pytest.approx(epsilon_after(3, **dp)) and history.rounds[-1].epsilon <= budget
    assert history.stopped["reason"] == "privacy_budget" and history.stopped["round"] == 2
    assert f"epsilon={epsilon_after(4, **dp):.4g}, above max-epsilon={budget:g}" in history.stopped["detail"]
    assert counter(loop, "runs_stopped_early", reason="privacy_budget") == 1

    sent.clear()
    again = resumed(tmp_path, nodes, num_server_rounds=5, **config)
    RUN.clear()
    assert sent == [] and len(again.privacy.releases) == 3  # the resume released nothing
    assert again.recorder.history.stopped["reason"] == "privacy_budget"


def resumed(out: Path, script: dict, run: bool = True, **config) -> RoundLoop:
    """What ``server_app.main`` does with ``resume = true`` (history, strategy state, privacy record)."""
    checkpoint = load_checkpoint(out, {MODEL_KEY: torch.zeros(START.size)})
    loop = loop_for(out, script, round_timeout=5.0, **config)
    loop.recorder.history = History.from_dict(checkpoint.history)
    loop.recorder.history.resumed(2, checkpoint.round, loop.config.to_flower())
    loop.privacy.resume(checkpoint.privacy_state)
    if run:
        loop.run(ArrayRecord({MODEL_KEY: Array(checkpoint.model[MODEL_KEY].numpy())}), checkpoint.round + 1)
    return loop
