"""What a resumed run may change: config keys compared with the config its checkpoint was
trained with.

Every checkpoint holds the full config of the run that wrote it plus the identity of its data
(the sha256 of the training manifest). On resume:

* runtime and initialisation keys (their :class:`byol_flax.config.Role`, declared next to
  their defaults: workers, threads, logging, monitors, checkpoint cadence, convolution
  implementation, ``init_from``, ...) change freely;
* every trained key (batch, epochs, learning rate, weight decay, tau, multipliers, loss,
  augmentation, seed, the data's identity) is refused with the old and new values unless it is
  named in ``--allow_config_change``. Unknown keys count as trained keys: a new key is safe by
  default.

Changes that are accepted are appended to ``<workdir>/config_history.jsonl`` (step, time, key,
old, new, kind), which the model card shows; ``config.json`` is rewritten only together with
such a record. A run started from an export (``model.init_from``) records there, at step 0 and
of kind ``init``, the export and the fingerprint of the encoder it loaded.

The code a run trains with (:func:`byol_flax.runtime.code_identity.code_identity`: version and
commit) is in the run record too, but it is not a config key: a resume under other code is never
refused. It is recorded in the history as kind ``code``: at step 0 when a run starts, and at the
resumed step when the code differs from the checkpoint's (logged as a warning). A checkpoint
written before code was recorded counts as unknown: one entry, old None, says from which step on
the code is known, without a warning.
"""

import datetime
import hashlib
import json
import logging
from collections.abc import Sequence
from typing import Any

from etils import epath

from byol_flax.config import Role, flatten_dotted, role_of
from byol_flax.data.records import manifest_path
from byol_flax.errors import UserError
from byol_flax.runtime.code_identity import code_identity, describe, same_code
from byol_flax.storage import files, json_files, schemas

# Trained keys added after checkpoints were written without them, each with the value that
# reproduces what those runs did (or a function of the record giving it): a saved config that
# lacks the key compares as this value, so a resume of an older checkpoint is not refused for a
# key it could not have had.
KEYS_ADDED_LATER: dict[str, Any] = {
    "augment.crop_reduced_decode": False,  # full-resolution decoding, as before the key existed
    # The Vision Transformer options, at the values that leave a ResNet as it was.
    "model.encoder.patch_size": 0,
    "model.encoder.num_heads": 0,
    "model.encoder.pooling": "token",
    "model.encoder.position_embedding": "sincos",
    "model.encoder.freeze_patch_projection": False,
    "model.encoder.image_size": lambda record: record.get("data.image_size"),
    "optimizer.kind": "lars",  # AdamW's keys: unused by LARS, at their defaults
    "optimizer.adam_b1": 0.9,
    "optimizer.adam_b2": 0.999,
    "optimizer.adam_eps": 1e-8,
}
DATA_IDENTITY_KEY = "data.manifest_sha256"
HISTORY_NAME = "config_history.jsonl"
INIT_KIND = "init"  # the history entry of where a new run's weights came from
CODE_KIND = "code"  # the history entry of the code a run trains with from that step on
CONFIG_NAME = "config.json"


class ConfigChangeError(UserError, ValueError):
    """A resumed run's config changes what the checkpoint was trained with."""


def manifest_sha256(data_dir: str) -> str:
    """The data's identity: the sha256 of its manifest (which holds every shard's sha256)."""
    return hashlib.sha256(files.read_bytes(manifest_path(data_dir), what="manifest")).hexdigest()


def run_record(config_json: str, data_identity: str) -> dict[str, Any]:
    """What a checkpoint stores about its run: the config (JSON form), the data identity and the
    code identity (compared apart from the config: :func:`record_code`)."""
    return {"config": json.loads(config_json), "data": {"manifest_sha256": data_identity},
            "code": code_identity()}


def _record_keys(record: dict[str, Any]) -> dict[str, Any]:
    keys = flatten_dotted(record.get("config", {}))
    keys[DATA_IDENTITY_KEY] = record.get("data", {}).get("manifest_sha256")
    return keys


def _under(key: str, sections: Sequence[str]) -> bool:
    """``key`` is one of ``sections`` or inside one of them (dotted)."""
    return any(key == section or key.startswith(section + ".") for section in sections)


def is_runtime_key(key: str) -> bool:
    """A key a resume may change freely: its declared role is runtime or initialisation (the
    data's identity and undeclared keys are trained)."""
    role = role_of(key)
    return role is not None and role.role is not Role.TRAINED


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[dict[str, Any]]:
    """Every key whose value differs between two run records, with its kind."""
    old, new = _record_keys(saved), _record_keys(current)
    for key, value in KEYS_ADDED_LATER.items():
        for record in (old, new):
            if key not in record:
                record[key] = value(record) if callable(value) else value
    out = []
    for key in sorted(old.keys() | new.keys()):
        if old.get(key) != new.get(key):
            out.append({"key": key, "old": old.get(key), "new": new.get(key),
                        "kind": "runtime" if is_runtime_key(key) else "trained"})
    return out


