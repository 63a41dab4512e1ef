"""Results: figures, targets and verdicts, written as JSON, a markdown table and PNG plots."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.services import REPO

# Plots are optional: a machine without matplotlib still gets the tables.
plt: Any
try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as _pyplot

    plt = _pyplot
    HAVE_PLOTS = True
except ImportError:  # pragma: no cover - depends on the environment
    plt = None
    HAVE_PLOTS = False

NO_PLOTS = "matplotlib is not installed (`.venv/bin/pip install matplotlib`): plots skipped"


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summary(values: Sequence[float]) -> dict[str, float]:
    """Count, min, p50, p90, p99, max and mean of a sample."""
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "min": min(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values),
        "mean": sum(values) / len(values),
    }


def fmt(value: float, unit: str = "", digits: int = 2) -> str:
    """A number for a table cell."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}{(' ' + unit) if unit else ''}"


def _cell(text: str) -> str:
    """Table-safe text: one line, no column separators."""
    return " ".join(text.split()).replace("|", "\\|")


@dataclass
class Row:
    """One line of a result table."""

    metric: str
    value: str
    target: str = ""
    verdict: str = ""


def verdict_at_least(value: float, target: float, unit: str = "") -> str:
    """`met`/`missed` for a figure that should be at least `target`, saying by how much."""
    if math.isnan(value):
        return "not measured"
    if value >= target:
        return f"met ({fmt(value / target, 'x')} of target)"
    return (
        f"**missed** by {fmt(target - value, unit)} ({fmt(value / target * 100, '%', 0)} of target)"
    )


def verdict_at_most(value: float, target: float, unit: str = "") -> str:
    """`met`/`missed` for a figure that should be at most `target`, saying by how much."""
    if math.isnan(value):
        return "not measured"
    if value <= target:
        return f"met ({fmt(target - value, unit)} to spare)"
    return f"**missed** by {fmt(value - target, unit)} ({fmt(value / target, 'x')} the target)"


@dataclass
class Result:
    """What one benchmark found."""

    name: str
    title: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    plots: list[str] = field(default_factory=list)
    status: str = "ok"
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    duration_s: float = 0.0
    environment: dict[str, Any] = field(default_factory=dict)

    def row(self, metric: str, value: str, target: str = "", verdict: str = "") -> None:
        self.rows.append(Row(metric, value, target, verdict))

    def note(self, text: str) -> None:
        self.notes.append(text)

    def markdown(self, heading: str = "#") -> str:
        """The result as a markdown section: table, then notes, then plots."""
        lines = [f"{heading} {self.title}", ""]
        env = self.environment
        lines.append(
            f"Run {self.started_at} ({self.duration_s:.0f} s), {env.get('mode', '')} sizes, "
            f"{env.get('cpus', '?')} CPUs, {env.get('postgres', '')}, "
            f"Temporal dev server ({env.get('temporal_store', '')}), "
            f"{'' if env.get('bytecode_cache', True) else 'no '}bytecode cache, "
            f"load average at the end {env.get('load_average_at_end', '?')}, "
            f"commit {env.get('commit', '?')}."
        )
        if self.status != "ok":
            lines += ["", f"**Status: {self.status}**"]
        lines += ["", "| metric | value | target | verdict |", "|---|---|---|---|"]
        for r in self.rows:
            cells = (_cell(r.metric), _cell(r.value), _cell(r.target), _cell(r.verdict))
            lines.append("| " + " | ".join(cells) + " |")
        if self.notes:
            lines += ["", "Notes:", ""]
            lines += [f"- {n}" for n in self.notes]
        for plot in self.plots:
            lines += ["", f"![{self.name}]({plot})"]
        return "\n".join(lines) + "\n"

    def write(self, out: Path) -> None:
        """`<name>.json` and `<name>.md` in `out`."""
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{self.name}.json").write_text(json.dumps(asdict(self), indent=2, default=str))
        (out / f"{self.name}.md").write_text(self.markdown())


def environment(
    mode: str, postgres: str, temporal_store: str, bytecode_cache: bool
) -> dict[str, Any]:
    """Where the figures come from: they only mean something next to this."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout.strip()
    except OSError:
        commit = "?"
    return {
        "mode": mode,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "postgres": postgres,
        "temporal_store": "SQLite file, WAL" if temporal_store == "file" else "in memory",
        "commit": commit or "?",
        "bytecode_cache": bytecode_cache,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    }


def load_result(path: Path) -> Result:
    """A result back from its JSON."""
    data = json.loads(path.read_text())
    result = Result(**{k: v for k, v in data.items() if k != "rows"})
    result.rows = [Row(**r) for r in data.get("rows", [])]
    return result


def rerender(out: Path) -> list[Path]:
    """Rewrite every `<name>.md` in `out` from its JSON (after a change of presentation)."""
    written = []
    for path in sorted(out.glob("*.json")):
        md = path.with_suffix(".md")
        md.write_text(load_result(path).markdown())
        written.append(md)
    return written


def write_summary(out: Path) -> Path:
    """SUMMARY.md: every result table found in `out`, in a fixed order."""
    order = ["provisioning", "expiry", "expiry_postgres", "sweep", "memory"]
    found = {p.stem: p for p in out.glob("*.json")}
    names = [n for n in order if n in found] + sorted(set(found) - set(order))
    readme = os.path.relpath(REPO / "bench" / "README.md", out.resolve())
    parts = [
        "# nhi-lifecycle benchmarks: summary",
        "",
        f"Produced by `python -m bench` (see [bench/README.md]({readme}) for what each "
        "benchmark measures and the caveats). Figures come from one shared 2-core machine: "
        "compare ratios and medians, not absolute numbers.",
        "",
    ]
    for name in names:
        parts.append(load_result(found[name]).markdown(heading="##"))
    path = out / "SUMMARY.md"
    path.write_text("\n".join(parts))
    return path


def save_plot(fig: Any, out: Path, name: str) -> str:
    """Save a figure as `<name>.png` in `out`; the relative path for the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=110)
    if plt is not None:
        plt.close(fig)
    return f"{name}.png"
