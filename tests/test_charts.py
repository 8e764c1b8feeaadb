"""compare's pictures: the Wilson interval against known values and the avg's effective positions against a hand
count, the data each chart is drawn from against the rows, the curves read back from TensorBoard and CSV logs, and valid PNG files of non-trivial size."""

import pytest
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from rmt_lightning.evaluation.charts import (CURVES, SPLITS, average_effective_positions, comparison_data, curves_data,
                                  draw_comparison, draw_curves, read_scalars, split_intervals, wilson_interval)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_bytes=10_000):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > min_bytes, (path, len(data))


def test_wilson_interval_matches_known_values_and_stays_in_the_unit_interval():
    assert wilson_interval(0.5, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson_interval(0.1, 50) == pytest.approx((0.0435, 0.2136), abs=1e-4)
    low, high = wilson_interval(0.0, 20)
    assert low == 0.0 and high == pytest.approx(0.1611, abs=1e-4)  # not empty at 0, as the normal interval is
    assert wilson_interval(1.0, 20)[1] == 1.0
    # The ends hold the estimate exactly at 0 and 1, where rounding once gave 4e-19 > 0 (matplotlib then refused
    # the chart's negative error bar and the comparison stopped after a row that scored 0%).
    assert all(wilson_interval(0.0, n)[0] == 0.0 and wilson_interval(1.0, n)[1] == 1.0 for n in (10, 420, 444.05, 500))
    width = [high - low for low, high in (wilson_interval(0.3, n) for n in (10, 40, 160))]
    assert width[0] > width[1] > width[2]  # fewer positions (a harder split), wider interval


def test_the_avg_rests_on_its_effective_positions():
    # easy 40 > medium 30 > hard 10, nested: the avg weighs the 10 easy-only positions 1/120 each, the 20
    # medium-only 1/120 + 1/90 = 7/360 and the 10 hard 7/360 + 1/30 = 19/360 (sum 1), so
    # sum w^2 = (10 * 9 + 20 * 49 + 10 * 361) / 129600 = 4680 / 129600.
    assert average_effective_positions({"easy": 40, "medium": 30, "hard": 10}) == pytest.approx(129600 / 4680)
    assert average_effective_positions({"easy": 10, "medium": 10, "hard": 10}) == pytest.approx(10)  # one set
    assert average_effective_positions({"easy": 25, "medium": 0, "hard": 0}) == pytest.approx(25)  # one split
    assert average_effective_positions({"easy": 0, "medium": 0, "hard": 0}) is None
    # Fewer than the easy split's positions, more than the hard split's: the avg leans on the small splits.
    assert 10 < average_effective_positions({"easy": 500, "medium": 200, "hard": 60}) < 500
    intervals = split_intervals({"easy": 50.0, "medium": None, "hard": 10.0, "avg": 30.0}, {"easy": 40, "medium": 30, "hard": 10})
    assert intervals["medium"] is None and intervals["hard"] == pytest.approx(tuple(100 * x for x in wilson_interval(0.1, 10)))
    assert intervals["avg"] == pytest.approx(tuple(100 * x for x in wilson_interval(0.3, 129600 / 4680)))
    assert split_intervals({"avg": 30.0}, {})["avg"] is None  # an older record without positions


def _row(method, scored_by, accuracy, argmax, length, log_dir=None):
    splits = dict(zip(SPLITS, accuracy))
    figures = {f"val/ntp_acc_{s}": a / 100 for s, a in zip(SPLITS, argmax)}
    return {"method": method, "scored_by": scored_by, **splits, "argmax_avg": argmax[-1], "reasoning_length": length,
            "split_positions": {"easy": 40, "medium": 30, "hard": 10}, "figures": figures, "log_dir": log_dir}


def _log(logger, steps):
    for step in range(steps):
        logger.log_metrics({"train/reward": 0.1 * step, "train/reasoning_length": 10.0 - step, "train/budget": 8.0}, step)
    logger.finalize("success")


def test_chart_data_holds_every_row_and_the_pictures_are_valid_png(tmp_path):
    tensorboard, csv_logger = TensorBoardLogger(str(tmp_path), name="tb"), CSVLogger(str(tmp_path), name="csv")
    _log(tensorboard, 3)
    _log(csv_logger, 4)
    rows = [_row("base model (untrained)", "reasoning", [2.0, 2.5, 0.0, 1.5], [40.0, 42.0, 30.0, 37.3], 4.0),
            _row("RMT", "reasoning", [10.0, 5.0, 0.0, 5.0], [45.0, 44.0, 40.0, 43.0], 1.5, tensorboard.log_dir),
            _row("NTP only", "argmax", [50.0, 40.0, 30.0, 40.0], [50.0, 40.0, 30.0, 40.0], None, csv_logger.log_dir)]

    data = comparison_data(rows)
    assert [entry["method"] for entry in data] == [row["method"] for row in rows]
    for entry, row in zip(data, rows):
        assert entry["accuracy"] == {s: row[s] for s in SPLITS} and entry["reasoning_length"] == row["reasoning_length"]
        assert entry["argmax"] == pytest.approx({s: 100 * row["figures"][f"val/ntp_acc_{s}"] for s in SPLITS})
        for split, positions in row["split_positions"].items():
            low, high = wilson_interval(row[split] / 100, positions)
            assert entry["accuracy_interval"][split] == pytest.approx((100 * low, 100 * high))
            assert entry["accuracy_interval"][split][0] <= row[split] <= entry["accuracy_interval"][split][1]
        low, high = wilson_interval(row["avg"] / 100, 129600 / 4680)  # test_the_avg_rests_on_its_effective_positions
        assert entry["accuracy_interval"]["avg"] == pytest.approx((100 * low, 100 * high))

    curves = curves_data(rows)
    assert [entry["method"] for entry in curves] == [row["method"] for row in rows]
    assert all(entry["curves"][tag] == ([], []) for entry in curves[:1] for tag in CURVES)  # no log_dir: nothing
    assert curves[1]["curves"]["train/reward"][0] == [0, 1, 2]  # from the TensorBoard events
    assert curves[1]["curves"]["train/reward"][1] == pytest.approx([0.0, 0.1, 0.2])
    assert curves[2]["curves"]["train/reasoning_length"] == ([0, 1, 2, 3], [10.0, 9.0, 8.0, 7.0])  # from metrics.csv

    assert_png(draw_comparison(data, tmp_path / "comparison.png"))
    assert_png(draw_curves(curves, tmp_path / "curves.png"))


def test_a_row_that_scores_zero_everywhere_draws(tmp_path):
    row = _row("RMT w/o curriculum", "reasoning", [0.0, 0.0, 0.0, 0.0], [42.0, 41.0, 40.0, 41.0], 1.0)
    row["split_positions"] = {"easy": 500, "medium": 420, "hard": 320}
    data = comparison_data([row])
    assert all(data[0]["accuracy_interval"][s][0] == 0.0 for s in SPLITS)
    # An interval that misses its value by rounding (as one rebuilt from a table's two decimals can) still draws.
    data[0]["accuracy_interval"]["easy"] = (0.01, 0.8)
    assert_png(draw_comparison(data, tmp_path / "comparison.png"))


def test_read_scalars_of_a_missing_folder_is_empty(tmp_path):
    assert read_scalars(tmp_path / "absent") == {tag: ([], []) for tag in CURVES}
    assert read_scalars(None)["train/reward"] == ([], [])
