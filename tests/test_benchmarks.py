"""Tests of the benchmark suite: configs, states, and the cpu-smoke run end to end."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import statistics
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import benchmarks
from benchmarks import systems
from benchmarks.__main__ import main
from benchmarks.config import CaseConfig, ConfigError, load_config
from benchmarks.measure import SystemRun, rotated, run_interleaved
from benchmarks.states import build_state

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "bench"
SMOKE = CONFIGS / "cpu-smoke.toml"
ALWAYS = ("datarax_ckpt", "orbax")  # Systems that must run wherever the tests run.

# A valid config; the bad-config tests replace one line of it.
GOOD = """\
name = "x"
repeats = 2
warmup = 1
systems = ["datarax_ckpt", "orbax"]

[[cases]]
kind = "equal"
size_mb = 1

[[cases]]
kind = "equal"
size_mb = 4
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "x.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    base = tmp_path_factory.mktemp("smoke")
    cwd = os.getcwd()
    os.chdir(base)  # A relative --out, as on the command line (raw Orbax needs absolute paths).
    try:
        results = benchmarks.run(SMOKE, "out", progress=False)
    finally:
        os.chdir(cwd)
    return results, base / "out"


def test_smoke_writes_valid_json_markdown_and_png(smoke: tuple[dict, Path]) -> None:
    results, out = smoke
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    assert results["complete"] is True  # a run cut short leaves "complete": false
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "results.md").read_text()
    assert "ours/orbax" in md and "ours/floor" in md
    assert not any(p.name.startswith("bench-work-") for p in out.iterdir())  # Cleaned up.


def test_smoke_reports_the_environment(smoke: tuple[dict, Path]) -> None:
    env = smoke[0]["environment"]
    for pkg in ("python", "jax", "jaxlib", "orbax-checkpoint", "flax", "numpy"):
        assert env["versions"][pkg]
    assert env["backend"] == jax.default_backend()
    assert env["cpu_count"] >= 1 and env["ram_total_bytes"] > 0
    assert env["filesystem"]["fstype"] != "unknown"
    # Names the library code that ran, also where .git was copied stale (a lent machine).
    assert re.fullmatch(r"[0-9a-f]{12}", env["library_digest"])
    assert f"library digest {env['library_digest']}" in (smoke[1] / "results.md").read_text()


def test_smoke_has_every_metric_for_every_system(smoke: tuple[dict, Path]) -> None:
    results, _ = smoke
    config = load_config(SMOKE)
    assert [c["name"] for c in results["cases"]] == [c.name for c in config.cases]
    for case in results["cases"]:
        assert set(case["systems"]) == set(config.systems)
        for name, entry in case["systems"].items():
            if name == "torch_dcp" and importlib.util.find_spec("torch") is None:
                assert entry["status"] == "skipped" and "torch" in entry["reason"]
                continue
            assert entry["status"] == "ok", entry.get("traceback", entry)
            assert entry["restore_verified"] is True
            metrics = entry["metrics"]
            assert set(metrics) == set(benchmarks.METRICS)
            for metric, summary in metrics.items():
                if metric == "restore_metadata_s" and name != "datarax_ckpt":
                    assert summary["median"] is None and summary["note"]
                    continue
                want = config.warmup if metric.startswith("warmup_") else case["repeats"]
                assert len(summary["samples"]) == want, (case["name"], name, metric)
                assert summary["min"] <= summary["median"] <= summary["max"]
            assert metrics["durable_s"]["min"] >= metrics["save_blocking_s"]["min"]
            assert metrics["disk_bytes"]["median"] > 0
    assert all(n in results["cases"][0]["systems"] for n in ALWAYS)


def test_smoke_measures_host_floors(smoke: tuple[dict, Path]) -> None:
    for case in smoke[0]["cases"]:
        for floor in ("memcpy", "disk_write_fsync", "page_cache_read"):
            f = case["floors"][floor]
            assert f["bandwidth_gbps"] > 0 and f["time_for_case_s"] > 0
        if jax.default_backend() == "cpu":
            assert "skipped" in case["floors"]["pinned_d2h"]


def test_smoke_takes_the_fsync_floor_in_the_rounds(smoke: tuple[dict, Path]) -> None:
    config = load_config(SMOKE)
    for case in smoke[0]["cases"]:
        f = case["floors"]["disk_write_fsync"]
        in_round = f["in_round_samples_s"]
        assert len(in_round) == case["repeats"]  # One per round of steady saves.
        assert len(f["up_front_samples_s"]) == config.floor_repeats
        assert f["samples_s"] == f["up_front_samples_s"] + in_round
        assert f["median_s"] == statistics.median(in_round)
        assert (f["min_s"], f["max_s"]) == (min(in_round), max(in_round))
        assert f["time_for_case_s"] == pytest.approx(
            case["bytes"] / f["buffer_bytes"] * f["median_s"]
        )


