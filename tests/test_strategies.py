"""Flower's strategies and differential-privacy wrappers through the resilient round loop, over a
scripted Grid with real Flower messages: each composes with the loop, a run resumed from its
checkpoint ends where the uninterrupted run ends, a failed attempt leaves no trace in the
strategy's state, and central DP adds the noise its accounting assumes."""

from __future__ import annotations

import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

from fedcifar.config import CENTRAL_DP, ConfigError, RunConfig
from fedcifar.flower.clipping import clip_zero_updates
from fedcifar.server.checkpoint import CheckpointError, load_checkpoint
from fedcifar.server.history import load_history
from fedcifar.server.privacy import RELEASES_FILE, PrivacyAccount
from fedcifar.server.recorder import RoundTally
from fedcifar.server.rounds import RoundLoop
from fedcifar.server.strategies import build_strategy, restore_strategy_state
from fedcifar.strategies import LOSS_BEFORE_TRAINING, STRATEGIES
from fedcifar.task import MODEL_KEY, flat_weights, initial_model
from tests.hostile import evaluate_reply, train_reply
from tests.scripted import SILENT, by_kind, loop_for

pytestmark = pytest.mark.usefixtures("task_identity", "serverapp_tuning")


@pytest.fixture
def serverapp_tuning():
    """What ``tune("serverapp")`` changes in Flower's DP code, as in the ServerApp."""
    clip_zero_updates()


START = flat_weights(initial_model(0))
TARGETS = [np.random.default_rng(slot).normal(0, 0.1, START.size).astype(np.float32) for slot in range(3)]


def node(slot: int, examples: int = 100, pull: float = 0.3):
    """A node whose training moves the model a fixed part of the way to its own optimum; it clips
    its update when the server's DP wrapper sends a clipping norm (as Flower's mods do) and reports
    what the run's strategy and DP ask for."""

    def answer(message):
        config = message.content["config"]
        model = message.content["arrays"][MODEL_KEY].numpy()
        update = pull * (TARGETS[slot] - model)
        norm = float(np.linalg.norm(update))
        extra = {LOSS_BEFORE_TRAINING: float(np.linalg.norm(TARGETS[slot] - model)), "norm_bit": 0}
        if "clipping_norm" in config:
            extra["norm_bit"] = int(norm > config["clipping_norm"])
            update = update * min(1.0, config["clipping_norm"] / norm)
        run = RunConfig(**RUN)  # what the script's run asks every reply to carry
        wanted = {k: v for k, v in extra.items() if (k == LOSS_BEFORE_TRAINING) == (run.strategy == "qfedavg")}
        if run.dp != "client-adaptive":
            wanted.pop("norm_bit", None)
        return train_reply(model + update, slot, examples=examples, **wanted)

    return answer


RUN: dict = {}
NODES = {11: node(0, 100), 12: node(1, 150), 13: node(2, 200)}
CONFIGS = {
    "fedavg": {},
    "fedprox": {"strategy": "fedprox", "proximal_mu": 0.1},
    "fedadam": {"strategy": "fedadam", "eta": 0.05},
    "fedyogi": {"strategy": "fedyogi", "eta": 0.05},
    "fedadagrad": {"strategy": "fedadagrad", "eta": 0.05},
    "fedavgm": {"strategy": "fedavgm", "server_momentum": 0.9},
    "qfedavg": {"strategy": "qfedavg", "q": 0.2},
    "dp server-fixed": {"dp": "server-fixed", "noise_multiplier": 0.5, "clipping_norm": 1.0},
    "dp server-adaptive": {"dp": "server-adaptive", "noise_multiplier": 0.2, "clipping_norm": 1.0},
    "dp client-fixed": {"dp": "client-fixed", "noise_multiplier": 0.5, "clipping_norm": 1.0},
    "dp client-adaptive": {"dp": "client-adaptive", "noise_multiplier": 0.2, "clipping_norm": 1.0},
}
# what carries state of its own between rounds (the others: only the random states, restored always)
STATEFUL = {"fedadam", "fedyogi", "fedadagrad", "fedavgm", "dp server-adaptive", "dp client-adaptive"}


def run_loop(tmp_path, rounds: int, **config) -> tuple[RoundLoop, np.ndarray]:
    loop = loop_for(tmp_path, NODES, num_server_rounds=rounds, round_timeout=5.0, **config)
    arrays = loop.run(ArrayRecord({MODEL_KEY: Array(START)}), 1)
    return loop, arrays[MODEL_KEY].numpy()