def check_resume(saved: dict[str, Any], current: dict[str, Any], *, step: int, where: str,
                 allowed: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The changes a resume at ``step`` makes; raises :class:`ConfigChangeError` naming every
    trained key that changed without being allowed (old -> new) and the flag that allows them."""
    changes = differences(saved, current)
    refused = [c for c in changes if c["kind"] == "trained" and not _under(c["key"], allowed)]
    if refused:
        listed = "; ".join(f"{c['key']}: {c['old']!r} -> {c['new']!r}" for c in refused)
        keys = ",".join(c["key"] for c in refused)
        raise ConfigChangeError(
            f"resuming {where} at step {step} would change what is trained: {listed}. Resume with "
            f"the config the checkpoint was trained with (saved in it and in {CONFIG_NAME}), "
            f"start a new --workdir, or accept the change with --allow_config_change={keys} "
            f"(recorded in {HISTORY_NAME} and the model card). The checkpoints are intact.")
    return changes


_HISTORY_ENTRY = schemas.Obj({"step": int, "kind": str})


def _history_lines(path: epath.Path) -> list[str]:
    """The non-empty lines of the history file (none when it does not exist)."""
    if not files.exists(path):
        return []
    text = files.read_text(path, what="config history")
    return [line for line in text.splitlines() if line.strip()]


def _entry(line: str, path: epath.Path) -> dict[str, Any]:
    return json_files.loads(line, name=f"config history {path}", spec=_HISTORY_ENTRY)


def _write_history(path: epath.Path, lines: Sequence[str]) -> None:
    files.write_text(path, "".join(line + "\n" for line in lines), what="config history")


def record_changes(workdir: epath.Path, step: int, changes: Sequence[dict[str, Any]]) -> None:
    """Appends accepted changes to the workdir's config history (one JSON object per line)."""
    if not changes:
        return
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    lines = [json.dumps({"step": step, "time": now, **change}, sort_keys=True, default=str)
             for change in changes]
    path = workdir / HISTORY_NAME
    _write_history(path, _history_lines(path) + lines)  # gs:// has no append
    for change in changes:
        logging.warning("config change at step %d (%s): %s: %r -> %r", step, change["kind"],
                        change["key"], change["old"], change["new"])


def record_init(workdir: epath.Path, key: str, value: Any) -> None:
    """Records what a new run was initialised from (``key``: the config key, ``value``: e.g. the
    export's path and fingerprint) as the history's step-0 entry. An earlier entry of this kind,
    left by a start that wrote no checkpoint, is replaced."""
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    entry = {"step": 0, "time": now, "kind": INIT_KIND, "key": key, "old": None, "new": value}
    path = workdir / HISTORY_NAME
    kept = [line for line in _history_lines(path) if _entry(line, path)["kind"] != INIT_KIND]
    kept.append(json.dumps(entry, sort_keys=True, default=str))
    _write_history(path, kept)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def record_code(workdir: epath.Path, step: int, saved: dict[str, Any] | None,
                current: dict[str, Any]) -> dict[str, Any] | None:
    """Records the code ``current`` (a run record) trains with from ``step`` on, as the history
    entry of kind ``code``: for a new run (``saved`` None), for a resume whose checkpoint's run
    record ``saved`` names other code (a warning, old -> new) or none (written before code was
    recorded: old None). An earlier code entry at the same step, left by a start that wrote no
    checkpoint after it, is replaced. Returns the entry (None when the code is the checkpoint's)."""
    new = current.get("code")
    entry: dict[str, Any] | None = {"step": step, "time": _now(), "kind": CODE_KIND,
                                    "key": CODE_KIND, "old": None, "new": new}
    if saved is None:
        logging.info("code: %s", describe(new))
    elif saved.get("code") is None:
        logging.info("code recorded from step %d on (the checkpoint predates code records): %s",
                     step, describe(new))
    elif not same_code(saved["code"], new):
        entry["old"] = saved["code"]
        logging.warning("code changed at step %d: %s -> %s", step, describe(saved["code"]),
                        describe(new))
    else:
        entry = None
    path = workdir / HISTORY_NAME
    lines = _history_lines(path)
    kept = [line for line in lines
            if not (_entry(line, path)["kind"] == CODE_KIND and _entry(line, path)["step"] == step)]
    if entry is not None:
        kept.append(json.dumps(entry, sort_keys=True, default=str))
    if kept != lines:
        _write_history(path, kept)
    return entry


def code_entries(history: Sequence[dict[str, Any]], step: int | None = None
                 ) -> list[dict[str, Any]]:
    """The code entries of ``history`` that the weights of ``step`` were trained under: those
    recorded before it (an entry at a step names the code of the steps after it)."""
    return [e for e in history
            if e.get("kind") == CODE_KIND and (step is None or e["step"] < step)]


def code_at(history: Sequence[dict[str, Any]], step: int | None = None) -> dict[str, Any] | None:
    """The code identity the weights of ``step`` (the last, by default) were trained with: that
    of the newest code entry before it; None when none was recorded."""
    entries = code_entries(history, step)
    return entries[-1]["new"] if entries else None


def read_history(workdir: epath.PathLike, up_to_step: int | None = None) -> list[dict[str, Any]]:
    """The workdir's recorded config changes (those made at or before ``up_to_step``)."""
    path = epath.Path(workdir) / HISTORY_NAME
    entries = [_entry(line, path) for line in _history_lines(path)]
    return [e for e in entries if up_to_step is None or e["step"] <= up_to_step]
