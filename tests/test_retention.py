"""Save and keep policies (CheckpointOptions), as Orbax's CheckpointManager users know them:
save every N steps, keep every K-th step, keep the best K by a metric, keep one per hour."""

import datetime
import signal

import jax.numpy as jnp
import pytest

from datarax_ckpt import CheckpointOptions, OrbaxCheckpointHandler, PreemptionGuard


def state(step):
    return {"w": jnp.full(8, step, jnp.float32), "s": step}


def test_save_interval_makes_off_interval_saves_a_no_op(tmp_path):
    with OrbaxCheckpointHandler(save_interval_steps=10) as h:
        saved = [s for s in range(26) if h.save(tmp_path, state(s), step=s, keep=2) is not None]
        assert saved == [0, 10, 20]
        assert h.get_checkpoint_steps(tmp_path) == [10, 20]
        assert h.save(tmp_path, state(25), step=25, keep=2, force=True).endswith("ckpt-25")
        assert h.save(tmp_path, {"note": "unversioned"}) is not None  # no step, no interval
        assert h.get_checkpoint_steps(tmp_path) == [20, 25]


def test_a_preemption_save_off_the_interval_is_still_written(tmp_path):
    with OrbaxCheckpointHandler(save_interval_steps=10) as h:
        with PreemptionGuard(h, tmp_path, keep=2, exit_on_preemption=False) as guard:
            for step in range(1, 15):
                h.save(tmp_path, state(step), step=step, keep=2)  # the loop's own saves
                if step == 13:
                    signal.raise_signal(signal.SIGTERM)  # a real SIGTERM, caught by the guard
                if guard.register(state(step), step):
                    break
        assert guard.saved_step == 13
        assert h.get_checkpoint_steps(tmp_path) == [10, 13]


def test_should_save_follows_the_interval_and_the_saved_steps(tmp_path):
    with OrbaxCheckpointHandler(save_interval_steps=50) as h:
        assert [s for s in range(0, 201, 25) if h.should_save(tmp_path, s)] == [
            0,
            50,
            100,
            150,
            200,
        ]
        for step in range(0, 120):  # the training loop of the guide
            if h.should_save(tmp_path, step):
                h.save(tmp_path, state(step), step=step)
        assert h.get_checkpoint_steps(tmp_path) == [0, 50, 100]
        assert not h.should_save(tmp_path, 100)  # saved already
        assert not h.should_save(tmp_path, 50)  # below the latest
    with OrbaxCheckpointHandler() as h:  # no interval: any step above the latest
        assert h.should_save(tmp_path, 101) and not h.should_save(tmp_path, 99)


def test_keep_period_keeps_every_kth_step_beside_the_newest(tmp_path):
    with OrbaxCheckpointHandler(keep_period=5) as h:
        for s in range(1, 13):
            h.save(tmp_path, state(s), step=s, keep=2)
        assert h.get_checkpoint_steps(tmp_path) == [5, 10, 11, 12]
    with OrbaxCheckpointHandler(keep_period=5) as h:  # a resumed run keeps them too
        for s in range(13, 17):
            h.save(tmp_path, state(s), step=s, keep=2)
        assert h.get_checkpoint_steps(tmp_path) == [5, 10, 15, 16]


@pytest.mark.parametrize(("mode", "best"), [("min", [3, 6]), ("max", [2, 4])])
def test_keep_best_keeps_the_best_steps_by_a_metadata_metric(tmp_path, mode, best):
    losses = {1: 0.9, 2: 1.5, 3: 0.2, 4: 1.2, 5: 0.8, 6: 0.1, 7: 0.5, 8: 0.3}
    options = CheckpointOptions(keep_best=2, best_metric="eval_loss", best_mode=mode)
    with OrbaxCheckpointHandler(options) as h:
        for s in range(1, 7):
            h.save(tmp_path, state(s), step=s, keep=1, metadata={"eval_loss": losses[s]})
        assert h.get_checkpoint_steps(tmp_path) == sorted({*best, 6})
    with OrbaxCheckpointHandler(options) as h:  # ranked with the metrics of the earlier run
        h.save(tmp_path, state(7), step=7, keep=1, metadata={"eval_loss": losses[7]})
        h.save(tmp_path, state(8), step=8, keep=1, metadata={"note": "no eval this time"})
        assert h.get_checkpoint_steps(tmp_path) == sorted({*best, 8})
        h.save(tmp_path, state(9), step=9, keep=1, metadata={"eval_loss": 1})
        # Step 8 had no metric: kept only while it was the newest.
        assert h.get_checkpoint_steps(tmp_path) == sorted({*best, 9})
        assert h.restore(tmp_path, metadata_only=True) == {"eval_loss": 1}
        assert h.verify(tmp_path).ok


def test_keep_best_refuses_a_metric_that_is_not_a_number(tmp_path):
    with OrbaxCheckpointHandler(keep_best=1, best_metric="acc") as h:
        with pytest.raises(ValueError, match=r"metadata\['acc'\] is '97%'.*pass a number"):
            h.save(tmp_path, state(1), step=1, keep=1, metadata={"acc": "97%"})
        assert h.get_checkpoint_steps(tmp_path) == []
    assert list(tmp_path.iterdir()) == []


def test_keep_time_interval_keeps_one_step_per_interval(tmp_path):
    # Every save here lands within the first hour: only its first step is kept for it.
    with OrbaxCheckpointHandler(keep_time_interval=datetime.timedelta(hours=1)) as h:
        for s in range(1, 6):
            h.save(tmp_path, state(s), step=s, keep=2)
        assert h.get_checkpoint_steps(tmp_path) == [1, 4, 5]


def test_policies_only_add_to_keep(tmp_path):
    options = CheckpointOptions(keep_period=2, keep_best=1, best_metric="loss")
    with OrbaxCheckpointHandler(options) as h:
        for s in range(1, 6):
            h.save(tmp_path, state(s), step=s, metadata={"loss": -s})  # keep=None: keep all
        assert h.get_checkpoint_steps(tmp_path) == [1, 2, 3, 4, 5]
        h.save(tmp_path, state(6), step=6, keep=1, metadata={"loss": 0})
        assert h.get_checkpoint_steps(tmp_path) == [2, 4, 5, 6]


@pytest.mark.parametrize(
    ("fields", "error", "match"),
    [
        ({"save_interval_steps": 0}, ValueError, "save_interval_steps must be >= 1"),
        ({"keep_period": 2.5}, TypeError, "keep_period must be an int"),
        ({"keep_best": 2}, ValueError, "keep_best and best_metric go together"),
        ({"best_metric": "loss"}, ValueError, "keep_best and best_metric go together"),
        ({"keep_best": 2, "best_metric": ""}, TypeError, "best_metric must be a metadata key"),
        ({"best_mode": "lowest"}, ValueError, "best_mode must be one of"),
        ({"keep_time_interval": 3600}, TypeError, "keep_time_interval must be a datetime"),
        (
            {"keep_time_interval": datetime.timedelta(milliseconds=10)},
            ValueError,
            "keep_time_interval must be at least 1 second",
        ),
    ],
)
def test_options_reject_bad_policies(fields, error, match):
    with pytest.raises(error, match=match):
        CheckpointOptions(**fields)
