"""The one I/O layer (byol_flax/storage): its rules, the readers and writers built on it, and a
guard that no module opens, reads or writes a file by itself (docs/security.md)."""

import ast
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from byol_flax.checkpointing import lease
from byol_flax.data import augment
from byol_flax.data.convert.image_io import BadImage, decode_fully
from byol_flax.storage import files, json_files, schemas
from byol_flax.storage.images import open_image

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "byol_flax"

# ---------------------------------------------------------------------------------------------
# No reader or writer outside the layer

# Calls that touch a file's contents. A method call on the storage layer's own modules
# (``files.read_text``) is the layer; ``json.loads`` of JSON this process just made (its
# argument a ``json.dumps`` / ``to_json`` call) reads no file.
_FILE_METHODS = {"write_text", "write_bytes", "read_text", "read_bytes", "open"}
_FUNCTIONS = {"open", "json.load", "json.loads", "json.dump", "os.open", "os.replace",
              "np.load", "np.save", "np.lib.format.open_memmap", "Image.open", "shutil.copy",
              "shutil.copyfile", "pickle.load", "pickle.loads"}
_LAYER_NAMES = {"files", "json_files", "schemas"}
_MADE_HERE = {"dumps", "to_json", "to_json_best_effort"}
# (file, call) -> (calls allowed, why). A stale entry fails the test too.
ALLOWED = {
    ("byol_flax/runtime/code_identity.py", "importlib.metadata.distribution(distribution)"
     ".read_text"): (1, "the installed package's own metadata, through importlib.metadata"),
    ("byol_flax/runtime/code_identity.py", "json.loads"):
        (1, "parses that metadata (direct_url.json, written by pip)"),
    ("byol_flax/weights/safe_pickle/files.py", "os.open"):
        (1, "the release reader's own checked open (non-blocking, fstat re-check), kept beside "
            "the pickle machine it serves; tests/test_safe_pickle.py"),
    ("byol_flax/checkpointing/lease.py", "os.open"):
        (1, "opens the workdir directory itself for flock: no file content"),
    ("byol_flax/data/convert/order.py", "open"):
        (4, "the converter's spool, in a directory it has just created (mkdir without "
            "exist_ok: nothing can be planted in it)"),
    ("byol_flax/data/convert/order.py", "json.loads"):
        (1, "an entry header of that spool, written by this process"),
    ("byol_flax/checkpointing/config_changes.py", "json.loads"):
        (1, "the config's JSON text, made by config.to_json() in this process"),
    ("byol_flax/evaluation/feature_cache.py", "np.save"):
        (1, "into an in-memory buffer, written by files.write_bytes"),
    ("byol_flax/evaluation/feature_cache.py", "np.load"):
        (3, "entries checked regular (no link) and their sha256 verified first, or the file "
            "this process has just written and hashed; allow_pickle=False"),
    ("byol_flax/evaluation/feature_cache.py", "np.lib.format.open_memmap"):
        (1, "a file files.create_exclusive has just created"),
}


def _calls_outside_the_layer() -> dict[tuple[str, str], int]:
    found: dict[tuple[str, str], int] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(REPO).as_posix()
        if relative.startswith("byol_flax/storage/"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), relative)):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            func = node.func
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) \
                    and func.value.id in _LAYER_NAMES:
                continue
            method = isinstance(func, ast.Attribute) and (
                func.attr in _FILE_METHODS or func.attr == "touch"
                or func.attr == "copy" and bool(node.args))  # epath's copy, not dict.copy()
            if not (name in _FUNCTIONS or method):
                continue
            if name == "json.loads" and node.args and isinstance(node.args[0], ast.Call) \
                    and isinstance(node.args[0].func, ast.Attribute) \
                    and node.args[0].func.attr in _MADE_HERE:
                continue
            found[relative, name] = found.get((relative, name), 0) + 1
    return found


