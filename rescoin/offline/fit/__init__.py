"""Fit predictor parameters to history: ``rescoin fit HISTORY... -o models/NAME.toml``.

Each VM's recorded usage and unmet-demand signal are replayed through a real
:class:`~rescoin.core.predict.PaddedEWMA`, one period at a time and vectorised over
all VMs and over many candidate parameter sets at once; the forecast made after
period t is scored against the usage of period t+1 with a loss that weighs
under-estimation more (it hurts VMs; over-estimation only wastes the host)::

    loss = sum(w_under * max(usage - forecast, 0) + max(forecast - usage, 0)) / sum(usage)

Per resource, ``alpha_up, alpha_down, pad_error, pad_std, pad_frac`` are chosen
by coordinate search over a grid (each stage tries every combination of one
group of parameters with the others held at their best so far, and always
includes the current values, so the loss never rises). The other parameters
(growth, threshold, hold_last, season, max_growth, pad_beta) come from the base
model. The first part of each VM's series is used for fitting; the last
``--holdout`` share is held back to compare the fitted and the base model on
data the search never saw.

Candidates run side by side as rows: row block k of the replayed rows is
candidate k, built with :meth:`PaddedEWMA.from_rows`, the predictor's public
constructor for per-row parameters.

The parts: :mod:`.series` (grid, parts, replay), :mod:`.search` (the coordinate search), :mod:`.report`
(summaries, the model file); the command line is :mod:`rescoin.cli.fit`.
"""
from __future__ import annotations

from rescoin.offline.fit.report import (
    check_table,
    command_line,
    model_text,
    output_problem,
    per_vm_lines,
    show_path,
    summary,
    write_model,
)
from rescoin.offline.fit.search import FitResult, fit
from rescoin.offline.fit.series import (
    DEFAULT_BASE,
    DEFAULT_UNDER_WEIGHT,
    FIT,
    FITTED,
    GRID,
    HELD,
    MIN_PERIODS,
    PER_VM_DAYS,
    STAGES,
    WARN_PERIODS,
    Series,
    Sums,
    history_length_problem,
    parts,
    replay,
    series_from_history,
)

__all__ = [
    "DEFAULT_BASE", "DEFAULT_UNDER_WEIGHT", "FIT", "FITTED", "GRID", "HELD", "MIN_PERIODS", "PER_VM_DAYS", "STAGES",
    "WARN_PERIODS", "FitResult", "Series", "Sums", "check_table", "command_line", "fit", "history_length_problem",
    "model_text", "output_problem", "parts", "per_vm_lines", "replay", "series_from_history", "show_path",
    "summary", "write_model",
]