def resume(killed: Path, rounds: int, restore_state: bool = True, **config) -> np.ndarray:
    """The killed run resumed (from a copy of its folder, so that every resume starts from the same one)."""
    out = Path(tempfile.mkdtemp(dir=killed.parent))
    shutil.copytree(killed, out, dirs_exist_ok=True)
    loop = resumed_loop(out, NODES, restore_state, num_server_rounds=rounds, **config)
    return loop.final[MODEL_KEY].numpy()


@pytest.fixture
def run_config(request):
    RUN.clear()
    RUN.update({"num_partitions": 3, **CONFIGS[request.param]})
    yield dict(CONFIGS[request.param])
    RUN.clear()


@pytest.mark.parametrize("run_config", list(CONFIGS), indirect=True)
def test_a_resumed_run_ends_where_the_uninterrupted_run_ends(tmp_path, run_config, request, monkeypatch):
    name = request.node.callspec.id
    # the noise is drawn afresh for every release (the next test): here the k-th release's noise is
    # the same in every run, so that the runs can be compared
    monkeypatch.setattr(PrivacyAccount, "fresh_noise", lambda self: np.random.seed(len(self.releases)))
    _, uninterrupted = run_loop(tmp_path / "whole", 4, **run_config)
    assert not np.allclose(uninterrupted, START)  # it trained
    run_loop(tmp_path / "killed", 2, **run_config)  # "killed" after round 2: its checkpoint is all that is left
    np.random.seed(99)  # a new process
    resumed = resume(tmp_path / "killed", 4, **run_config)
    np.testing.assert_allclose(resumed, uninterrupted, rtol=1e-5, atol=1e-7)
    if name in STATEFUL:  # the test can fail: without the strategy's state the run goes elsewhere
        assert not np.allclose(resume(tmp_path / "killed", 4, restore_state=False, **run_config), uninterrupted)
    if name.startswith("dp "):  # and without the record of the releases, the privacy spent is unknown
        (tmp_path / "killed" / RELEASES_FILE).unlink()
        with pytest.raises(CheckpointError, match="record of every noised release"):
            resume(tmp_path / "killed", 4, **run_config)


def test_a_failed_attempt_leaves_no_trace_in_the_strategys_state(tmp_path):
    """FedAvgM's momentum after an attempt whose aggregate was thrown away (test loss inf) is the
    momentum before it: the retried round and the rest of the run match a run without the fault."""
    config = {"strategy": "fedavgm", "server_momentum": 0.9, "round_retries": 1}
    RUN.update(num_partitions=3, **config)
    _, clean = run_loop(tmp_path / "clean", 3, **config)
    calls = {"n": 0}
    honest = NODES[11]

    def overflows_once(message):  # finite float32 values whose aggregate the network cannot use
        calls["n"] += 1
        reply = honest(message)
        if calls["n"] == 1:  # round 1, first attempt: FedAvgM's momentum and model were unset before it
            model = message.content["arrays"][MODEL_KEY].numpy()
            reply = train_reply(np.full_like(model, 3e38), 0, examples=100)
        return reply

    loop = loop_for(
        tmp_path / "faulty", {**NODES, 11: overflows_once}, num_server_rounds=3, round_timeout=5.0, **config
    )
    faulty = loop.run(ArrayRecord({MODEL_KEY: Array(START)}), 1)[MODEL_KEY].numpy()
    RUN.clear()
    assert [r.attempts for r in loop.recorder.history.rounds] == [2, 1, 1]
    np.testing.assert_allclose(faulty, clean, rtol=1e-6)


