"""The code a run trains with: found from the git checkout or pip's ``direct_url.json``, stored in
every checkpoint's run record and in the workdir's config history, and a resume under other code
logged, recorded and shown in the model card without being refused."""

import json
import logging
import shutil
import subprocess
from pathlib import Path

import jax
import pytest

import byol_flax
from byol_flax import train
from byol_flax.checkpointing import Checkpointer, Restored, config_changes
from byol_flax.export import model_card
from byol_flax.runtime import code_identity
from tests.helpers import tiny_config
from tests.test_checkpointing import new_state, one_device
from tests.test_init_from import run_config, small_encoder  # noqa: F401 (fixture: autouse)
from tests.test_train_driver import data_dir  # noqa: F401 (a fixture: the digits, converted)

REPO = Path(__file__).resolve().parents[1]
OLD = {"version": "0.1.0", "commit": "a" * 40, "dirty": False, "source": "git checkout"}
NEW = {"version": "0.2.0", "commit": "b" * 40, "dirty": True, "source": "git checkout"}


def git(directory: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=directory, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(),
                    reason="needs the package's git checkout")
def test_a_git_checkout_gives_its_head_and_whether_tracked_files_changed():
    found = code_identity.identify(Path(byol_flax.__file__).resolve().parent)
    assert found["commit"] == git(REPO, "rev-parse", "HEAD")
    assert found["dirty"] == bool(git(REPO, "status", "--porcelain", "--untracked-files=no"))
    assert found["source"] == "git checkout" and found["version"] == byol_flax.__version__
    assert code_identity.code_identity() is code_identity.code_identity()  # once per process
    assert code_identity.source_commit() == code_identity.code_identity()["commit"]


class FakeDistribution:
    """What importlib.metadata.distribution returns for an installed byol_flax."""

    version = "9.9.9"

    def __init__(self, direct_url: dict | None):
        self.direct_url = direct_url

    def read_text(self, name: str) -> str | None:
        assert name == "direct_url.json"
        return None if self.direct_url is None else json.dumps(self.direct_url)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_an_install_from_a_commit_gives_pips_commit_not_an_enclosing_repository(tmp_path,
                                                                                monkeypatch):
    """A package in a virtualenv that lies inside some repository: that repository's HEAD is
    not the package's code; pip's direct_url.json is."""
    git(tmp_path, "init", "-q")
    package = tmp_path / ".venv" / "site-packages" / "byol_flax"
    package.mkdir(parents=True)
    commit = "c" * 40
    record = {"url": "https://example.org/byol_flax.git",
              "vcs_info": {"vcs": "git", "commit_id": commit}}
    monkeypatch.setattr(code_identity.importlib.metadata, "distribution",
                        lambda name: FakeDistribution(record))
    assert code_identity.identify(package) == {
        "version": "9.9.9", "commit": commit, "dirty": False,
        "source": "pip direct_url"}
    monkeypatch.setattr(code_identity.importlib.metadata, "distribution",
                        lambda name: FakeDistribution({"dir_info": {"editable": True}}))
    assert code_identity.identify(package)["commit"] is None


def test_no_git_and_no_record_is_unknown_not_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no git on it
    monkeypatch.setattr(code_identity.importlib.metadata, "distribution",
                        lambda name: FakeDistribution(None))
    found = code_identity.identify(REPO / "byol_flax")
    assert found["commit"] is None and found["version"] == "9.9.9"
    assert code_identity.describe(found) == "byol_flax 9.9.9 (commit unknown)"


def test_code_entries_start_change_replace_and_predate(tmp_path, caplog):
    """A new run records its code at step 0; a resume under the same code adds nothing (and
    drops a code entry at its step left by a start that wrote no checkpoint); other code is a
    warning with old -> new; a checkpoint without code is unknown: one entry, no warning."""
    old, new = {"code": OLD}, {"code": NEW}
    with caplog.at_level(logging.INFO):
        config_changes.record_code(tmp_path, 0, None, old)
        config_changes.record_code(tmp_path, 4, old, new)
        assert config_changes.record_code(tmp_path, 4, old, old) is None
        config_changes.record_code(tmp_path, 8, {"config": {}}, new)
    history = config_changes.read_history(tmp_path)
    assert [(h["step"], h["old"], h["new"], h["kind"]) for h in history] == [
        (0, None, OLD, "code"), (8, None, NEW, "code")]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"code changed at step 4: byol_flax 0.1.0 at {'a' * 12} -> "
                        f"byol_flax 0.2.0 at {'b' * 12} (uncommitted changes)"]
    assert config_changes.code_at(config_changes.read_history(tmp_path, up_to_step=4)) == OLD
    # Code is never a config difference: check_resume stays about the config.
    same = config_changes.run_record("{}", "d")
    assert config_changes.differences({**same, "code": OLD}, {**same, "code": NEW}) == []


