"""One timed batch of work (N provisionings, N decommissionings, ...) and what it cost."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bench.report import summary


@dataclass
class Phase:
    """N items pushed through one path: when it started, when each item finished."""

    label: str
    n: int
    started_at: float
    finished_at: dict[str, float] = field(default_factory=dict)
    latencies_s: list[float] = field(default_factory=list)
    failed: int = 0
    timed_out: bool = False
    cpu_s: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> int:
        return len(self.finished_at)

    @property
    def wall_s(self) -> float:
        """From the first request to the last completion."""
        if not self.finished_at:
            return float("nan")
        return max(self.finished_at.values()) - self.started_at

    @property
    def throughput(self) -> float:
        """Completed items per second over the whole phase."""
        wall = self.wall_s
        return self.done / wall if wall and wall > 0 else float("nan")

    def completion_curve(self) -> list[float]:
        """Seconds from the start at which each item finished, sorted (for plots)."""
        return sorted(t - self.started_at for t in self.finished_at.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "n": self.n,
            "completed": self.done,
            "failed": self.failed,
            "timed_out": self.timed_out,
            "wall_s": round(self.wall_s, 3),
            "per_second": round(self.throughput, 3),
            "latency_s": {k: round(v, 4) for k, v in summary(self.latencies_s).items()},
            "cpu_s": self.cpu_s,
            "completion_curve_s": [round(t, 3) for t in self.completion_curve()],
            **self.extra,
        }
