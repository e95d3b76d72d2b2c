"""distnorm's log messages describe the model, which is the same on every rank: they are
emitted on rank 0 only (real processes, so that ranks are real)."""

from __future__ import annotations

import logging

from torch import nn

import distnorm
from tests.multiprocess import run_on_ranks


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def conversion_log_worker(rank: int, world_size: int) -> list[str]:
    handler = ListHandler()
    logger = logging.getLogger("distnorm")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    distnorm.convert_model(nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)))
    return handler.messages


def test_conversion_report_is_logged_on_rank_zero_only() -> None:
    rank0, rank1 = run_on_ranks(conversion_log_worker, 2)
    assert len(rank0) == 1 and "SyncBatchNorm" in rank0[0] and "world (2 ranks)" in rank0[0]
    assert rank1 == []
