"""The resilient round loop (fedcifar/server/rounds.py) with real Flower messages, over a Grid whose
nodes answer from a script: bad replies never reach the aggregate, failures and refusals are
counted by slot and site, dead nodes are skipped, slots are bound to keys, and robust strategies
aggregate what passed the checks."""

from __future__ import annotations

import json
import math
import threading
import time

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedcifar.config import ConfigError, RunConfig
from fedcifar.server import rounds
from fedcifar.server.history import CHECKPOINT_FILE, History, RoundRecord
from fedcifar.server.polling import PollingGrid
from fedcifar.server.recorder import PHASES
from fedcifar.server.rounds import RoundFailed
from fedcifar.task import MODEL_KEY, flat_weights, initial_model
from tests.hostile import evaluate_reply
from tests.scripted import SILENT, ScriptedGrid, by_kind, counter, loop_for, sends, train_round, trained

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture
def model() -> np.ndarray:
    return flat_weights(initial_model(0))


def test_bad_replies_never_reach_the_average(tmp_path, model):
    loop = loop_for(
        tmp_path,
        {
            11: trained(0, scale=2.0),
            12: sends("NaN", 1),
            13: trained(0, scale=3.0),  # slot 0 a second time
            14: sends("a count of 1e18", 2),
        },
    )
    aggregate, tally = train_round(loop, model)
    first = 2.0 if loop.ledger.slot_of.get(11) == 0 else 3.0  # Flower samples nodes in random order: first in wins
    np.testing.assert_allclose(aggregate, model * first, rtol=1e-6)
    assert counter(loop, "rejected_updates", partition="1", site="unknown", reason="non_finite") == 1
    assert counter(loop, "rejected_updates", partition="0", site="unknown", reason="duplicate_partition") == 1
    assert counter(loop, "rejected_updates", partition="2", site="unknown", reason="too_many_examples") == 1
    assert [a.slot for a in tally.accepted] == [0]
    assert sorted(r["reason"] for r in tally.refusals) == ["duplicate_partition", "non_finite", "too_many_examples"]


def test_a_claim_outside_the_run_becomes_no_label(tmp_path, model):
    loop = loop_for(tmp_path, {11: trained(0), 12: sends("a slot out of range", 0)})
    train_round(loop, model)
    assert counter(loop, "rejected_updates", partition="unknown", site="unknown", reason="bad_metrics") == 1


def test_an_unforeseen_error_while_checking_a_reply_refuses_that_reply_only(tmp_path, model, monkeypatch):
    check = rounds.CHECKS["train"]

    def fragile(content, *args):
        if content["metrics"]["partition-id"] == 1:
            raise RuntimeError("a defect of the check")
        return check(content, *args)

    monkeypatch.setitem(rounds.CHECKS, "train", fragile)
    loop = loop_for(tmp_path, {11: trained(0), 12: trained(1)})
    aggregate, tally = train_round(loop, model)
    assert [a.slot for a in tally.accepted] == [0] and [r["reason"] for r in tally.refusals] == ["unreadable"]
    np.testing.assert_allclose(aggregate, model * 2.0, rtol=1e-6)


def test_missing_and_failed_replies_are_counted_by_slot(tmp_path, model):
    script = {11: trained(0), 12: trained(1)}
    loop = loop_for(tmp_path, script)
    train_round(loop, model)
    script.update({12: lambda m: SILENT, 13: lambda m: "ClientApp crashed", 14: lambda m: "Node Unavailable"})
    _, tally = train_round(loop, model)
    assert [a.slot for a in tally.accepted] == [0] and tally.failures == 3  # each missing reply once
    assert counter(loop, "failures", partition="1", site="unknown", reason="timeout") == 1  # node 12 was slot 1
    assert counter(loop, "failures", partition="unknown", site="unknown", reason="error") == 2  # 13, 14 never answered


def test_a_dead_node_replaced_by_a_newer_one_gets_no_more_messages(tmp_path, model):
    """Node 12 (slot 1) dies; it restarts as node 13. Flower lists 12 for a minute more."""
    script = {11: trained(0), 12: trained(1)}
    loop = loop_for(tmp_path, script)
    train_round(loop, model)
    sent: list[int] = []
    script.update({12: lambda m: sent.append(12), 13: trained(1)})
    train_round(loop, model)
    assert counter(loop, "failures", partition="1", site="unknown", reason="timeout") == 1
    sent.clear()
    train_round(loop, model)
    assert sent == []  # 12 was skipped: slot 1 answers from 13
    # a node that failed without a successor for its slot is still tried
    script.update({11: lambda m: sent.append(11)})
    train_round(loop, model)
    train_round(loop, model)
    assert sent == [11, 11]


