"""The reliability suite's fast subset (benchmarks/reliability.py --quick) meets its targets:
kill -9 at random moments resumes bitwise, SIGTERM loses no step, damaged checkpoints and data
are named (or the newest valid step is used), bad configs get a message naming the key. (The
NaN-batch case runs in the full suite; tests/test_train_driver.py checks a diverging run.)"""

import json

import pytest

from benchmarks import reliability


@pytest.mark.slow  # ~90 s: the reliability suite's quick version (kills, resumes)
def test_quick_reliability_suite_meets_its_targets(tmp_path, capsys):
    code = reliability.main(["--quick", "--workdir", str(tmp_path)])
    output = capsys.readouterr().out
    summary = json.loads(output.strip().splitlines()[-1])
    assert summary["targets"] and all(summary["targets"].values()), summary["targets"]
    assert code == 0
    assert summary["kill9"]["trials"] == 1 and summary["kill9"]["bitwise_equal_share"] == 1.0
    assert summary["sigterm"]["steps_lost"] == 0 and summary["sigterm"]["exit"] == 0
    assert any("config.model.predictor.kind='mlpp'" in c["message"]
               for c in summary["bad_configs"])
    assert summary["damaged_checkpoints"][0]["bitwise_equal"]
    assert "## Bad configs" in output
