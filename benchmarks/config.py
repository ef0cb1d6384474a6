"""Benchmark configuration: TOML files in ``configs/bench/`` read into frozen dataclasses."""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: Systems that can be compared. ``datarax_ckpt`` is this project's handler;
#: ``datarax_ckpt_incremental`` the same with ``incremental=True``; ``orbax`` is a raw
#: ``ocp.CheckpointManager`` with default options; ``torch_dcp`` is PyTorch DCP ``async_save``.
SYSTEMS = ("datarax_ckpt", "orbax", "torch_dcp", "datarax_ckpt_incremental")

#: Physical floors. ``pinned_d2h`` and ``d2d`` are measured only on an accelerator backend.
FLOORS = ("memcpy", "disk_write_fsync", "page_cache_read", "pinned_d2h", "d2d")

#: State shapes: N equal leaves of a total size, a GPT-2-shaped training state, many small leaves.
CASE_KINDS = ("equal", "gpt2", "many_small", "finetune")

DTYPES = ("float32", "bfloat16", "float16", "float64", "int32", "int8", "uint8")

MIB = 2**20


class ConfigError(ValueError):
    """A benchmark config value is missing, of the wrong type or out of range.

    The message names the file and the key, e.g.
    ``configs/bench/x.toml: cases[1].size_mb must be a positive number, got -3``.
    """


def _fail(where: str, msg: str) -> ConfigError:
    return ConfigError(f"{where} {msg}")


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _check_positive(where: str, value: Any) -> None:
    if not _is_number(value) or value <= 0:
        raise _fail(where, f"must be a positive number, got {value!r}")