@pytest.mark.parametrize(
    "name", ["cpu-smoke", "cpu", "cpu-small", "cpu-large", "cpu-i19", "gpu", "tpu"]
)
def test_shipped_configs_load(name: str) -> None:
    config = load_config(CONFIGS / f"{name}.toml")
    assert config.name == name and config.cases


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            "size_mb = 4",
            "size_mb = -3",
            "x.toml: cases[1].size_mb must be a positive number, got -3",
        ),
        ("size_mb = 4", 'size_mb = "big"', "cases[1].size_mb must be a positive number, got 'big'"),
        ("size_mb = 4", "size_mb = 4\ndtype = 'f8'", "cases[1].dtype must be one of float32"),
        ("size_mb = 4", "size_mb = 4\nsize_gb = 1", "cases[1].size_gb is not a known key"),
        ('kind = "equal"\nsize_mb = 4', 'kind = "tiny"', "cases[1].kind must be one of equal"),
        ('kind = "equal"\nsize_mb = 4', 'kind = "equal"', "cases[1].size_mb is required"),
        ("size_mb = 4", "size_mb = 4\nnum_leaves = 0", "cases[1].num_leaves must be a positive"),
        ("size_mb = 4", "size_mb = 4\nrepeats = 1.5", "cases[1].repeats must be a positive"),
        ('kind = "equal"\nsize_mb = 4', 'kind = "gpt2"\nwidth_scale = 2', "width_scale must be at"),
        ('kind = "equal"\nsize_mb = 4', 'kind = "gpt2"\nlayers = 0', "cases[1].layers must be a"),
        ('kind = "equal"\nsize_mb = 4', 'kind = "many_small"\nleaf_kib = 0', "leaf_kib must be a"),
        ("repeats = 2", "repeats = 0", "x.toml: repeats must be a positive integer, got 0"),
        ("repeats = 2", "repeats = true", "x.toml: repeats must be a positive integer, got True"),
        ("warmup = 1", "warmup = 0", "x.toml: warmup must be a positive integer, got 0"),
        ('"orbax"]', '"orbax", "tf"]', "x.toml: systems[2] must be one of datarax_ckpt"),
        ('"orbax"]', '"orbax", "orbax"]', "x.toml: systems must not repeat a name"),
        ("warmup = 1", "warmup = 1\nfloors = ['disk']", "x.toml: floors[0] must be one of memcpy"),
        ("warmup = 1", "warmup = 1\nrss_interval_ms = -1", "x.toml: rss_interval_ms must be a"),
        ("warmup = 1", "warmup = 1\nrepeat = 3", "x.toml: repeat is not a known key"),
        (
            "size_mb = 1",
            'size_mb = 1\nname = "c"\n[[cases]]\nkind = "equal"\nsize_mb = 2\nname = "c"',
            "x.toml: cases must have distinct names",
        ),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, old: str, new: str, message: str) -> None:
    assert GOOD.count(old) == 1
    path = _write(tmp_path, GOOD.replace(old, new))
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(path)


def test_bad_config_is_a_value_error_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"x\.toml: not valid TOML"):
        load_config(_write(tmp_path, "repeats = "))
    with pytest.raises(ValueError, match=r"x\.toml: cases must be a non-empty array"):
        load_config(_write(tmp_path, "repeats = 2\n"))