def test_no_module_reads_or_writes_a_file_outside_the_storage_layer():
    found = _calls_outside_the_layer()
    unexpected = {key: count for key, count in found.items()
                  if count > ALLOWED.get(key, (0, ""))[0]}
    assert not unexpected, (
        "file I/O outside byol_flax/storage (use files / json_files, or add an ALLOWED entry "
        f"with the reason): {unexpected}")
    stale = {key for key, (count, _) in ALLOWED.items() if found.get(key, 0) < count}
    assert not stale, f"ALLOWED entries that no longer match the code: {stale}"


def test_a_damaged_sweep_point_file_is_one_line_naming_it(tmp_path):
    from byol_flax.data.records import DataError  # noqa: PLC0415
    from byol_flax.evaluation.base import SweepStore  # noqa: PLC0415

    store = SweepStore(tmp_path)
    store.put("linear", {"lr": 0.1}, {"top1": 0.5})
    assert store.get("linear", {"lr": 0.1}) == {"top1": 0.5}
    (saved,) = tmp_path.glob("linear-*.json")
    for text, message in (('{"point": {"lr": 0.1}}', "key 'selection' is missing"),
                          ("[" * 100_000, "nests JSON deeper"), ('{"point": [', "not valid JSON")):
        saved.write_text(text)
        with pytest.raises(DataError, match=f"sweep point file {saved}.*{message}"):
            store.get("linear", {"lr": 0.1})


def test_the_guard_sees_each_kind_of_bypass(tmp_path, monkeypatch):
    module = tmp_path / "byol_flax" / "sneaky.py"
    module.parent.mkdir()
    module.write_text("import json\nfrom PIL import Image\n"
                      "def f(path, data):\n"
                      "    path.write_text('x')\n    open(path)\n    json.loads(data)\n"
                      "    Image.open(path)\n    json.loads(json.dumps(data))\n"
                      "    files.read_text(path)\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "byol_flax")
    assert _calls_outside_the_layer() == {
        ("byol_flax/sneaky.py", "path.write_text"): 1, ("byol_flax/sneaky.py", "open"): 1,
        ("byol_flax/sneaky.py", "json.loads"): 1, ("byol_flax/sneaky.py", "Image.open"): 1}


# ---------------------------------------------------------------------------------------------
# files: reads


@pytest.fixture
def user_file(tmp_path) -> Path:
    path = tmp_path / "users_notes.txt"
    path.write_text("mine\n")
    return path


def test_reads_refuse_fifos_devices_and_directories_before_opening(tmp_path):
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    (tmp_path / "zero.json").symlink_to("/dev/zero")
    started = time.monotonic()
    for path, kind in ((fifo, r"a FIFO \(named pipe\)"),
                       (tmp_path / "zero.json", "a character device"),
                       (tmp_path, "a directory")):
        with pytest.raises(files.StorageError, match=f"{path} is {kind}, not a regular file"):
            files.read_bytes(path)
        with pytest.raises(files.StorageError, match=kind):
            json_files.read(path)
    assert time.monotonic() - started < 5  # nothing blocked on the FIFO


def test_reads_are_bounded_and_strict_utf8(tmp_path):
    big = tmp_path / "big.json"
    big.write_bytes(b" " * 2048)
    with pytest.raises(files.StorageError, match="larger than 1,024 bytes"):
        files.read_bytes(big, max_bytes=1024)
    assert len(files.read_bytes(big, max_bytes=2048)) == 2048
    latin = tmp_path / "labels.txt"
    latin.write_bytes(b"0.png caf\xe9\n")
    with pytest.raises(files.StorageError, match=r"labels.txt is not UTF-8 text \(byte 9"):
        files.read_text(latin)
    with pytest.raises(FileNotFoundError):
        files.read_bytes(tmp_path / "missing")


def test_json_is_standard_depth_bounded_and_checked_against_its_kind(tmp_path):
    for text, message in (("[" * 100_000 + "]" * 100_000, "nests JSON deeper than 64"),
                          ("[" * 70 + "]" * 70, "nests JSON deeper than 64"),
                          ('{"a": NaN}', "NaN is not standard JSON"),
                          ('{"a": -Infinity}', "-Infinity is not standard JSON"),
                          ('{"a": ', "is not valid JSON")):
        with pytest.raises(files.StorageError, match=message):
            json_files.loads(text, name="f.json")
    record = {"host": "vm", "pid": "12", "token": "t", "heartbeat": 1.0}
    with pytest.raises(files.StorageError,
                       match="lease.json: key 'pid' should be an integer, not str '12'"):
        json_files.loads(json.dumps(record), name="lease.json", spec=schemas.LEASE)
    with pytest.raises(files.StorageError, match="key 'splits' is missing"):
        json_files.loads("{}", name="manifest.json", spec=schemas.Obj({"splits": dict}))
    with pytest.raises(files.StorageError, match="the document should be an object, not list"):
        json_files.loads("[]", name="manifest.json", spec=schemas.MANIFEST)
    assert json_files.dumps({"a": float("nan"), "b": [float("inf"), 1.5]}) == \
        '{"a": null, "b": [null, 1.5]}'


# ---------------------------------------------------------------------------------------------
# files: writes


def test_writes_never_follow_a_link_and_refuse_other_non_files(tmp_path, user_file):
    link = tmp_path / "results.json"
    link.symlink_to(user_file)
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    (tmp_path / "card.md").mkdir()
    for path, message in ((link, "is a symbolic link"), (fifo, "is a FIFO"),
                          (tmp_path / "card.md", "is a directory")):
        with pytest.raises(files.StorageError, match=f"{path} {message}"):
            files.write_text(path, "new")
    with pytest.raises(files.StorageError, match="is a symbolic link"):
        files.open_append(link)
    assert user_file.read_text() == "mine\n" and link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "card.md", "config.json", "results.json", "users_notes.txt"]  # no temporary left


