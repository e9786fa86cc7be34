"""A small progress display for long loops (no tqdm dependency): one updating line on a terminal, sparse lines
in logs."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class Progress:
    """``Progress(total, "epoch 3/6")``, then ``update(n=1, **postfix)`` and ``close()``.

    On a terminal the line is redrawn at most 5 times a second; otherwise a line is printed every 25 %.
    """

    def __init__(self, total: int, desc: str = "", stream: TextIO | None = None, enabled: bool = True):
        self.total, self.desc, self.n = max(int(total), 1), desc, 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = self._last = time.perf_counter()
        self._next_quarter = 0.25
        self.postfix = ""

    def update(self, n: int = 1, **postfix: float | str) -> None:
        self.n += n
        if postfix:
            self.postfix = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in postfix.items())
        if not self.enabled:
            return
        now = time.perf_counter()
        frac = self.n / self.total
        if self.tty and (now - self._last > 0.2 or self.n >= self.total):
            self._last = now
            self.stream.write("\r" + self._line(frac, now))
            self.stream.flush()
        elif not self.tty and frac >= self._next_quarter:
            while frac >= self._next_quarter:
                self._next_quarter += 0.25
            self.stream.write(self._line(frac, now) + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def _line(self, frac: float, now: float) -> str:
        width = 24
        filled = int(width * min(frac, 1.0))
        elapsed = now - self.t0
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        bar = "#" * filled + "-" * (width - filled)
        return f"{self.desc} [{bar}] {self.n}/{self.total} {elapsed:5.0f}s<{eta:4.0f}s {self.postfix}"


def format_epoch(m: dict[str, Any]) -> str:
    """One log line per epoch (search or retraining metrics; missing fields are left out)."""
    parts = [f"epoch {m.get('epoch', '?'):>3}", f"{m.get('phase', ''):<6}"]
    for key, label, fmt in (("train_loss", "loss", ".3f"), ("train_acc", "train", ".3f"),
                            ("heldout_acc", "held-out", ".3f"), ("expected_latency_ms", "E[lat] ms", ".3f"),
                            ("entropy", "H", ".2f"), ("images_per_s", "img/s", ".0f"), ("test_acc", "| test", ".4f")):
        if isinstance(m.get(key), (int, float)):
            parts.append(f"{label} {m[key]:{fmt}}")
    return " ".join(parts)
