"""One history reader and one HistoryError (issue 9): analyze and fit read through rescoin.offline.historycsv."""
from __future__ import annotations

import pytest

import rescoin.offline.analysis as analysis
import rescoin.offline.historycsv as historycsv
from rescoin.ops import paths
from rescoin.pathcheck import PathError, writable_dir


def test_analysis_uses_the_historycsv_reader():
    assert analysis.load_history is historycsv.load_history
    assert analysis.HistoryError is historycsv.HistoryError
    assert analysis.HistoryData is historycsv.HistoryData


def test_a_missing_history_is_the_one_history_error(tmp_path):
    with pytest.raises(historycsv.HistoryError, match="no such history file"):
        analysis.load_with_progress([tmp_path / "none.csv"])


def test_ops_paths_and_the_history_writer_share_one_path_error(tmp_path):
    assert paths.PathError is PathError and paths.writable_dir is writable_dir
    (tmp_path / "f").write_text("")
    with pytest.raises(paths.PathError, match="history directory .* exists and is not a directory"):
        historycsv.HistoryWriter(tmp_path / "f", "h")