def test_central_dp_averages_over_the_slots_with_equal_weights_and_noises_for_them(tmp_path):
    """The mean the noise is scaled for: the clipped updates of the run's slots, a slot without a
    reply counting as an update of zeros, every reply weighing the same (DP-FedAvg's fixed
    denominator); the noise's stdev is noise-multiplier x clipping-norm / slots."""
    z, norm = 1.0, 4.0
    RUN.update(num_partitions=3, dp="server-fixed")

    def moved(slot: int, examples: int, by: float):
        return lambda m: train_reply(m.content["arrays"][MODEL_KEY].numpy() + by, slot, examples=examples)

    script = {11: moved(0, 100, 0.0), 12: moved(1, 200, 0.0), 13: lambda m: SILENT}
    loop = loop_for(tmp_path, script, dp="server-fixed", noise_multiplier=z, clipping_norm=norm)
    np.random.seed(0)
    noise = _train_once(loop) - START  # both updates are zero (clipped to themselves): the rest is noise
    assert np.std(noise) == pytest.approx(z * norm / 3, rel=0.02)

    script = {11: moved(0, 100, 1e-3), 12: moved(1, 200, 4e-3), 13: lambda m: SILENT}
    loop = loop_for(tmp_path, script, dp="server-fixed", noise_multiplier=1e-9, clipping_norm=1e3)
    mean = _train_once(loop) - START
    np.testing.assert_allclose(mean, (1e-3 + 4e-3 + 0) / 3, rtol=1e-3)  # not (100 * 1 + 200 * 4) / 300 / 1e3
    RUN.clear()


def test_adaptive_clipping_raises_the_norm_when_more_is_clipped_and_noises_at_the_norm_used(tmp_path):
    """Flower 1.42 moved the norm the wrong way and scaled the noise by the moved norm."""
    config = {"dp": "server-adaptive", "noise_multiplier": 0.2, "clipping_norm": 0.01, "clip_norm_lr": 1.0}
    RUN.update(num_partitions=3, **config)
    loop, _ = run_loop(tmp_path / "clipped", 3, **config)  # every update (norm ~7) is clipped
    norms = [r.clipping_norm for r in loop.recorder.history.rounds]
    assert norms[0] == 0.01 and norms[0] < norms[1] < norms[2]

    unchanged = {
        n: (lambda slot: lambda m: train_reply(m.content["arrays"][MODEL_KEY].numpy(), slot))(i)
        for i, n in enumerate(NODES)
    }
    config |= {"clipping_norm": 5.0}
    loop = loop_for(tmp_path / "none", unchanged, **config)
    np.random.seed(0)
    noise = _train_once(loop) - START  # nothing clipped: the norm falls by e^-0.5 after this round
    assert loop.strategy.clipping_norm < 5.0 * 0.7
    assert np.std(noise) == pytest.approx(loop.strategy.noise_multiplier * 5.0 / 3, rel=0.02)  # the norm used
    RUN.clear()


def _train_once(loop: RoundLoop) -> np.ndarray:
    return loop.train(1, ArrayRecord({MODEL_KEY: Array(START)}), RoundTally()).aggregated[MODEL_KEY].numpy()


def test_the_privacy_spent_is_reported_every_round_and_counts_every_release(tmp_path):
    config = {"dp": "server-fixed", "noise_multiplier": 1.5, "clipping_norm": 1.0, "round_retries": 1}
    RUN.update(num_partitions=3, **config)
    loop = loop_for(tmp_path, NODES, num_server_rounds=3, round_timeout=5.0, **config)
    evaluations = []

    def first_aggregate_unusable(arrays):  # round 1's first aggregate is thrown away after its release
        evaluations.append(arrays)
        return (float("inf"), 0.0) if len(evaluations) == 2 else (1.0, 0.5)

    loop.model.evaluate = first_aggregate_unusable
    loop.run(ArrayRecord({MODEL_KEY: Array(START)}), 1)
    RUN.clear()
    rounds = loop.recorder.history.rounds
    assert [r.attempts for r in rounds] == [2, 1, 1]
    reference = PrivacyAccount(RunConfig(num_partitions=3, **config)).accountant
    for releases, record in zip((2, 1, 1), rounds, strict=True):
        reference.compose(GaussianPrivacyEvent(1.5, 3, 3), releases)
        assert record.epsilon == pytest.approx(reference.get_privacy_spent().epsilon)
        assert record.clipping_norm == 1.0
    assert loop.metrics.dp_epsilon._value.get() == pytest.approx(rounds[2].epsilon)


def test_adaptive_clipping_accounts_both_of_its_releases():
    """The clipped count (sensitivity 1) and the model: one Gaussian mechanism below the run's multiplier."""
    config = RunConfig(num_partitions=20, dp="server-adaptive", noise_multiplier=1.5)
    strategy = build_strategy(config)
    account = PrivacyAccount.of(strategy, config)
    expected = (strategy.noise_multiplier**-2 + strategy.clipped_count_stddev**-2) ** -0.5
    assert account.noise_multiplier == pytest.approx(expected) and expected < 1.5
    assert (
        PrivacyAccount.of(build_strategy(RunConfig(num_partitions=20, dp="server-fixed")), config).noise_multiplier
        == 1.0
    )