def test_a_round_without_any_sound_update_is_retried_then_fails(tmp_path, model):
    calls = []
    loop = loop_for(
        tmp_path, {11: lambda m: calls.append(1), 12: sends("one value declared as the model", 1)}, round_retries=1
    )
    with pytest.raises(RoundFailed, match="round 1 aggregated no client update in 2 attempts"):
        train_round(loop, model)
    assert len(calls) == 2 and counter(loop, "failed_round_attempts") == 2


class LateNodes(ScriptedGrid):
    """Node 12 connects only after ``hidden`` looks at the node list (a pod restarting)."""

    def __init__(self, script: dict, hidden: int) -> None:
        super().__init__(script)
        self.hidden = hidden

    def get_nodes(self):
        self.hidden -= 1
        return [n for n in super().get_nodes() if self.hidden < 0 or n.node_id != 12]


@pytest.mark.parametrize("retries", [0, 1])
def test_too_few_nodes_cost_an_attempt_not_the_run(tmp_path, model, retries):
    script = {11: trained(0), 12: trained(1)}
    loop = loop_for(tmp_path, script, min_nodes=2, round_retries=retries)
    loop.grid = PollingGrid(LateNodes(script, hidden=2), 0.01)  # connects after attempt 1's wait
    if retries == 0:
        with pytest.raises(RoundFailed, match="aggregated no client update in 1 attempts"):
            train_round(loop, model)
    else:
        aggregate, tally = train_round(loop, model)
        assert tally.attempts == 2 and sorted(a.slot for a in tally.accepted) == [0, 1]
        np.testing.assert_allclose(aggregate, model * 2.0, rtol=1e-6)
    assert counter(loop, "failed_round_attempts") == 1


def test_a_node_cannot_answer_for_a_slot_its_key_is_not_bound_to(tmp_path, model):
    """Keys registered as <site>/slot-<k>: node 13 (site-b's slot 2) claims slot 0 and answers first."""
    loop = loop_for(
        tmp_path,
        {13: trained(0, scale=100.0), 11: trained(0, scale=2.0)},
        names={11: "site-a/slot-0", 13: "site-b/slot-2"},
    )
    aggregate, tally = train_round(loop, model)
    np.testing.assert_allclose(aggregate, model * 2.0, rtol=1e-6)  # the honest one
    assert counter(loop, "rejected_updates", partition="2", site="site-b", reason="wrong_slot") == 1
    assert [(a.slot, a.site) for a in tally.accepted] == [(0, "site-a")]
    assert 13 not in loop.ledger.slot_of  # the impostor's claim never becomes its slot: 11 is not superseded


def test_zero_series_exist_for_every_slot_once_it_answered(tmp_path, model):
    loop = loop_for(tmp_path, {11: trained(0), 12: trained(1)}, names={11: "site-a/slot-0", 12: "site-b/slot-1"})
    with pytest.raises(KeyError):
        counter(loop, "failures", partition="1", site="site-b", reason="timeout")
    train_round(loop, model)
    assert counter(loop, "failures", partition="1", site="site-b", reason="timeout") == 0
    assert counter(loop, "rejected_updates", partition="0", site="site-a", reason="non_finite") == 0


def test_evaluate_replies_are_checked_too(tmp_path, model):
    loop = loop_for(
        tmp_path,
        {
            11: by_kind(trained(0), lambda m: evaluate_reply(0, eval_accuracy=0.4)),
            12: by_kind(trained(1), lambda m: evaluate_reply(1, eval_accuracy=0.8)),
            13: by_kind(trained(2), sends("no examples", 2)),
        },
        fraction_evaluate=1.0,
        num_server_rounds=1,
    )
    loop.run(ArrayRecord({MODEL_KEY: Array(model)}), 1)
    record = loop.recorder.history.rounds[0]
    assert record.client_eval_accuracy == pytest.approx(0.6)  # 0 and 1 (20 examples each), not 2
    assert record.refusals == [{"slot": "2", "site": "unknown", "reason": "bad_metrics", "kind": "evaluate"}]
    assert record.partitions == [0, 1, 2] and record.rejected_updates == 1


