"""Save and keep policies: :class:`CheckpointOptions` fields as Orbax's own policy objects.

Orbax decides; this module only builds its objects. ``keep`` (a save's argument) is
``LatestN``; ``keep_period`` is ``EveryNSteps``; ``keep_time_interval`` is
``EveryNSeconds``; ``keep_best`` is ``BestN``; together ``AnyPreservationPolicy`` (a step
is kept if any of them keeps it). ``save_interval_steps`` is ``FixedIntervalPolicy``.
``LatestN`` keeps the last saves in save order, which is step order because the handler
refuses a save below a newer step (:mod:`datarax_ckpt._steps`).
"""

from __future__ import annotations

import dataclasses
import datetime
import math
from typing import Any

import orbax.checkpoint as ocp

from datarax_ckpt.options import CheckpointOptions

_policies = ocp.checkpoint_managers


@dataclasses.dataclass(frozen=True)
class _Info:
    """A step as Orbax's policies see it (``PolicyCheckpointInfo``)."""

    step: int
    time: datetime.datetime
    metrics: dict[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class _Metric:
    """Orbax's ``get_metric_fn``: the value of ``name`` in a step's metrics.

    A step recorded under another ``best_metric`` (the option changed between runs)
    ranks worst instead of failing the save that applies retention.
    """

    name: str
    mode: str

    def __call__(self, metrics: dict[str, Any]) -> float:
        value = metrics.get(self.name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        return math.inf if self.mode == "min" else -math.inf


def manager_options(options: CheckpointOptions, keep: int | None) -> dict[str, Any]:
    """``CheckpointManagerOptions`` fields giving a save with ``keep`` its retention."""
    policies: list[Any] = [_policies.LatestN(n=keep)]
    fields: dict[str, Any] = {}
    if keep is not None:  # keep=None keeps every step: nothing to add
        if options.keep_period is not None:
            policies.append(_policies.EveryNSteps(interval_steps=options.keep_period))
        if options.keep_time_interval is not None:
            seconds = int(options.keep_time_interval.total_seconds())
            policies.append(_policies.EveryNSeconds(interval_secs=seconds))
    if options.keep_best is not None:
        metric = _Metric(options.best_metric, options.best_mode)
        # best_fn makes Orbax record each save's metrics in the step (its "metrics" item),
        # so that BestN ranks steps written by earlier runs too.
        fields.update(best_fn=metric, best_mode=options.best_mode)
        if keep is not None:
            policies.append(
                _policies.BestN(
                    get_metric_fn=metric,
                    reverse=options.best_mode == "min",  # BestN keeps the end of the sort
                    n=options.keep_best,
                    keep_checkpoints_without_metrics=False,
                )
            )
    policy = policies[0] if len(policies) == 1 else _policies.AnyPreservationPolicy(policies)
    return {"preservation_policy": policy, **fields}


def metrics(options: CheckpointOptions, metadata: dict | None) -> dict[str, float] | None:
    """The metrics Orbax records for ``keep_best``: ``{best_metric: value}``, or None.

    Raises:
        ValueError: if the metadata holds ``best_metric`` but not as a number.
    """
    if options.keep_best is None or metadata is None or metadata.get(options.best_metric) is None:
        return None
    value = metadata[options.best_metric]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(
            f"metadata[{options.best_metric!r}] is {value!r}, but CheckpointOptions.keep_best "
            "ranks steps by it: pass a number (or leave the key out; such a step is kept "
            "only by keep and the other rules)."
        )
    return {options.best_metric: value}


def on_interval(options: CheckpointOptions, step: int, saving: bool = False) -> bool:
    """Orbax's save decision for ``step``: ``FixedIntervalPolicy(save_interval_steps)``."""
    if options.save_interval_steps is None:
        return True
    context = _policies.DecisionContext(
        is_saving_in_progress=saving,
        reached_preemption=False,  # a preemption save passes force=True (PreemptionGuard)
        multiprocessing_options=ocp.options.MultiprocessingOptions(),
    )
    policy = _policies.FixedIntervalPolicy(options.save_interval_steps)
    now = datetime.datetime.now(tz=datetime.UTC)
    return policy.should_save(_Info(step, now), [], context=context)
