"""Progress lines for long jobs: how far, how fast lately, and when the job will end.

    progress = Progress(480, "step")
    for batch in batches:
        train_step(batch)
        if progress.advance():                    # True when a line is due (LINES lines a run, and the last step)
            print(f"step {progress.done}/{progress.total} | {progress.status()}")

The rate is measured over the last `window` steps and never counts the first one: the first step carries the
start-up (first calls, caches filling, memory being allocated), and an average since the start lets it dominate
the early estimates (an ETA six times too long on the first line of a 9-minute training run). Whatever happens
between two steps (a validation pass between epochs) is part of the step after it, so a window longer than an
epoch spreads that cost over the remaining steps as it will really fall.

Depends on nothing but the standard library.
"""
import time
from collections import deque

LINES = 50              # progress lines a whole job prints, at most
RATE_WINDOW = 20        # steps whose timing gives the rate: recent enough to forget start-up, enough to smooth


def duration(seconds):
    """Seconds -> '42s', '8m30s' or '1h05m'."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Counts steps of a job of `total` steps (`done` already done, e.g. after a resume) and times them."""

    def __init__(self, total, unit="step", done=0, lines=LINES, window=RATE_WINDOW, clock=time.perf_counter):
        self.total, self.unit, self.done = total, unit, done
        self.every = max(1, -(-(total - done) // lines))    # ceil: at most `lines` lines
        self.clock = clock
        self.times = deque(maxlen=max(2, window + 1))       # (steps done, clock) after each step, from the first
        self.start = clock()

    def advance(self, n=1):
        """Record n more steps done; True when a progress line is due."""
        self.done += n
        self.times.append((self.done, self.clock()))
        return self.done >= self.total or self.done % self.every < n

    def rate(self):
        """Steps a second over the recent window (the first step excluded), or None before two steps are timed."""
        if len(self.times) < 2:
            return None
        (d0, t0), (d1, t1) = self.times[0], self.times[-1]
        return (d1 - d0) / max(t1 - t0, 1e-9)

    def eta(self):
        """Seconds left at the recent rate, or None while unknown."""
        rate = self.rate()
        return None if rate is None else (self.total - self.done) / rate

    def elapsed(self):
        return self.clock() - self.start

    def status(self):
        """'0.85 step/s | ETA 8m30s'; the time so far while the rate is unknown; the whole time at the end."""
        rate, eta = self.rate(), self.eta()
        if rate is None:
            return f"first {self.unit} took {duration(self.elapsed())}, ETA from the next"
        speed = f"{rate:.2f} {self.unit}/s" if rate >= 1 else f"{1 / rate:.2f} s/{self.unit}"
        if self.done >= self.total:
            return f"{speed} | done in {duration(self.elapsed())}"
        return f"{speed} | ETA {duration(eta)}"

    def line(self, label):
        """'label 12/480 steps | 0.85 step/s | ETA 8m30s'."""
        return f"{label} {self.done}/{self.total} {self.unit}s | {self.status()}"