def test_the_run_records_every_round_from_the_aggregate(tmp_path, model):
    loop = loop_for(
        tmp_path, {11: trained(0, examples=100), 12: trained(1, scale=4.0, examples=50)}, num_server_rounds=2
    )
    final = loop.run(ArrayRecord({MODEL_KEY: Array(model)}), 1)[MODEL_KEY].numpy()
    after_one = model * (100 * 2.0 + 50 * 4.0) / 150
    np.testing.assert_allclose(loop.model.seen[1], after_one, rtol=1e-5)  # seen[0]: before any round
    np.testing.assert_allclose(final, after_one * (100 * 2.0 + 50 * 4.0) / 150, rtol=1e-5)
    assert [r.round for r in loop.recorder.history.rounds] == [1, 2]
    assert (tmp_path / "model.pt").exists() and (tmp_path / "history.json").exists()


@pytest.mark.parametrize(
    "strategy, kept", [("fedavg", (2.0 + 2.1 + 2.3 + 0.0) / 4), ("fedmedian", (2.0 + 2.1) / 2), ("krum", 2.1)]
)
def test_a_robust_strategy_leaves_a_well_formed_zero_update_out(tmp_path, model, strategy, kept):
    """Zeros with a plausible count pass every check: FedAvg averages them in, FedMedian takes the
    middle values, Krum the update closest to its neighbours (the 2.1 one)."""
    script = {
        11: trained(0, scale=2.0),
        12: trained(1, scale=2.1),
        13: trained(2, scale=2.3),
        14: trained(3, scale=0.0),
    }
    loop = loop_for(tmp_path, script, strategy=strategy, num_partitions=4)
    aggregate, tally = train_round(loop, model)
    assert len(tally.accepted) == 4 and not tally.refusals
    np.testing.assert_allclose(aggregate, model * kept, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"strategy": "bulyan", "num_partitions": 6, "num_malicious_nodes": 1}, "Bulyan needs at least 4f \\+ 3 = 7"),
        ({"strategy": "krum", "num_partitions": 4, "num_malicious_nodes": 1}, "at least 2f \\+ 3 = 5"),
        ({"strategy": "fedtrimmedavg", "num_partitions": 2}, "trims nothing from 2 replies"),
        ({"strategy": "fedmedian", "num_partitions": 2}, "a median of fewer than 3 replies is their mean"),
        ({"strategy": "fedmedian", "num_partitions": 4, "fraction_train": 0.5}, "asks 2 node"),
        (
            {"strategy": "multikrum", "num_partitions": 5, "num_nodes_to_select": 5, "num_malicious_nodes": 1},
            "num-nodes-to-select \\(5\\) \\+ num-malicious-nodes \\(1\\)",
        ),
        ({"strategy": "fedsgd"}, "strategy' must be one of fedavg, fedprox, .*, bulyan, got 'fedsgd'"),
        ({"trim_beta": 0.5}, "trim-beta must be in \\[0, 0.5\\)"),
    ],
)
def test_a_strategy_the_run_cannot_carry_out_is_refused_at_start(config, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(**config).check()
    RunConfig(strategy="bulyan", num_partitions=7, num_malicious_nodes=1).check()
    RunConfig(strategy="fedtrimmedavg", num_partitions=5, trim_beta=0.2).check()


def test_a_node_without_a_slot_key_cannot_take_a_slot_that_a_key_holds(tmp_path, model):
    """With authentication, keys registered under other names (or beyond the run's slots) bind no slot
    of the run: such a node may answer only for slots no key holds."""
    names = {11: "site-a/slot-0", 12: "site-b/supernode-7", 13: "site-c/slot-9"}
    loop = loop_for(tmp_path, {12: trained(0, scale=9.0), 11: trained(0), 13: trained(2)}, names=names)
    aggregate, tally = train_round(loop, model)
    np.testing.assert_allclose(aggregate, model * 2.0, rtol=1e-6)
    assert [(a.slot, a.site) for a in tally.accepted] == [(0, "site-a")]
    assert sorted((r["slot"], r["reason"]) for r in tally.refusals) == [("0", "wrong_slot"), ("unknown", "wrong_slot")]


def test_an_aggregate_without_a_finite_test_loss_never_becomes_the_global_model(tmp_path, model):
    """Well-formed replies near the float32 limit pass every check; their aggregate is evaluated while
    the next round trains from it: that round's replies are dropped and the round is tried again."""
    calls = []

    def huge_once(m):
        calls.append(1)
        return trained(1, scale=1e36)(m) if len(calls) == 1 else trained(1)(m)

    loop = loop_for(tmp_path, {11: trained(0), 12: huge_once}, round_retries=1, num_server_rounds=2)
    final = loop.run(ArrayRecord({MODEL_KEY: Array(model)}), 1)
    rounds = loop.recorder.history.rounds
    assert [(r.round, r.attempts) for r in rounds] == [(1, 2), (2, 1)]
    assert counter(loop, "failed_round_attempts") == 1
    assert len(calls) == 4  # round 1 twice, round 2 from the unusable aggregate (dropped), round 2
    assert all(math.isfinite(r.eval_loss) for r in rounds)
    np.testing.assert_allclose(final[MODEL_KEY].numpy(), model * 4.0, rtol=1e-6)  # round 2 from round 1's retry
    checkpoint = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    np.testing.assert_allclose(checkpoint["model"][MODEL_KEY].numpy(), model * 4.0, rtol=1e-6)


def test_the_aggregate_is_evaluated_while_the_next_round_trains_from_it(tmp_path, model):
    """Round 1's evaluation waits here until round 2's message is out; round 2's node waits for round
    1's checkpoint: a round is recorded once evaluated, not once the next round's replies are in."""
    round_2_sent, checkpointed = threading.Event(), []

    def node(m):
        if int(m.content["config"]["server-round"]) == 2:
            round_2_sent.set()
            deadline = time.monotonic() + 5
            while not (tmp_path / CHECKPOINT_FILE).exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            checkpointed.append(torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)["round"])
        return trained(0)(m)

    loop = loop_for(tmp_path, {11: node}, num_server_rounds=2)
    evaluate, overlapped = loop.model.evaluate, []

    def evaluation(arrays):
        if len(loop.model.seen) == 1:  # round 1's aggregate (the first call: the initial model)
            overlapped.append(round_2_sent.wait(timeout=5))
        return evaluate(arrays)

    loop.model.evaluate = evaluation
    loop.run(ArrayRecord({MODEL_KEY: Array(model)}), 1)
    assert overlapped == [True] and checkpointed == [1]
    assert [(r.round, r.eval_loss) for r in loop.recorder.history.rounds] == [(1, 1.0), (2, 1.0)]