def _check_count(where: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise _fail(where, f"must be {kind}, got {value!r}")


def _check_choice(where: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise _fail(where, f"must be one of {', '.join(choices)}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class CaseConfig:
    """One state to checkpoint.

    Attributes:
        kind: ``"equal"`` (``num_leaves`` equal leaves totalling ``size_mb``), ``"gpt2"`` (a
            GPT-2-small-shaped parameter tree with Adam moments, a step, a PRNG key and a
            run-name string) or ``"many_small"`` (``num_leaves`` leaves of ``leaf_kib`` each).
        name: Label used in the report; derived from the other fields when empty.
        size_mb: Total size in MiB (2**20 bytes) for ``equal``.
        num_leaves: Leaf count for ``equal`` (default 8) and ``many_small`` (default 2000).
        leaf_kib: Size of each leaf in KiB for ``many_small`` (default 64).
        dtype: Leaf dtype for ``equal`` and ``many_small``.
        width_scale: ``gpt2`` only: multiplies the model width (768) and vocabulary (50257);
            1.0 is GPT-2 small (124M parameters, about 1.2 GiB with the Adam moments).
        layers: ``gpt2`` only: transformer blocks (12 for GPT-2 small).
        param_dtype: ``gpt2`` only: dtype of the parameters (bf16 by default).
        moment_dtype: ``gpt2`` only: dtype of the Adam moments (f32 by default).
        trainable_mb: ``finetune`` only: MiB of f32 trainable arrays (default 16), saved
            with Adam moments of the same size; the frozen bf16 base is ``size_mb``
            (default 1024). Each save changes the trainable part and its moments only.
        changing: Each save changes every array (two variants, alternating), as after an
            optimizer step; False saves the same arrays again (a frozen state).
        repeats: Overrides the run's ``repeats`` for this case when set.
        where: Location used in error messages, e.g. ``"x.toml: cases[1]"``.
    """

    kind: str
    name: str = ""
    size_mb: float | None = None
    num_leaves: int | None = None
    leaf_kib: float | None = None
    dtype: str = "float32"
    width_scale: float = 1.0
    layers: int = 12
    param_dtype: str = "bfloat16"
    moment_dtype: str = "float32"
    trainable_mb: float | None = None
    changing: bool = False
    repeats: int | None = None
    where: str = dataclasses.field(default="case", compare=False, repr=False)

    def __post_init__(self) -> None:
        w = self.where
        _check_choice(f"{w}.kind", self.kind, CASE_KINDS)
        if not isinstance(self.name, str):
            raise _fail(f"{w}.name", f"must be a string, got {self.name!r}")
        for key in ("dtype", "param_dtype", "moment_dtype"):
            _check_choice(f"{w}.{key}", getattr(self, key), DTYPES)
        if self.repeats is not None:
            _check_count(f"{w}.repeats", self.repeats, 1)
        if self.kind == "equal":
            if self.size_mb is None:
                raise _fail(f"{w}.size_mb", "is required for kind 'equal'")
            _check_positive(f"{w}.size_mb", self.size_mb)
            if self.num_leaves is None:
                object.__setattr__(self, "num_leaves", 8)
            _check_count(f"{w}.num_leaves", self.num_leaves, 1)
        elif self.kind == "finetune":
            if self.size_mb is None:
                object.__setattr__(self, "size_mb", 1024)
            if self.trainable_mb is None:
                object.__setattr__(self, "trainable_mb", 16)
            _check_positive(f"{w}.size_mb", self.size_mb)
            _check_positive(f"{w}.trainable_mb", self.trainable_mb)
        elif self.kind == "many_small":
            if self.num_leaves is None:
                object.__setattr__(self, "num_leaves", 2000)
            if self.leaf_kib is None:
                object.__setattr__(self, "leaf_kib", 64)
            _check_count(f"{w}.num_leaves", self.num_leaves, 1)
            _check_positive(f"{w}.leaf_kib", self.leaf_kib)
        else:
            _check_positive(f"{w}.width_scale", self.width_scale)
            if self.width_scale > 1:
                raise _fail(f"{w}.width_scale", f"must be at most 1, got {self.width_scale!r}")
            _check_count(f"{w}.layers", self.layers, 1)
        if not isinstance(self.changing, bool):
            raise _fail(f"{w}.changing", f"must be true or false, got {self.changing!r}")
        if not self.name:
            object.__setattr__(self, "name", self._default_name())

    def _default_name(self) -> str:
        if self.kind == "equal":
            size = f"{self.size_mb / 1024:g}GiB" if self.size_mb >= 1024 else f"{self.size_mb:g}MiB"
            return f"equal-{size}-x{self.num_leaves}"
        if self.kind == "many_small":
            return f"many-{self.num_leaves}x{self.leaf_kib:g}KiB"
        if self.kind == "finetune":
            return f"finetune-{self.size_mb:g}MiB+{self.trainable_mb:g}MiB"
        scale = "" if self.width_scale == 1 else f"-w{self.width_scale:g}"
        layers = "" if self.layers == 12 else f"-L{self.layers}"
        changing = "-changing" if self.changing else ""
        return f"gpt2-small{scale}{layers}{changing}"


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """A whole benchmark run.

    Attributes:
        name: Label of the run (the config file's stem by default).
        cases: The states to checkpoint, in order.
        systems: Systems to compare on each case; ``torch_dcp`` is skipped with a note when
            torch cannot be imported.
        floors: Physical floors to measure for each case.
        repeats: Steady-state samples per metric (each case may override it).
        warmup: Saves per manager made and reported separately before the steady state.
        floor_repeats: Samples per floor.
        floor_max_mb: Floors are measured on a contiguous buffer of the case's size, capped at
            this many MiB; the time for the case's bytes is extrapolated from the bandwidth.
        rss_interval_ms: Host RSS sampling period during a save.
        seed: Seed for the random fill.
        description: Free text copied to the report.
        source: The file the config was read from.
    """

    cases: tuple[CaseConfig, ...]
    name: str = "bench"
    systems: tuple[str, ...] = SYSTEMS
    floors: tuple[str, ...] = FLOORS
    repeats: int = 3
    warmup: int = 1
    floor_repeats: int = 3
    floor_max_mb: float = 4096
    rss_interval_ms: float = 2.0
    seed: int = 0
    description: str = ""
    source: str = "<config>"

    def __post_init__(self) -> None:
        s = f"{self.source}:"
        if not isinstance(self.name, str) or not self.name:
            raise _fail(f"{s} name", f"must be a non-empty string, got {self.name!r}")
        if not isinstance(self.description, str):
            raise _fail(f"{s} description", f"must be a string, got {self.description!r}")
        if not self.cases:
            raise _fail(f"{s} cases", "must list at least one case")
        for key, allowed in (("systems", SYSTEMS), ("floors", FLOORS)):
            values = getattr(self, key)
            if key == "systems" and not values:
                raise _fail(f"{s} systems", "must name at least one system")
            for i, v in enumerate(values):
                _check_choice(f"{s} {key}[{i}]", v, allowed)
            if len(set(values)) != len(values):
                raise _fail(f"{s} {key}", f"must not repeat a name, got {list(values)!r}")
        _check_count(f"{s} repeats", self.repeats, 1)
        _check_count(f"{s} warmup", self.warmup, 1)
        _check_count(f"{s} floor_repeats", self.floor_repeats, 1)
        _check_positive(f"{s} floor_max_mb", self.floor_max_mb)
        _check_positive(f"{s} rss_interval_ms", self.rss_interval_ms)
        _check_count(f"{s} seed", self.seed, 0)
        names = [c.name for c in self.cases]
        if len(set(names)) != len(names):
            raise _fail(f"{s} cases", f"must have distinct names, got {names!r}")

    def case_repeats(self, case: CaseConfig) -> int:
        """Returns the steady-state repeats for ``case``."""
        return case.repeats if case.repeats is not None else self.repeats

    def to_dict(self) -> dict[str, Any]:
        """Returns the config as plain JSON-ready data."""
        out = dataclasses.asdict(self)
        for case in out["cases"]:
            case.pop("where")
        return out


_CASE_KEYS = frozenset(f.name for f in dataclasses.fields(CaseConfig)) - {"where"}
_TOP_KEYS = frozenset(f.name for f in dataclasses.fields(BenchConfig)) - {"source"}


def _check_keys(where: str, table: Mapping[str, Any], allowed: frozenset[str]) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise _fail(
            f"{where}{unknown[0]}",
            f"is not a known key (known: {', '.join(sorted(allowed))})",
        )


def config_from_dict(data: Mapping[str, Any], source: str = "<config>") -> BenchConfig:
    """Builds a validated config from parsed TOML data.

    Args:
        data: The TOML document as a mapping.
        source: Name of the file, used in error messages.

    Returns:
        The validated config.

    Raises:
        ConfigError: A key is unknown, missing, of the wrong type or out of range.
    """
    _check_keys(f"{source}: ", data, _TOP_KEYS)
    raw_cases = data.get("cases")
    if not isinstance(raw_cases, list) or not raw_cases:
        raise _fail(f"{source}: cases", "must be a non-empty array of tables ([[cases]])")
    cases = []
    for i, raw in enumerate(raw_cases):
        where = f"{source}: cases[{i}]"
        if not isinstance(raw, dict):
            raise _fail(where, f"must be a table, got {raw!r}")
        _check_keys(f"{where}.", raw, _CASE_KEYS)
        if "kind" not in raw:
            raise _fail(f"{where}.kind", f"is required (one of {', '.join(CASE_KINDS)})")
        cases.append(CaseConfig(**raw, where=where))
    top = {k: v for k, v in data.items() if k != "cases"}
    for key in ("systems", "floors"):
        if key in top:
            if not isinstance(top[key], list):
                raise _fail(f"{source}: {key}", f"must be an array of names, got {top[key]!r}")
            top[key] = tuple(top[key])
    return BenchConfig(cases=tuple(cases), source=source, **top)


def load_config(path: str | Path) -> BenchConfig:
    """Reads and validates a benchmark config file.

    Args:
        path: A TOML file such as ``configs/bench/cpu-smoke.toml``.

    Returns:
        The validated config; its ``name`` defaults to the file's stem.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ConfigError: The file is not valid TOML or a value is invalid; the message names the key.
    """
    path = Path(path)
    with path.open("rb") as f:
        try:
            data = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from e
    data.setdefault("name", path.stem)
    return config_from_dict(data, source=str(path))
