"""The checks every reply passes (fedcifar/server/replies.py): each bad reply of the hostile
catalogue refused with its reason, sound ones accepted, nothing allocated from a declared size,
and no input that makes a check raise anything but a refusal."""

from __future__ import annotations

import dataclasses
import random
import tracemalloc

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fedcifar.server.replies import Expected, Refused, check_evaluate_reply, check_train_reply
from fedcifar.strategies import LOSS_BEFORE_TRAINING
from fedcifar.task import MODEL_KEY, flat_weights, initial_model
from tests.hostile import EVALUATE_REPLIES, TRAIN_REPLIES, WELL_FORMED, ZEROS, evaluate_reply, train_reply

SLOT = 0


@pytest.fixture(scope="module")
def model() -> np.ndarray:
    return flat_weights(initial_model(0))


@pytest.fixture(scope="module")
def expected(model) -> Expected:
    arrays = ArrayRecord({MODEL_KEY: Array(model)})
    return Expected(
        Expected.layout_of(arrays),
        train_examples=(166, 167),
        evaluate_examples=(100, 100),
        local_epochs=2,
        round_timeout=60.0,
    )


def reason(check, content, expected, bound_slot=SLOT) -> str | None:
    try:
        check(content, expected, bound_slot)
    except Refused as refused:
        return refused.reason
    return None


@pytest.mark.parametrize("name", TRAIN_REPLIES)
def test_each_bad_training_reply_is_refused_with_its_reason(name, model, expected):
    build, why = TRAIN_REPLIES[name]
    assert reason(check_train_reply, build(model, SLOT), expected) == why


@pytest.mark.parametrize("name", EVALUATE_REPLIES)
def test_each_bad_evaluate_reply_is_refused_with_its_reason(name, model, expected):
    build, why = EVALUATE_REPLIES[name]
    assert reason(check_evaluate_reply, build(model, SLOT), expected) == why


def test_sound_replies_pass_and_give_their_figures(model, expected):
    reply = check_train_reply(WELL_FORMED[ZEROS](model, 1), expected, 1)
    assert (reply.slot, reply.num_examples, reply.examples_trained) == (1, 100, 100)
    assert check_evaluate_reply(evaluate_reply(1), expected, None).accuracy == pytest.approx(0.3)
    # the bound: the slot's size, times local-epochs for what it trained
    trained = {"num-examples": 166, "examples-trained": 332}
    assert reason(check_train_reply, train_reply(model, 0, **trained), expected) is None
    assert (
        reason(check_train_reply, train_reply(model, 0, **{**trained, "num-examples": 167}), expected)
        == "too_many_examples"
    )
    assert (
        reason(check_train_reply, train_reply(model, 0, **{**trained, "examples-trained": 333}), expected)
        == "bad_metrics"
    )
    assert reason(check_train_reply, train_reply(model, 0, **{"train-seconds": 61.0}), expected) == "bad_metrics"


def test_without_a_key_binding_a_claim_within_the_slots_is_taken(model, expected):
    assert check_train_reply(train_reply(model, 1), expected, None).slot == 1
    assert reason(check_train_reply, train_reply(model, 1), expected, bound_slot=0) == "wrong_slot"
    assert reason(check_train_reply, train_reply(model, 2), expected, bound_slot=None) == "bad_metrics"


def test_a_declared_size_allocates_nothing(model, expected):
    """A 228-byte reply declaring 2^40 float32 values (4 TiB): refused with kilobytes allocated."""
    build, _ = TRAIN_REPLIES["a header declaring 2^40 values"]
    content = build(model, SLOT)
    tracemalloc.start()
    try:
        assert reason(check_train_reply, content, expected) == "wrong_shape"
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_corrupted_bytes_are_refused_never_raised(model, expected):
    """Random damage to a sound reply's bytes: each is accepted or refused, nothing else."""
    sound = np.asarray(model, dtype=np.float32)
    data = bytearray(Array(sound).data)
    rng = random.Random(0)
    outcomes = set()
    for _ in range(300):
        damaged = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            damaged[rng.randrange(0, 200) if rng.random() < 0.7 else rng.randrange(len(damaged))] = rng.randrange(256)
        if rng.random() < 0.2:
            damaged = damaged[: rng.randrange(len(damaged))]
        array = Array(dtype="float32", shape=sound.shape, stype="numpy.ndarray", data=bytes(damaged))
        outcomes.add(reason(check_train_reply, train_reply(sound, SLOT, {MODEL_KEY: array}), expected))
    assert outcomes <= {None, "wrong_shape", "non_finite"} and "wrong_shape" in outcomes


@pytest.mark.parametrize(
    ("run", "extra", "why"),
    [
        ({"strategy": "qfedavg"}, {}, "bad_metrics"),  # the loss q-FedAvg weighs by is missing
        ({"strategy": "qfedavg"}, {LOSS_BEFORE_TRAINING: 2.3}, None),
        ({"strategy": "qfedavg"}, {LOSS_BEFORE_TRAINING: 1e300}, "bad_metrics"),  # would make its model the global one
        ({"strategy": "qfedavg"}, {LOSS_BEFORE_TRAINING: 1e-10}, "bad_metrics"),  # would freeze the model
        ({"strategy": "fedavg"}, {LOSS_BEFORE_TRAINING: 2.3}, "bad_metrics"),  # not asked for
        ({"dp": "client-adaptive"}, {"norm_bit": 1}, None),
        ({"dp": "client-adaptive"}, {"norm_bit": 7}, "bad_metrics"),
        ({"dp": "client-adaptive"}, {}, "bad_metrics"),
    ],
)
def test_what_a_run_adds_to_a_training_reply_is_checked_too(model, expected, run, extra, why):
    per_run = dataclasses.replace(
        expected, train_metrics=Expected.train_metrics_for(run.get("strategy", "fedavg"), run.get("dp", "none"))
    )
    assert reason(check_train_reply, train_reply(model, SLOT, **extra), per_run) == why