def test_with_federated_evaluation_the_nodes_evaluate_only_a_global_model(tmp_path, model):
    """fraction-evaluate > 0: the server's test loss comes first (no overlap), so an unusable aggregate
    is never sent for evaluation, and no honest node's evaluation of it is refused."""
    calls, evaluated = [], []

    def node(m):
        if m.metadata.message_type == "train":
            calls.append(1)
            return trained(0, scale=1e36 if len(calls) == 1 else 2.0)(m)
        evaluated.append(float(np.abs(m.content["arrays"][MODEL_KEY].numpy()).max()))
        return evaluate_reply(0)

    loop = loop_for(tmp_path, {11: node}, round_retries=1, fraction_evaluate=1.0, num_server_rounds=2)
    loop.run(ArrayRecord({MODEL_KEY: Array(model)}), 1)
    rounds = loop.recorder.history.rounds
    assert [(r.round, r.attempts, r.refusals) for r in rounds] == [(1, 2, []), (2, 1, [])]
    assert len(calls) == 3 and len(evaluated) == 2 and max(evaluated) < 1e30


def test_a_round_records_where_its_time_went(tmp_path, model):
    """history.json's phase_seconds: each phase's seconds, a retried attempt's included."""
    calls = []

    def slow_huge_once(m):
        if m.metadata.message_type == "train":
            calls.append(1)
            time.sleep(0.1)  # the node's training, inside the exchange
            return trained(0, scale=1e36 if len(calls) == 1 else 2.0)(m)
        return evaluate_reply(0)

    loop = loop_for(tmp_path, {11: slow_huge_once}, round_retries=1, fraction_evaluate=1.0, num_server_rounds=1)
    loop.run(ArrayRecord({MODEL_KEY: Array(model)}), 1)
    record = loop.recorder.history.rounds[0]
    assert record.attempts == 2 and set(record.phase_seconds) == set(PHASES)
    assert record.phase_seconds["exchange"] >= 0.2  # both attempts' exchanges
    # the round ends when the next one may start: its last evaluation runs beside that one
    assert sum(s for phase, s in record.phase_seconds.items() if phase != "evaluate") <= record.round_seconds
    saved = json.loads((tmp_path / "history.json").read_text())
    assert saved["rounds"][0]["phase_seconds"] == pytest.approx(record.phase_seconds)


