"""Markdown tables and a PNG plot from a results dict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

OURS = "datarax_ckpt"
BASELINE = "orbax"

# Which floor bounds which metric. On CPU nothing must be copied for save() to return safely
# (arrays are immutable), so memcpy is a generous floor; on an accelerator the state must reach
# host memory, so the pinned device-to-host copy is.
_DURABLE_FLOOR = "disk_write_fsync"
_RESTORE_FLOOR = "page_cache_read"


def blocking_floor(results: dict[str, Any]) -> str:
    """The floor that bounds save() blocking time on this backend."""
    return "memcpy" if results["environment"]["backend"] == "cpu" else "pinned_d2h"


def fmt_s(x: float | None) -> str:
    """Formats seconds: ms below one second."""
    if x is None:
        return "—"
    if x < 0.01:
        return f"{x * 1e3:.2f} ms"
    if x < 1:
        return f"{x * 1e3:.1f} ms"
    return f"{x:.2f} s"


def fmt_bytes(n: float | None) -> str:
    """Formats a byte count in MiB or GiB."""
    if n is None:
        return "—"
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "—"
    return f"{a / b:.2f}×"


def _median(entry: dict[str, Any], system: str, metric: str) -> float | None:
    sys_entry = entry["systems"].get(system, {})
    if sys_entry.get("status") != "ok":
        return None
    return sys_entry["metrics"][metric]["median"]


def _floor_time(entry: dict[str, Any], floor: str) -> float | None:
    return entry["floors"].get(floor, {}).get("time_for_case_s")


def _with_range(summary: dict[str, Any], fmt: Any = fmt_s) -> str:
    if summary["median"] is None:
        return "—"
    return f"{fmt(summary['median'])} [{fmt(summary['min'])}–{fmt(summary['max'])}]"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _env_lines(results: dict[str, Any]) -> list[str]:
    env = results["environment"]
    v = env["versions"]
    fs = env["filesystem"]
    sw = ", ".join(f"{k} {val}" for k, val in v.items() if val is not None)
    return [
        f"- Machine: {env['cpu_count']} CPUs ({env['cpu_model']}), "
        f"{env['ram_total_bytes'] / 2**30:.1f} GiB RAM, {env['os']}",
        f"- Backend: {env['backend']} ({env['device_count']} × {env['device_kind']}); "
        f"checkpoints on {fs['fstype']} ({fs['mount_point']})",
        f"- Software: {sw}; repository at git {env.get('git_commit') or 'unknown'} "
        f"(library digest {env.get('library_digest') or 'unknown'})",
        f"- Command: `{results['command']}` ({results['elapsed_s']:.0f} s in all"
        + (
            f", peak process RSS {env['peak_process_rss_bytes'] / 2**30:.1f} GiB)"
            if env.get("peak_process_rss_bytes")
            else ")"
        ),
        "- Load average (1/5/15 min) at start: "
        + "/".join(f"{x:.2f}" for x in env["load_average_at_start"])
        + ", at end: "
        + "/".join(f"{x:.2f}" for x in env.get("load_average_at_end", [])),
    ]


def markdown(results: dict[str, Any]) -> str:
    """Renders the results as Markdown: summary, ratios, floors, warm-up and notes."""
    cfg = results["config"]
    systems = cfg["systems"]
    bfloor = blocking_floor(results)
    out = [f"# Checkpoint benchmark: {cfg['name']}", ""]
    if cfg.get("description"):
        out += [cfg["description"], ""]
    out += _env_lines(results) + [""]

    out += ["## Medians [min–max] over the steady-state repeats", ""]
    header = [
        "case",
        "system",
        "save() blocks",
        "back-to-back blocks",
        "durable",
        "GB/s",
        "restore",
        "metadata restore",
        "peak RSS: extra / over baseline / back-to-back",
        "disk",
    ]
    rows = []
    for e in results["cases"]:
        label = f"{e['name']} ({fmt_bytes(e['bytes'])}, {e['num_leaves']} leaves)"
        for s in systems:
            se = e["systems"][s]
            if se["status"] != "ok":
                rows.append([label, s, f"{se['status']}: {se['reason']}"] + [""] * 7)
                continue
            m = se["metrics"]
            rows.append(
                [
                    label,
                    s,
                    _with_range(m["save_blocking_s"]),
                    _with_range(m["back_to_back_blocking_s"]),
                    _with_range(m["durable_s"]),
                    f"{m['durable_throughput_gbps']['median']:.2f}",
                    _with_range(m["restore_s"]),
                    fmt_s(m["restore_metadata_s"]["median"]),
                    " / ".join(
                        f"{m[k]['median']:.0f}"
                        for k in (
                            "peak_rss_extra_mb",
                            "peak_rss_over_baseline_mb",
                            "back_to_back_peak_rss_over_baseline_mb",
                        )
                    )
                    + " MiB",
                    fmt_bytes(m["disk_bytes"]["median"]),
                ]
            )
    out += _table(header, rows) + [""]

    out += [
        "## Ratios of medians (lower is better)",
        "",
        f"Floors: save() blocking against `{bfloor}`, durable against `{_DURABLE_FLOOR}`, "
        f"restore against `{_RESTORE_FLOOR}`, each as the time for the case's bytes.",
        "",
    ]
    header = [
        "case",
        "blocks: ours/orbax",
        "ours/floor",
        "orbax/floor",
        "durable: ours/orbax",
        "ours/floor",
        "orbax/floor",
        "restore: ours/orbax",
        "ours/floor",
        "orbax/floor",
    ]
    rows = []
    for e in results["cases"]:
        row = [e["name"]]
        for metric, floor in (
            ("save_blocking_s", bfloor),
            ("durable_s", _DURABLE_FLOOR),
            ("restore_s", _RESTORE_FLOOR),
        ):
            ours, base = _median(e, OURS, metric), _median(e, BASELINE, metric)
            ft = _floor_time(e, floor)
            row += [_ratio(ours, base), _ratio(ours, ft), _ratio(base, ft)]
        rows.append(row)
    out += _table(header, rows) + [""]

    out += ["## Physical floors (same machine, same directory)", ""]
    rows = []
    for e in results["cases"]:
        for name, f in e["floors"].items():
            if "skipped" in f:
                rows.append([e["name"], name, "skipped", f["skipped"], ""])
            else:
                rows.append(
                    [
                        e["name"],
                        name,
                        f"{f['bandwidth_gbps']:.2f}",
                        fmt_s(f["time_for_case_s"]),
                        fmt_bytes(f["buffer_bytes"]),
                    ]
                )
    out += _table(["case", "floor", "GB/s", "time for the case's bytes", "measured on"], rows)
    out += [""]

    out += ["## Warm-up: the first save of a fresh manager (not in the medians)", ""]
    rows = []
    for e in results["cases"]:
        for s in systems:
            se = e["systems"][s]
            if se["status"] == "ok":
                m = se["metrics"]
                rows.append(
                    [
                        e["name"],
                        s,
                        fmt_s(m["warmup_save_blocking_s"]["median"]),
                        fmt_s(m["warmup_durable_s"]["median"]),
                    ]
                )
    out += _table(["case", "system", "save() blocks", "durable"], rows) + [""]

    out += ["## Notes", ""]
    out += [f"- {n}" for n in results["notes"]]
    for e in results["cases"]:
        out.append(f"- `{e['name']}`: {e['description']}.")
        out += [f"  - {n}" for n in e["notes"]]
        for s in systems:
            se = e["systems"][s]
            if se["status"] != "ok":
                out.append(f"  - {s} {se['status']}: {se['reason']}")
    return "\n".join(out) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    """Draws save() blocking time and durable throughput against state size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted(results["cases"], key=lambda e: e["bytes"])
    systems = results["config"]["systems"]
    bfloor = blocking_floor(results)
    fig, (ax_b, ax_t) = plt.subplots(1, 2, figsize=(12, 5))
    panels = (
        (ax_b, "save_blocking_s", 1e3, bfloor, "time_for_case_s"),
        (ax_t, "durable_throughput_gbps", 1.0, _DURABLE_FLOOR, "bandwidth_gbps"),
    )
    for i, s in enumerate(systems):
        color = f"C{i}"
        for ax, metric, scale, _, _ in panels:
            # The size sweep ("equal" cases) is a line; the shaped states are lone markers.
            for kind, style in (("equal", "o-"), ("gpt2", "s"), ("many_small", "^")):
                pts = [
                    (e["bytes"] / 2**20, e["systems"][s]["metrics"][metric]["median"] * scale)
                    for e in cases
                    if e["kind"] == kind and e["systems"].get(s, {}).get("status") == "ok"
                ]
                if pts:
                    label = s if kind == "equal" else f"{s}: {kind}"
                    ax.plot(*zip(*pts, strict=True), style, color=color, label=label, ms=7)
    for ax, _, scale, floor, key in panels:
        pts = [(e["bytes"] / 2**20, e["floors"].get(floor, {})) for e in cases]
        pts = [(x, f[key] * scale) for x, f in pts if key in f]
        if pts:
            ax.plot(*zip(*pts, strict=True), "--", color="gray", label=f"floor: {floor}")
    ax_b.set(ylabel="save() blocks (ms)", title="Blocking time of save() (median)")
    ax_t.set(ylabel="GB/s", title="Durable throughput: bytes / time to durable (median)")
    for ax in (ax_b, ax_t):
        ax.set(xscale="log", yscale="log", xlabel="state size (MiB)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    env = results["environment"]
    fig.suptitle(
        f"{results['config']['name']}: {env['backend']} ({env['device_kind']}), "
        f"{env['cpu_count']} CPUs, {env['filesystem']['fstype']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
