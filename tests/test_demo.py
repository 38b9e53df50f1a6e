"""The demo pipeline (byol_flax/demo.py), shrunk to seconds: same steps, same report."""

import json

from byol_flax import demo, report


def test_quick_demo_writes_the_report_with_its_keys_and_files(tmp_path):
    summary = demo.run_demo(tmp_path, seeds=[0], recipes=["small_image"], quick=True)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["seeds"] == [0] == summary["seeds"]
    for key in report.HEADLINE_KEYS + ("total_seconds", "device", "recipes", "accuracies"):
        assert key in saved, key
    for key in ("byol_linear_top1", "random_init_linear_top1", "raw_pixels_linear_top1",
                "byol_knn_top1"):
        assert 0.0 <= saved[key] <= 1.0
    assert saved["train_seconds"] > 0
    # Every accuracy with its split and seed; hyper-parameters chosen on holdout.
    rows = saved["accuracies"]
    assert len(rows) == len(report.METHODS)
    assert {(r["split"], r["selection_split"]) for r in rows} == {("test", "holdout")}
    assert {r["seed"] for r in rows} == {0}
    for plot in saved["plots"].values():
        assert (tmp_path / plot).stat().st_size > 1000, plot
    markdown = (tmp_path / "report.md").read_text()
    assert "## Verdict" in markdown and "small_image" in markdown
    run = tmp_path / "small_image" / "seed_0"
    assert list((run / "pretrain").glob("events.out.tfevents.*"))
    assert (run / "pretrain" / "checkpoints").is_dir()
    assert (run / "linear_random_init" / "results.json").exists()
    assert (tmp_path / "export" / "MODEL_CARD.md").exists()
    card = json.loads((tmp_path / "export" / "model_card.json").read_text())
    assert {e["protocol"] for e in card["evaluations"]} == {"linear", "knn"}
