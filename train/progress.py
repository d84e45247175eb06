"""What cogtrain shows while it trains: the start banner, the steps' progress and validation's own progress.

On a terminal the steps are a rich bar; with ``--no-progress``, or when the output goes to a file or a pipe, they
are a plain log line every ``--log-every`` steps (a bar there is a stream of carriage returns). Either way the
s/step figure and the ETA come from the steps' own times (the median of the last `STEP_TIME_WINDOW`), so the
minutes a validation round or a checkpoint takes never inflate them; validation shows a progress of its own.
Everything but the bar goes through the logger (`shared.log`), which leaves it to rank 0.
"""

from __future__ import annotations

import logging
import statistics
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..shared.log import process_rank

log = logging.getLogger(__name__)

STEP_TIME_WINDOW = 20
"""Steps the s/step figure is the median of: recent enough to follow a change of bucket or load."""
LOG_LINES_PER_RUN = 20
"""Without a bar and without --log-every, about this many step lines over the run."""


def default_log_every(steps: int) -> int:
    """Steps between log lines when --log-every is not given: about `LOG_LINES_PER_RUN` lines, at least 1 step."""
    return max(1, steps // LOG_LINES_PER_RUN)


def wants_bar(progress: bool) -> bool:
    """A bar only on a terminal: stdout and stderr both (rich draws on stderr; stdout piped to `tee` is a log)."""
    return progress and sys.stdout.isatty() and sys.stderr.isatty() and log.isEnabledFor(logging.INFO)


def duration(seconds: float) -> str:
    """``1:02:03`` or ``2:03``."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def start_banner(*, run: Path, start_step: int, max_steps: int, resumed_from: Path | None, processes: int,
                 device: str, store: Path, row_buckets: list[str | None], batch_sizes: dict[str, int],
                 held_out: int, steps_per_epoch: int, accumulation: int) -> str:
    """The lines a run starts with: fresh or resumed at which step, processes, store, buckets and samples, steps."""
    if resumed_from is None:
        first = f"new run in {run}"
    else:
        first = f"resuming {run} at step {start_step} (from {resumed_from})"
    samples = Counter(bucket for bucket in row_buckets if bucket is not None)
    buckets = ", ".join(f"{name} {count} (batch {batch_sizes[name]})" for name, count in sorted(samples.items()))
    kept = f", {held_out} held out for evaluation" if held_out else ""
    epochs = max_steps * accumulation / steps_per_epoch
    plural = "es" if processes > 1 else ""
    return "\n".join([
        first,
        f"  {processes} process{plural} on {device}",
        f"  store {store}: {sum(samples.values())} training samples{kept} in {len(samples)} buckets: {buckets}",
        f"  {max_steps} steps planned ({epochs:.3g} epochs at {steps_per_epoch} batches an epoch per process), "
        f"{max_steps - start_step} to go",
    ])


class RunProgress:
    """The steps' progress, on the main process: a bar, or a log line every `log_every` steps."""

    def __init__(self, total: int, start: int, *, bar: bool, log_every: int | None) -> None:
        self.total, self.start = total, start
        self.log_every = log_every or default_log_every(total - start)
        self.step_times: deque[float] = deque(maxlen=STEP_TIME_WINDOW)
        self._wants_bar = bar and process_rank() == 0
        self._bar = _rich_bar() if self._wants_bar else None
        if self._bar is not None:
            self._task = self._bar.add_task("cogtrain", total=total, completed=start, status="")

    def seconds_per_step(self) -> float:
        return statistics.median(self.step_times) if self.step_times else float("nan")

    def status(self, step: int, metrics: dict[str, float]) -> str:
        """loss, s/step and ETA (the steps left at the recent s/step; validation rounds not counted)."""
        per_step = self.seconds_per_step()
        return (f"loss {metrics['loss']:.4f}  {per_step:.3g} s/step  "
                f"ETA {duration(per_step * (self.total - step))}")

    def step_done(self, step: int, metrics: dict[str, float]) -> None:
        self.step_times.append(metrics["step_time"])
        log.debug("step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        if self._bar is not None:
            self._bar.update(self._task, completed=step, status=self.status(step, metrics))
        elif step % self.log_every == 0 or step == self.total:
            log.info("step %d/%d  %s", step, self.total, self.status(step, metrics))

    @contextmanager
    def validation(self, step: int, videos: int, inference_steps: int) -> Iterator[Callable[..., Any]]:
        """Announce a validation round and yield the callback the pipeline calls after each denoising step
        (``callback_on_step_end``): it moves validation's own bar, never the steps'."""
        log.info("validation at step %d: %d video%s of %d inference steps", step, videos, "s" * (videos != 1),
                 inference_steps)
        started = time.perf_counter()
        # after the last step the steps' bar is closed: the final round gets a bar of its own
        bar = self._bar or (_rich_bar() if self._wants_bar else None)
        task = None
        if bar is not None:
            task = bar.add_task(f"validation at step {step}", total=videos * inference_steps, status="")

        def denoised(pipe, i, t, tensors):  # the pipeline's callback signature; it takes back what it gives
            if task is not None:
                bar.advance(task)
            return tensors

        try:
            yield denoised
        finally:
            if task is not None:
                bar.remove_task(task)
            if bar is not None and bar is not self._bar:
                bar.stop()
            log.info("validation at step %d: took %s", step, duration(time.perf_counter() - started))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _rich_bar():
    """A started rich progress display on stderr: description, bar, done/total, and a status text."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[status]}"), console=Console(stderr=True))
    bar.start()
    return bar