def card_code_section(export) -> list[str]:
    markdown = (export / model_card.CARD_MARKDOWN).read_text()
    assert "## Config changes during pre-training\nNone: trained start to end" in markdown
    return markdown.split("## Code\n")[1].split("\n\n")[0].splitlines()


def assert_changed_code_recorded(workdir, tmp_path, messages: list[str]) -> None:
    """The resume at step 2 under NEW of a run started under OLD: warned, in the history (the
    workdir's record of the code), in the checkpoints' run records and the model card."""
    assert (f"code changed at step 2: byol_flax 0.1.0 at {'a' * 12} -> byol_flax 0.2.0 at "
            f"{'b' * 12} (uncommitted changes)") in messages
    history = config_changes.read_history(workdir)
    assert [(h["step"], h["old"], h["new"]) for h in history if h["kind"] == "code"] == [
        (0, None, OLD), (2, OLD, NEW)]
    for step, code in ((2, OLD), (4, NEW)):
        record = json.loads((workdir / "checkpoints" / str(step) / "config" / "metadata")
                            .read_text())
        assert record["code"] == code
    card = model_card.read_model_card(model_card.export_with_model_card(
        str(workdir), str(tmp_path / "export")))
    assert card["code"] == NEW
    assert card_code_section(tmp_path / "export") == [
        f"- Trained with byol\\_flax 0.2.0 at {'b' * 12} (uncommitted changes); in full "
        f"{model_card.inert_code(NEW)}.",
        f"- Step 0: recorded from here on: byol\\_flax 0.1.0 at {'a' * 12}.",
        f"- Step 2: byol\\_flax 0.1.0 at {'a' * 12} -> byol\\_flax 0.2.0 at {'b' * 12} "
        "(uncommitted changes)."]
    # What an export of step 2 shows: its weights were trained with the old code.
    assert config_changes.code_at(config_changes.read_history(workdir, 2), 2) == OLD


def test_a_resume_under_other_code_is_logged_recorded_and_in_the_model_card(
        tmp_path, monkeypatch, caplog):
    """The loop's record step (train._record_config) on checkpoints written and restored by the
    Checkpointer: a start under OLD, a resume at step 2 under NEW that is not refused."""
    workdir = tmp_path / "run"
    config = tiny_config()
    config.checkpoint.async_save = False
    _, state = new_state(config)

    def run_record():
        return config_changes.run_record(config.to_json_best_effort(), "d" * 64)

    def checkpointer(run):
        return Checkpointer(workdir / "checkpoints", config, run, total_steps=4)

    workdir.mkdir()
    monkeypatch.setattr(config_changes, "code_identity", lambda: OLD)
    old_run = run_record()
    train._record_config(workdir, config, Restored(None, state, {}, None), old_run, ())
    saver = checkpointer(old_run)
    saver.save(2, state, counters={"examples_consumed": 32, "skipped_records": 0})
    saver.close()

    monkeypatch.setattr(config_changes, "code_identity", lambda: NEW)
    new_run = run_record()
    saver = checkpointer(new_run)
    restored = saver.restore_latest(state, one_device())
    assert restored.step == 2 and restored.run["code"] == OLD
    with caplog.at_level(logging.INFO):
        train._record_config(workdir, config, restored, new_run, ())  # not refused
    saver.save(4, restored.state, counters={"examples_consumed": 64, "skipped_records": 0})
    saver.close()
    assert_changed_code_recorded(workdir, tmp_path,
                                 [r.getMessage() for r in caplog.records
                                  if r.levelno == logging.WARNING])


@pytest.mark.scenario  # ~1-2 min on 2 cores (a compile): the same through the training loop
def test_a_resumed_training_run_under_other_code_records_it(data_dir, tmp_path,
                                                            monkeypatch, caplog):
    from byol_flax import sharding

    monkeypatch.setattr(train, "make_mesh", lambda: sharding.make_mesh(jax.devices()[:1]))
    workdir = tmp_path / "run"
    monkeypatch.setattr(config_changes, "code_identity", lambda: OLD)
    train.train_and_evaluate(run_config(data_dir), workdir)  # 4 steps, checkpoints 2 and 4
    shutil.rmtree(workdir / "checkpoints" / "4")  # as if it had stopped after step 2
    monkeypatch.setattr(config_changes, "code_identity", lambda: NEW)
    with caplog.at_level(logging.INFO):
        train.train_and_evaluate(run_config(data_dir), workdir)  # not refused
    assert_changed_code_recorded(workdir, tmp_path,
                                 [r.getMessage() for r in caplog.records
                                  if r.levelno == logging.WARNING])
