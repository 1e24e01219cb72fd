"""The history CSV in one place: its columns, the writer the daemon appends with, and the reader.

``writer`` holds the file's column contract and :class:`HistoryWriter`;
``reader`` holds :func:`load_history` (``rescoin analyze`` and ``rescoin fit``)
and :func:`read_history` (one pandas DataFrame).
"""
from rescoin.offline.historycsv.reader import (
    NUMERIC,
    HistoryData,
    HistoryError,
    expand_paths,
    load_history,
    read_file,
    read_history,
)
from rescoin.offline.historycsv.writer import COLUMNS, HEADER, LABELS, VALUES, HistoryWriter, expand, repair_tail

__all__ = ["COLUMNS", "HEADER", "LABELS", "NUMERIC", "VALUES", "HistoryData", "HistoryError", "HistoryWriter",
           "expand", "expand_paths", "load_history", "read_file", "read_history", "repair_tail"]