def test_local_dp_and_no_dp_say_that_epsilon_is_not_computed():
    for dp in ("none", "local"):
        account = PrivacyAccount(RunConfig(num_partitions=3, dp=dp))
        assert account.in_force()["epsilon"].startswith("not computed")
        assert account.release(1, 1) is None
    assert PrivacyAccount(RunConfig(num_partitions=3, dp="server-fixed")).in_force()["epsilon"].startswith("RDP")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"dp": "server-fixed", "strategy": "fedadam"}, "server optimiser would see the un-noised mean"),
        ({"dp": "client-adaptive", "strategy": "fedavgm"}, "server optimiser"),
        ({"dp": "server-fixed", "strategy": "krum", "num_partitions": 0}, "by one update"),
        ({"dp": "server-fixed", "fraction_train": 0.5}, "needs fraction-train=1"),
        ({"dp": "local", "sensitivity": 10.0, "clipping_norm": 10.0}, "noise would be too small"),
        ({"dp": "local", "local_epsilon": 2.0}, "only below 1"),
        ({"dp": "central"}, "'dp' must be one of none, server-fixed"),
        ({"dp": "server-adaptive", "noise_multiplier": 0.5}, "only below replies/10 = 0.3"),
        ({"strategy": "fedadam", "beta_1": 1.0}, "'beta-1' must be in \\[0, 1\\)"),
        ({"strategy": "qfedavg", "q": -1.0}, "'q' must be >= 0"),
    ],
)
def test_settings_that_would_not_hold_are_refused_with_what_would(config, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(**{"num_partitions": 3, **config}).check()


def test_every_central_dp_mode_and_strategy_pair_that_is_accepted_builds():
    built = 0
    for dp in (*CENTRAL_DP, "local", "none"):
        for strategy in STRATEGIES:
            config = RunConfig(num_partitions=9, strategy=strategy, dp=dp, num_malicious_nodes=1, noise_multiplier=0.5)
            try:
                config.check()
            except ConfigError:
                continue
            build_strategy(config)
            built += 1
    assert built == 4 * 2 + 2 * len(STRATEGIES)  # central DP with fedavg and fedprox; local and none with any


def test_under_client_side_clipping_an_unclipped_update_is_refused(tmp_path):
    """The server sent the norm; a node whose update is above it is refused, the others aggregated."""
    RUN.update(num_partitions=3, dp="client-fixed")
    sloppy = {**NODES, 13: lambda m: train_reply(m.content["arrays"][MODEL_KEY].numpy() + 1.0, 2, examples=200)}
    loop = loop_for(tmp_path, sloppy, dp="client-fixed", noise_multiplier=1e-9, clipping_norm=1.0, round_timeout=5.0)
    tally = RoundTally()
    loop.train(1, ArrayRecord({MODEL_KEY: Array(START)}), tally)
    RUN.clear()
    assert [(r["slot"], r["reason"]) for r in tally.refusals] == [("2", "unclipped")]
    assert [a.slot for a in tally.accepted] == [0, 1]


class ServerAppStopped(BaseException):
    """The ServerApp process ending where nothing catches it (killed, out of memory)."""


def test_a_round_released_before_a_crash_gets_fresh_noise_on_resume_and_both_releases_count(tmp_path):
    """With federated evaluation, round 2's noised model reaches the nodes before round 2 is
    checkpointed. The ServerApp stops right there; the resumed run trains round 2 again: its
    release must carry other noise (the same noise would give away the noise-free difference of
    the two aggregates) and epsilon must count the release the nodes already saw."""
    config = {"dp": "server-fixed", "noise_multiplier": 1.0, "clipping_norm": 1.0, "fraction_evaluate": 1.0}
    RUN.update(num_partitions=3, **config)
    released: list[np.ndarray] = []  # round 2's noised model, as a node received it to evaluate

    def nodes(stop: bool) -> dict:
        def evaluate(slot):
            def answer(message):
                if message.content["config"]["server-round"] == 2:
                    released.append(message.content["arrays"][MODEL_KEY].numpy().copy())
                    if stop and slot == 0:
                        raise ServerAppStopped
                return evaluate_reply(slot)

            return answer

        return {n: by_kind(train, evaluate(slot)) for slot, (n, train) in enumerate(NODES.items())}

    with pytest.raises(ServerAppStopped):
        loop_for(tmp_path, nodes(stop=True), num_server_rounds=2, round_timeout=5.0, **config).run(
            ArrayRecord({MODEL_KEY: Array(START)}), 1
        )
    first_release = released[0]
    released.clear()
    loop = resumed_loop(tmp_path, nodes(stop=False), num_server_rounds=2, **config)
    RUN.clear()
    second_release = released[0]
    difference = second_release - first_release  # the same aggregate: what is left is noise
    assert not np.allclose(difference, 0)
    sigma = config["noise_multiplier"] * config["clipping_norm"] / 3  # per release, over 3 slots
    assert np.std(difference) == pytest.approx(np.sqrt(2) * sigma, rel=0.05)
    reference = PrivacyAccount(RunConfig(num_partitions=3, **config)).accountant
    reference.compose(GaussianPrivacyEvent(1.0, 3, 3), 3)  # round 1, round 2 seen by the nodes, round 2 again
    assert loop.recorder.history.rounds[-1].epsilon == pytest.approx(reference.get_privacy_spent().epsilon)


def test_a_serverapp_killed_while_the_next_round_trains_resumes_with_the_same_sampling(tmp_path):
    """fraction-train 0.5: each round samples 2 of the 3 nodes with ``random``. Round 2's evaluation is
    slow, so round 3 has sampled its nodes before round 2 is recorded; the ServerApp dies in round 3's
    exchange. The checkpoint keeps the state round 2 handed over with, so the resumed run samples,
    and ends, as the uninterrupted one."""
    config = {"fraction_train": 0.5}
    RUN.update(num_partitions=3, **config)
    random.seed(3)
    _, uninterrupted = run_loop(tmp_path / "whole", 4, **config)

    def dies_in_round_3(train):
        def answer(message):
            if message.content["config"]["server-round"] == 3:
                raise ServerAppStopped
            return train(message)

        return answer

    random.seed(3)
    loop = loop_for(
        tmp_path / "killed", {n: dies_in_round_3(t) for n, t in NODES.items()}, num_server_rounds=4, **config
    )
    evaluate = loop.model.evaluate
    loop.model.evaluate = lambda arrays: time.sleep(0.3 * (len(loop.model.seen) == 2)) or evaluate(arrays)
    with pytest.raises(ServerAppStopped):
        loop.run(ArrayRecord({MODEL_KEY: Array(START)}), 1)
    assert [r["round"] for r in load_history(tmp_path / "killed")["rounds"]] == [1, 2]
    random.seed(99)  # a new process
    resumed = resume(tmp_path / "killed", 4, **config)
    RUN.clear()
    np.testing.assert_allclose(resumed, uninterrupted, rtol=1e-5, atol=1e-7)


def resumed_loop(out: Path, script: dict, restore_state: bool = True, **config) -> RoundLoop:
    """What ``server_app.main`` does with ``resume = true``, over ``script``, run to its end
    (``loop.final``: the last global model)."""
    checkpoint = load_checkpoint(out, {MODEL_KEY: torch.zeros(START.size)})
    loop = loop_for(out, script, round_timeout=5.0, **config)
    checkpoint.restore_rng()
    if restore_state:
        restore_strategy_state(loop.strategy, checkpoint.strategy_state)
    loop.privacy.resume(checkpoint.privacy_state)
    loop.final = loop.run(ArrayRecord({MODEL_KEY: Array(checkpoint.model[MODEL_KEY].numpy())}), checkpoint.round + 1)
    return loop


# ---------------------------------------------------------------------------------------------
# the table of strategies (strategies.py) against Flower's classes and the chart


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_each_entry_builds_its_flower_class_and_names_exactly_the_state_it_keeps(name):
    spec = STRATEGIES[name]
    built = build_strategy(RunConfig(strategy=name, num_partitions=20, min_nodes=20))
    assert type(built).__name__ == spec.flower_class and spec.flower_class.lower() == name
    kept = {attr for attr in vars(built) if attr in {"m_t", "v_t", "momentum_vector", "current_arrays"}}
    assert kept == set(spec.state)  # saved in the checkpoint: a resumed run would lose what is missing


def test_the_charts_strategy_enum_is_the_table():
    import json

    schema = json.loads((Path(__file__).parent.parent / "charts/fedcifar/values.schema.json").read_text())
    assert schema["properties"]["run"]["properties"]["strategy"]["enum"] == list(STRATEGIES)
