"""timer: where the handlers' time goes, per handler and event (Ignite's HandlersTimeProfiler), at the end of the run."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ignite_fixmatch.plugins import REPORT, Context

if TYPE_CHECKING:
    from ignite.engine import Engine

# Ignite is imported in attach: handlers are imported and checked before torch loads, so a bad config is refused in about a second.

COLUMNS = ("handler", "event", "total_s", "min_s", "min_at", "max_s", "max_at", "mean_s", "std_s")


class HandlersTimer:
    """At the end of the run (rank 0): the table of every trainer handler's time, per event (total,
    min, max, mean, std), plus the step ("Processing") and the wait for data ("Dataflow"), logged and,
    with ``csv``, written to ``OUTPUT/<file>``.

    Ignite's profiler wraps the handlers when the run starts, whatever their attach order; this one is
    attached after the evaluation and checkpoint handlers (``uses``) so that its table, written at
    COMPLETED, includes their final evaluation and save. The wrapping costs a few microseconds per
    handler call: a diagnostic, not for every run.
    """

    rank_zero_only = True
    uses = ("evaluators", "checkpoints")
    priority = REPORT

    def __init__(self, csv: bool = True, file: str = "handlers_time.csv") -> None:
        if not isinstance(csv, bool):
            raise ValueError(f"csv must be true or false, got {csv!r}")
        if not isinstance(file, str) or not file.strip() or Path(file).is_absolute() or ".." in Path(file).parts:
            raise ValueError(f"file must be a file name inside the output folder, got {file!r}")
        self.csv, self.file = csv, file

    def attach(self, ctx: Context) -> None:
        from ignite.engine import Events
        from ignite.handlers.time_profilers import HandlersTimeProfiler

        self.ctx = ctx
        self.profiler = HandlersTimeProfiler()
        self.profiler.attach(ctx.trainer)
        ctx.trainer.add_event_handler(Events.COMPLETED, self.report)

    def rows(self) -> list[list[Any]]:
        """The profiler's table, one flat row per handler and event (``"None"``/``"not triggered"`` as Ignite gives them)."""
        rows = []
        for row in self.profiler.get_results():
            handler, event, total, min_at, max_at, mean, std = row
            min_at = min_at if isinstance(min_at, tuple) else ("", "")
            max_at = max_at if isinstance(max_at, tuple) else ("", "")
            rows.append([handler, event, total, min_at[0], min_at[1], max_at[0], max_at[1], mean, std])
        return rows

    def report(self, _: Engine) -> None:
        rows = self.rows()
        width = max(len(str(r[0])) for r in rows)
        lines = [f"{'handler':<{width}}  {'event':<20}  {'total s':>10}  {'mean s':>10}  {'max s':>10}"]
        lines += [f"{r[0]:<{width}}  {r[1]:<20}  {r[2]!s:>10}  {r[7]!s:>10}  {r[5]!s:>10}" for r in rows]
        self.ctx.logger.info("Time in handlers (Ignite's HandlersTimeProfiler):\n%s", "\n".join(lines))
        if self.csv:
            path = Path(self.ctx.output_dir) / self.file
            with path.open("w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(COLUMNS)
                writer.writerows(rows)
            self.ctx.logger.info("Handler times written to %s", path)
