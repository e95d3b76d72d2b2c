"""Logging for distnorm: standard ``logging`` loggers that speak on rank 0 only.

A message about the model (a conversion report, a plan) is the same on every rank; printing
it W times buries it. Records pass on other ranks only when logged with
``extra={"all_ranks": True}``.
"""

from __future__ import annotations

import logging

from distnorm import comm

logging.getLogger("distnorm").addHandler(logging.NullHandler())


class RankZeroFilter(logging.Filter):
    """Drop records on ranks other than 0 unless they ask for all ranks."""

    def filter(self, record: logging.LogRecord) -> bool:
        return comm.rank() == 0 or bool(getattr(record, "all_ranks", False))


def get_logger(name: str) -> logging.Logger:
    """``logging.getLogger(name)`` with the rank-zero filter attached (once)."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, RankZeroFilter) for f in logger.filters):
        logger.addFilter(RankZeroFilter())
    return logger