def test_writes_are_atomic_keep_the_mode_and_update_several_files_together(tmp_path):
    card = tmp_path / "model_card.json"
    card.write_text("old")
    os.chmod(card, 0o600)
    files.write_text(card, "new")
    assert card.read_text() == "new" and stat.S_IMODE(card.stat().st_mode) == 0o600
    (tmp_path / "MODEL_CARD.md").mkdir()
    with pytest.raises(files.StorageError, match="MODEL_CARD.md is a directory"):
        files.write_files({card: "newer", tmp_path / "MODEL_CARD.md": "# card"})
    assert card.read_text() == "new"  # all or nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["MODEL_CARD.md", "model_card.json"]


def test_create_exclusive_removes_a_planted_link_without_touching_its_target(tmp_path,
                                                                              user_file):
    partial = tmp_path / "entry.partial.npy"
    partial.symlink_to(user_file)
    files.create_exclusive(partial)
    assert not partial.is_symlink() and partial.stat().st_size == 0
    assert user_file.read_text() == "mine\n"


# ---------------------------------------------------------------------------------------------
# images: explicit formats, no program run


def test_a_postscript_file_named_png_never_runs_ghostscript(tmp_path, monkeypatch):
    """Pillow's EPS plugin hands PostScript to ``gs``; the one decoder never tries it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ran = tmp_path / "gs_ran.txt"
    fake_gs = bin_dir / "gs"
    fake_gs.write_text(f"#!/bin/sh\necho \"$@\" >> {ran}\nexit 1\n")
    fake_gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert shutil.which("gs") == str(fake_gs)
    postscript = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n"
                  b"newpath 0 0 moveto 8 8 lineto stroke showpage\n%%EOF\n")
    # Without formats= Pillow would identify it as EPS (the test of the test).
    import io  # noqa: PLC0415
    assert Image.open(io.BytesIO(postscript)).format == "EPS"
    with pytest.raises(BadImage, match="not a readable image"):
        decode_fully(postscript, "evil.png")
    with pytest.raises(Image.UnidentifiedImageError):
        augment.decode_image_reduced(postscript, lambda w, h: 1)
    with pytest.raises(Image.UnidentifiedImageError):
        open_image(postscript)
    assert not ran.exists()
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(buffer, format="PNG")
    assert decode_fully(buffer.getvalue(), "ok.png").size == (4, 4)


# ---------------------------------------------------------------------------------------------
# The lease's files


def test_a_damaged_or_hostile_lease_file_is_one_line_or_taken_over(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    held = lease.WorkdirLease(workdir, stale_after_seconds=60)
    record = json.loads(held._record())  # noqa: SLF001
    for damage in ({**record, "heartbeat": "soon"}, {**record, "pid": [1]}):
        (workdir / lease.LEASE_NAME).write_text(json.dumps(damage))
        assert held.gone_reason(lease._parse(json.dumps(damage)) or {}) == (  # noqa: SLF001
            "its lease file is damaged (not a lease record this project writes)")
    (workdir / lease.LEASE_NAME).write_bytes(b"\xff\xfe not utf-8")
    with lease.WorkdirLease(workdir, stale_after_seconds=60) as taken:
        assert taken.held()
    for hostile, kind in (("fifo", "a FIFO"), ("zero", "a character device")):
        (workdir / lease.LEASE_NAME).unlink(missing_ok=True)
        if hostile == "fifo":
            os.mkfifo(workdir / lease.LEASE_NAME)
        else:
            (workdir / lease.LEASE_NAME).symlink_to("/dev/zero")
        started = time.monotonic()
        with pytest.raises(lease.WorkdirBusyError, match=f"lease.json is {kind}.*remove it"):
            lease.WorkdirLease(workdir, stale_after_seconds=60).acquire()
        assert time.monotonic() - started < 5


_HOLDER = """
import sys, time
from byol_flax.checkpointing import lease
held = lease.WorkdirLease(sys.argv[1], stale_after_seconds=4, heartbeat_seconds=0.3).acquire()
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                    reason="needs root and unshare(1) for a PID namespace")
def test_a_live_holder_in_another_pid_namespace_is_watched_not_taken_over(tmp_path):
    """A container on the same host (same host name and boot, its own PID namespace) holds the
    workdir: its pid means nothing here, so the start watches its heartbeat and stops."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    # --mount-proc: the holder sees its own pids, as in a container (it is pid 1 there).
    holder = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", "--mount-proc",
                               sys.executable, "-c", _HOLDER, str(workdir), "30"], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        record = json.loads((workdir / lease.LEASE_NAME).read_text())
        assert record["pid_namespace"] != os.readlink("/proc/self/ns/pid")
        started = time.monotonic()
        with pytest.raises(lease.WorkdirBusyError, match="its heartbeat is live"):
            lease.WorkdirLease(workdir, stale_after_seconds=4).acquire()
        assert time.monotonic() - started < 4  # stopped at the first heartbeat seen
        assert holder.poll() is None  # the holder runs on, never told its lease was lost
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------------------------------------
# The feature cache's key


_FINGERPRINT = """
import json, sys
from byol_flax.configs import digits_cpu
from byol_flax.evaluation.feature_cache import encoder_fingerprint
from byol_flax.weights.encoder import encoder_from_model_config
model = json.loads(digits_cpu.get_config("unused,smoke=True").model.to_json())
print(encoder_fingerprint(encoder_from_model_config(model, seed=int(sys.argv[1])), model))
"""


def test_the_encoder_fingerprint_is_the_same_in_every_process():
    """The cache key of an encoder depends on its architecture and weights only (no memory
    address of a function in it): another process agrees, other weights differ."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    there = subprocess.run([sys.executable, "-c", _FINGERPRINT, "0"], cwd=REPO, env=env,
                           check=True, capture_output=True, text=True).stdout.split()[-1]
    from byol_flax.configs import digits_cpu  # noqa: PLC0415
    from byol_flax.evaluation.feature_cache import encoder_fingerprint  # noqa: PLC0415
    from byol_flax.weights.encoder import encoder_from_model_config  # noqa: PLC0415

    model = json.loads(digits_cpu.get_config("unused,smoke=True").model.to_json())
    here = lambda seed: encoder_fingerprint(encoder_from_model_config(model, seed=seed), model)
    assert here(0) == there and len(there) == 64
    assert here(1) != there