def test_cli_reports_a_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = _write(tmp_path, GOOD.replace("size_mb = 4", "size_mb = -3"))
    assert main(["--config", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "cases[1].size_mb must be a positive number, got -3" in capsys.readouterr().err


def test_gpt2_state_is_random_and_shaped_like_gpt2_small() -> None:
    case = CaseConfig(kind="gpt2", width_scale=1 / 32)
    state = build_state(case, seed=0)
    params = state.tree["params"]
    assert params["wte"]["embedding"].shape == (1571, 24)
    assert params["h_11"]["mlp"]["c_fc"]["kernel"].shape == (24, 96)
    assert params["wte"]["embedding"].dtype == jnp.bfloat16
    assert state.tree["opt_state"]["mu"]["wte"]["embedding"].dtype == jnp.float32
    assert state.num_leaves == 3 * (4 + 12 * 12) + 4  # params, mu, nu + count, step, key, name
    assert isinstance(state.tree["run_name"], str)
    assert jnp.issubdtype(state.tree["rng"].dtype, jax.dtypes.prng_key)
    # The raw-Orbax variant: no string, the key as raw key data; same array bytes.
    assert "run_name" not in state.orbax_tree
    assert state.orbax_tree["rng"].dtype == jnp.uint32
    for leaf in jax.tree.leaves(state.tree["params"]):
        assert np.unique(np.asarray(leaf, np.float32)).size > 1  # Never constant-filled.


@pytest.mark.parametrize(
    ("case", "nbytes", "leaves"),
    [
        (CaseConfig(kind="equal", size_mb=2, num_leaves=4), 2 * 2**20, 4),
        (CaseConfig(kind="equal", size_mb=1, dtype="bfloat16"), 2**20, 8),
        (CaseConfig(kind="many_small", num_leaves=30, leaf_kib=4), 30 * 4096, 30),
    ],
)
def test_array_states_have_the_requested_size(case: CaseConfig, nbytes: int, leaves: int) -> None:
    state = build_state(case, seed=1)
    assert (state.nbytes, state.num_leaves) == (nbytes, leaves)
    first = np.asarray(jax.tree.leaves(state.tree)[0], np.float32)
    assert np.unique(first).size > 100  # Random, not constant (bf16 has few distinct values).


def test_finetune_state_changes_only_the_trainable_part_between_steps() -> None:
    state = build_state(CaseConfig(kind="finetune", size_mb=4, trainable_mb=1), seed=0)
    (a, orbax_a), (b, _) = state.trees(1), state.trees(2)
    assert state.nbytes == (4 + 3 * 1) * 2**20
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(a["base"]))
    assert a["base"] is b["base"]  # the frozen base: the very same arrays at every step
    for x, y in zip(jax.tree.leaves(a["trainable"]), jax.tree.leaves(b["trainable"]), strict=True):
        assert not np.array_equal(np.asarray(x), np.asarray(y))  # consecutive steps differ
    assert orbax_a["opt_state"]["mu"].keys() == a["trainable"].keys()
    changing = build_state(CaseConfig(kind="equal", size_mb=1, changing=True), seed=0)
    first, second = (jax.tree.leaves(changing.trees(s)[0])[0] for s in (0, 1))
    assert not np.array_equal(np.asarray(first), np.asarray(second))


class _FakeAdapter(systems.Adapter):
    """Writes a small file per step and records every call in a shared list."""

    has_metadata_restore = True

    def __init__(self, name: str, directory: Path, calls: list, fail_on_save: int = 0) -> None:
        self.name = name
        self._dir = directory
        self._calls = calls
        self._fail_on_save = fail_on_save  # Raise on this save (counting from 1); 0: never.
        self._saves = 0
        self.closed = False
        directory.mkdir(parents=True)

    def save(self, step: int) -> None:
        self._saves += 1
        self._calls.append((self.name, "save", step))
        if self._saves == self._fail_on_save:
            raise OSError("disk full")
        self.step_path(step).write_bytes(b"x")

    def wait(self) -> None:
        pass

    def restore(self, step: int) -> Any:
        self._calls.append((self.name, "restore", step))
        return self.reference()

    def restore_metadata(self, step: int) -> Any:
        self._calls.append((self.name, "metadata", step))
        return {}

    def step_path(self, step: int) -> Path:
        return self._dir / f"step_{step}"

    def reference(self) -> Any:
        return {"x": np.arange(4)}

    def close(self) -> None:
        self.closed = True


def test_rotated_starts_each_round_one_further() -> None:
    assert [rotated("abc", r) for r in range(4)] == [
        ["a", "b", "c"],
        ["b", "c", "a"],
        ["c", "a", "b"],
        ["a", "b", "c"],
    ]
    assert rotated([], 3) == []


def test_systems_take_turns_and_a_failing_one_drops_out(tmp_path: Path) -> None:
    calls: list = []
    runs = [
        SystemRun(_FakeAdapter("a", tmp_path / "a", calls), 4, 1e-3),
        # b's 3rd save is its 2nd steady save (after 1 warm-up): it fails in round 1.
        SystemRun(_FakeAdapter("b", tmp_path / "b", calls, fail_on_save=3), 4, 1e-3),
        SystemRun(_FakeAdapter("c", tmp_path / "c", calls), 4, 1e-3),
    ]

    def floor() -> float:
        calls.append(("floor", "save", 0))
        return 0.5

    outcome = run_interleaved(runs, warmup=1, repeats=3, floor=floor)

    def order(op: str) -> list[str]:
        return [name for name, o, _ in calls if o == op]

    saves = order("save")
    assert saves[:3] == ["a", "b", "c"]  # Warm-up, round 0.
    # Steady rounds: a, b, c and the floor, round r starting at r mod n; b fails in round 1
    # (its save is called, then raises) and is gone from round 2: [a, c, floor] from index 2.
    assert saves[3:14] == ["a", "b", "c", "floor", "b", "c", "floor", "a", "floor", "a", "c"]
    assert outcome.floor_samples == [0.5, 0.5, 0.5]
    assert set(outcome.errors) == {"b"}
    err = outcome.errors["b"]
    assert err["status"] == "error" and err["reason"] == "OSError: disk full"
    assert "disk full" in err["traceback"]
    # Back-to-back pairs (two saves each), restores, metadata restores: b never again.
    assert saves[14:] == ["a", "a", "c", "c", "c", "c", "a", "a", "a", "a", "c", "c"]
    assert order("restore") == ["a", "c", "c", "a", "a", "c"]
    assert order("metadata") == ["a", "c", "c", "a", "a", "c"]
    for run in (runs[0], runs[2]):
        metrics = run.metrics()
        for metric in ("save_blocking_s", "back_to_back_blocking_s", "restore_s"):
            assert len(metrics[metric]["samples"]) == 3, metric
        assert len(metrics["warmup_durable_s"]["samples"]) == 1
        # At most the last step is left on disk once every sample's older steps are deleted.
        assert len(list((tmp_path / run.name).iterdir())) == 1


def test_a_system_that_restores_wrong_values_is_an_error(tmp_path: Path) -> None:
    calls: list = []
    bad = _FakeAdapter("bad", tmp_path / "bad", calls)
    bad.restore = lambda step: {"x": np.arange(4) + 1}  # type: ignore[method-assign]
    runs = [SystemRun(bad, 4, 1e-3), SystemRun(_FakeAdapter("ok", tmp_path / "ok", calls), 4, 1e-3)]
    outcome = run_interleaved(runs, warmup=1, repeats=2)
    assert set(outcome.errors) == {"bad"}
    assert "differs from the saved value" in outcome.errors["bad"]["reason"]
    assert len(runs[1].metrics()["restore_s"]["samples"]) == 2


def test_one_failing_system_does_not_stop_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed: list[str] = []

    class FailingOrbax(systems.OrbaxAdapter):
        """Raw Orbax whose second steady save raises."""

        saves = 0

        def save(self, step: int) -> None:
            FailingOrbax.saves += 1
            if FailingOrbax.saves == 3:
                raise RuntimeError("injected failure")
            super().save(step)

        def close(self) -> None:
            closed.append(self.name)
            super().close()

    monkeypatch.setitem(systems.ADAPTERS, "orbax", FailingOrbax)
    config = GOOD.replace(
        'size_mb = 1\n\n[[cases]]\nkind = "equal"\nsize_mb = 4\n', "size_mb = 1\n"
    )
    config = config.replace("warmup = 1", 'warmup = 1\nfloors = ["disk_write_fsync"]')
    out = tmp_path / "out"
    assert main(["--config", str(_write(tmp_path, config)), "--out", str(out), "--quiet"]) == 1
    (case,) = json.loads((out / "results.json").read_text())["cases"]
    orbax = case["systems"]["orbax"]
    assert orbax["status"] == "error" and orbax["reason"] == "RuntimeError: injected failure"
    assert "injected failure" in orbax["traceback"]
    assert closed == ["orbax"]  # Closed although it failed.
    ours = case["systems"]["datarax_ckpt"]
    assert ours["status"] == "ok" and ours["restore_verified"] is True
    for metric in ("save_blocking_s", "back_to_back_blocking_s", "restore_s", "restore_metadata_s"):
        assert len(ours["metrics"][metric]["samples"]) == 2, metric
    # The floor kept its turn in both rounds of steady saves.
    assert len(case["floors"]["disk_write_fsync"]["in_round_samples_s"]) == 2
    assert "orbax error: RuntimeError: injected failure" in (out / "results.md").read_text()
    assert not any(p.name.startswith("bench-work-") for p in out.iterdir())  # Cleaned up.


def test_device_check_round_trips_and_restore_split_run(tmp_path: Path) -> None:
    # The script a lent GPU session runs first: it must work before the lease starts.
    from benchmarks import device_check

    assert device_check.main(["--out", str(tmp_path), "--parts", "round_trips"]) == 0
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert len(report["round_trips"]) == 7 and all(r["ok"] for r in report["round_trips"])
    split = device_check.restore_split(tmp_path, num_leaves=20, leaf_kib=4)
    assert split["leaves"] == 20 and split["bytes"] == 20 * 4096
    with pytest.raises(SystemExit):
        device_check.main(["--out", str(tmp_path), "--parts", "no_such_part"])


def test_pack_threshold_sweep_reports_every_threshold(capsys: pytest.CaptureFixture) -> None:
    from benchmarks import pack_threshold

    argv = ["--repeats", "1", "--thresholds-kib", "0,64", "--cases", "many-50x16KiB"]
    result = pack_threshold.main(argv)
    medians = result["medians"]["many-50x16KiB"]
    assert sorted(medians) == [0, 64]
    for m in medians.values():
        assert 0 < m["save_blocking_s"] <= m["durable_s"] and m["restore_s"] > 0
    assert "| many-50x16KiB | off |" in capsys.readouterr().out