def test_a_reply_flower_cannot_read_costs_that_reply(tmp_path, model):
    class Unreadable(ScriptedGrid):
        def pull_messages(self, ids):
            if any(self.inbox[i].metadata.src_node_id == 12 for i in ids if i in self.inbox):
                raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "a node's malformed object")
            return super().pull_messages(ids)

    loop = loop_for(tmp_path, {11: trained(0), 12: trained(1)})
    loop.grid = PollingGrid(Unreadable(loop.grid._grid.script), 0.01)
    aggregate, tally = train_round(loop, model)
    assert [a.slot for a in tally.accepted] == [0] and tally.failures == 1  # node 12: no reply
    np.testing.assert_allclose(aggregate, model * 2.0, rtol=1e-6)


def test_federated_evaluation_that_fails_costs_the_round_nothing(tmp_path, model):
    def fails(m):
        if m.metadata.message_type == "evaluate":
            raise RuntimeError("the SuperLink went away")
        return trained(0)(m)

    loop = loop_for(tmp_path, {11: fails}, fraction_evaluate=1.0, num_server_rounds=1, num_partitions=1)
    loop.run(ArrayRecord({MODEL_KEY: Array(model)}), 1)
    record = loop.recorder.history.rounds[0]
    assert record.partitions == [0] and record.client_eval_loss is None


def test_losses_near_the_float_limit_are_averaged_without_overflow_and_saved_as_json(tmp_path, model):
    """A diverged client's honest loss (1e308) is accepted, never refused; the round's
    example-weighted means stay finite in history.json (strict JSON) and in Prometheus."""
    huge = 1e308

    def diverged(slot: int, examples: int):
        evaluate = lambda m: evaluate_reply(slot, eval_loss=huge, **{"num-examples": examples})  # noqa: E731
        return by_kind(trained(slot, examples=examples, train_loss=huge), evaluate)

    loop = loop_for(tmp_path, {11: diverged(0, 40), 12: diverged(1, 20)}, fraction_evaluate=1.0, num_server_rounds=1)
    loop.run(ArrayRecord({MODEL_KEY: Array(model)}), 1)
    record = loop.recorder.history.rounds[0]
    assert record.partitions == [0, 1] and not record.refusals
    assert record.train_loss == pytest.approx(huge) and record.client_eval_loss == pytest.approx(huge)
    saved = json.loads((tmp_path / "history.json").read_text(), parse_constant=not_json)
    assert saved["rounds"][0]["train_loss"] == pytest.approx(huge)
    assert saved["rounds"][0]["client_eval_loss"] == pytest.approx(huge)
    assert math.isfinite(loop.metrics.train_loss._value.get())


def test_a_figure_that_is_not_finite_is_saved_as_null(tmp_path):
    history = History(run_id=1, config={}, data="test", device="cpu", initial_eval_loss=float("inf"))
    history.rounds.append(
        RoundRecord(1, float("nan"), float("inf"), 0.1, 1.0, 0, [], 0, 0, 0, client_eval_loss=float("-inf"))
    )
    history.save(tmp_path)
    saved = json.loads((tmp_path / "history.json").read_text(), parse_constant=not_json)
    assert saved["initial_eval_loss"] is None
    assert (saved["rounds"][0]["train_loss"], saved["rounds"][0]["eval_loss"]) == (None, None)
    assert saved["rounds"][0]["client_eval_loss"] is None


def not_json(constant: str):
    raise ValueError(f"history.json holds {constant}, which is not JSON")
