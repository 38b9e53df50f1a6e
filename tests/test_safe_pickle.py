"""The release reader builds only numbers: every way a crafted pickle got through NumPy's or
Python's own unpickling (object pointers, heap copies, class state, huge lengths, deep nesting,
devices, terminal escapes) ends in one line naming the file, and nothing of the file runs.

Crafted files are written here with ``pickle.dumps`` of objects whose ``__reduce__`` names the
hostile call, or as opcode bytes (``pickletools`` names them); none is ever loaded by ``pickle``.
"""

import os
import pickle
import re
import struct
import subprocess
import sys

import numpy as np
import pytest

from byol_flax.errors import UserError
from byol_flax.weights import official, safe_pickle


class Reduce:
    """Pickles as ``function(*args)`` (then ``BUILD`` with ``state``): a crafted reduce."""

    def __init__(self, function, args, state=None):
        self.function, self.args, self.state = function, args, state

    def __reduce__(self):
        if self.state is None:
            return self.function, self.args
        return self.function, self.args, self.state


def read(data: bytes):
    return safe_pickle.SafeUnpickler(data, source="crafted.pkl",
                                     allowed=official.ALLOWED_GLOBALS).load()


def refusal(data: bytes, error=safe_pickle.PickleReadError) -> str:
    """The one-line message the reader refuses ``data`` with."""
    with pytest.raises(error) as raised:
        read(data)
    message = str(raised.value)
    assert "\n" not in message and message.startswith("crafted.pkl: "), message
    return message


def global_op(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def text(value: str) -> bytes:
    data = value.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def hostile_global(module: str, name: str = "system") -> bytes:
    """A protocol-4 global whose module name carries any text (newlines included)."""
    return b"\x80\x04" + text(module) + text(name) + pickle.STACK_GLOBAL + b"."


def release_file(tmp_path, experiment_state, name="pretrain_res50x1.pkl") -> str:
    path = tmp_path / name
    path.write_bytes(pickle.dumps({"experiment_state": experiment_state, "step": 1}, protocol=2))
    return str(path)


# -- What the reader accepts ----------------------------------------------------------------------

@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_arrays_and_containers_of_every_protocol_read_back_equal(protocol):
    data = {"w": np.arange(12, dtype=np.float32).reshape(3, 4),
            "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
            "big_endian": np.arange(3, dtype=">i4"), "bool": np.array([True, False]),
            "empty": np.zeros((0, 5), np.float16), "scalar": np.int64(7), "zero_d": np.array(3.5),
            "nested": [1, 2.5, "x", b"\x00\xff", None, True, (1, (2, [3]))], 5: "int key"}
    out = read(pickle.dumps(data, protocol=protocol))
    assert out.keys() == data.keys()
    for key, expected in data.items():
        if isinstance(expected, np.ndarray):
            assert type(out[key]) is np.ndarray and out[key].dtype == expected.dtype
            np.testing.assert_array_equal(out[key], expected)
            assert out[key].flags.c_contiguous and out[key].flags.writeable
        else:
            assert out[key] == expected and type(out[key]) is type(expected)


def test_shared_references_stay_shared_and_arrays_are_fresh_memory():
    array = np.arange(4, dtype=np.float32)
    out = read(pickle.dumps({"online": array, "target": array}, protocol=2))
    assert out["online"] is out["target"]
    assert out["online"].base is None  # a copy, not a view of the file's bytes


# -- Table rows: NumPy's constructors with file-chosen arguments ---------------------------------

def test_an_object_dtype_array_from_file_bytes_is_refused_without_touching_numpy():
    """Was a segfault: ``numpy.ndarray((n,), dtype('O'), bytes)`` reads the bytes as pointers.
    The dtype is refused as the reader builds it, before the call is reached."""
    crafted = Reduce(np.ndarray, ((4,), np.dtype("O"), b"\x41" * 32))
    assert "dtype O8: only bool, integer, float and complex" in refusal(
        pickle.dumps(crafted, protocol=2), safe_pickle.UnsafePickleError)
    # NumPy's own pickling of an object array is refused at the same place.
    refusal(pickle.dumps(np.array([1, "a"], dtype=object), protocol=2),
            safe_pickle.UnsafePickleError)


def test_a_buffer_offset_from_the_file_is_refused():
    """Was a heap leak: a negative offset copied process memory into the weights. numpy.ndarray
    is never called; it is only an argument NumPy's _reconstruct takes."""
    crafted = Reduce(np.ndarray, ((11_000,), np.dtype("u1"), b"x" * 16, -11_000))
    assert "REDUCE on numpy.ndarray" in refusal(pickle.dumps(crafted, protocol=2),
                                                safe_pickle.UnsafePickleError)
    # _reconstruct takes only what NumPy writes; data must be exactly the shape's bytes.
    reconstruct = np._core.multiarray._reconstruct
    crafted = Reduce(reconstruct, (np.ndarray, (0,), b"b"), (1, (8,), np.dtype("f4"), False,
                                                              b"\x00" * 16))
    assert "needs 32 bytes, the file gives 16" in refusal(pickle.dumps(crafted, protocol=2))


@pytest.mark.parametrize("dtype", ["V8", "U4", "M8[s]", "f16"])
def test_dtypes_other_than_plain_numbers_are_refused(dtype):
    crafted = pickle.dumps(np.zeros(2, dtype), protocol=2)
    assert "only bool, integer, float and complex" in refusal(crafted,
                                                              safe_pickle.UnsafePickleError)


def test_a_structured_dtype_is_refused():
    crafted = pickle.dumps(np.zeros(2, [("a", "f4"), ("b", "i4")]), protocol=2)
    refusal(crafted, safe_pickle.UnsafePickleError)


# -- Table row: lengths, sizes and nesting -----------------------------------------------------

@pytest.mark.parametrize("opcode", [pickle.BINBYTES8, pickle.BINUNICODE8, pickle.BYTEARRAY8])
def test_a_length_of_2_to_the_62_is_one_line(opcode):
    crafted = b"\x80\x05" + opcode + struct.pack("<Q", 2**62) + b"abc."
    assert "claims 4611686018427387904 bytes, 4 remain" in refusal(crafted)


def test_a_one_tebibyte_array_is_refused_before_any_allocation():
    reconstruct = np._core.multiarray._reconstruct
    crafted = Reduce(reconstruct, (np.ndarray, (0,), b"b"),
                     (1, (2**38,), np.dtype("f4"), False, b"\x00" * 8))
    assert "needs 1099511627776 bytes, the file gives 8" in refusal(
        pickle.dumps(crafted, protocol=2))


def test_arrays_adding_up_to_more_than_the_file_are_refused():
    """One byte string used by many arrays (memo references) cannot multiply memory."""
    reconstruct = np._core.multiarray._reconstruct
    raw = b"\x00" * 4096
    arrays = [Reduce(reconstruct, (np.ndarray, (0,), b"b"), (1, (1024,), np.dtype("f4"), False,
                                                              raw)) for _ in range(64)]
    assert "more bytes than the file's" in refusal(pickle.dumps(arrays, protocol=3),
                                                   safe_pickle.UnsafePickleError)


def test_persistent_ids_are_refused_at_the_first():
    crafted = b"\x80\x02" + b"N" + pickle.BINPERSID * 1000 + b"."
    assert "persistent id" in refusal(crafted, safe_pickle.UnsafePickleError)
    assert "persistent id" in refusal(b"Pnested\n.", safe_pickle.UnsafePickleError)


@pytest.mark.parametrize("crafted", [
    b"\x80\x02N" + pickle.TUPLE1 * 200_000 + b".",  # tuples nested with a stack of one
    b"\x80\x02" + pickle.MARK * 200_000 + b".",
    b"\x80\x02" + pickle.EMPTY_LIST * 200_000 + pickle.APPEND * 199_999 + b".",
], ids=["tuples", "marks", "lists"])
def test_a_200k_deep_structure_is_one_line(crafted):
    assert "nested more than 100 deep" in refusal(crafted, safe_pickle.UnsafePickleError)


def test_a_small_file_cannot_make_millions_of_values(monkeypatch):
    """A byte per empty list (or memo entry, or NamedTuple class) would fill memory at 50-1000
    times the file's size; the reader counts what it makes."""
    monkeypatch.setattr(safe_pickle.machine, "MAX_OBJECTS", 1_000)
    crafted = b"\x80\x02" + pickle.MARK + pickle.EMPTY_LIST * 2_000 + pickle.LIST + b"."
    assert "more than 1,000 values" in refusal(crafted, safe_pickle.UnsafePickleError)
    monkeypatch.setattr(safe_pickle.machine, "MAX_RECORD_CLASSES", 2)
    make_class = (global_op("dill._dill", "_create_namedtuple") + text("State") + text("x")
                  + pickle.TUPLE1 + text("somewhere") + pickle.TUPLE3 + pickle.REDUCE)
    crafted = b"\x80\x02" + pickle.MARK + make_class * 3 + pickle.LIST + b"."
    assert "more than 2 NamedTuple classes" in refusal(crafted, safe_pickle.UnsafePickleError)


def test_a_container_that_contains_itself_is_refused():
    crafted = b"\x80\x02" + pickle.EMPTY_LIST + b"q\x00h\x00" + pickle.APPEND + b"."
    assert "contains itself" in refusal(crafted, safe_pickle.UnsafePickleError)


def test_truncated_and_garbage_files_are_one_line():
    assert "not a readable pickle" in refusal(pickle.dumps({"a": 1}, protocol=2)[:-3])
    assert "unknown opcode" in refusal(b"\xff\xfe")
    assert "stack underflow" in refusal(b"\x80\x02a.")


# -- Table row: BUILD never touches a class --------------------------------------------------

def test_build_on_a_release_class_is_refused_and_the_class_is_unchanged():
    """Was a persistent hijack: BUILD set ``online_params`` on the stand-in class, so a later
    genuine import returned the attacker's weights (the genuine import after a refused one is in
    tests/test_official_weights.py)."""
    crafted = (b"\x80\x02" + global_op("byol.byol_experiment", "_ByolExperimentState")
               + pickle.EMPTY_DICT + text("online_params") + text("attacker") + pickle.SETITEM
               + pickle.BUILD + b".")
    message = refusal(crafted, safe_pickle.UnsafePickleError)
    assert "BUILD on the global byol.byol_experiment._ByolExperimentState refused" in message
    assert official.ExperimentState(*range(5)).online_params == 0
    # Nor on an instance, nor through setattr-like SETITEM/APPEND on anything but fresh
    # containers.
    instance = (b"\x80\x02" + global_op("optax._src.transform", "ScaleState")
                + pickle.EMPTY_TUPLE + pickle.NEWOBJ + pickle.EMPTY_DICT + pickle.BUILD + b".")
    assert "BUILD on a OptimizerState" in refusal(instance, safe_pickle.UnsafePickleError)
    setitem = (b"\x80\x02" + global_op("numpy", "dtype") + text("k") + text("v")
               + pickle.SETITEM + b".")
    assert "SETITEM on the global numpy.dtype" in refusal(setitem, safe_pickle.UnsafePickleError)


def test_any_other_global_is_refused_by_name_even_through_dill():
    assert re.search(r"refused to load global (os|posix)\.system", refusal(
        pickle.dumps(Reduce(os.system, ("true",)), protocol=2), safe_pickle.UnsafePickleError))
    # dill's _import_module names a module without importing it (``this`` prints when imported).
    assert "this" not in sys.modules
    through_dill = (b"\x80\x02" + global_op("dill._dill", "_get_attr")
                    + global_op("dill._dill", "_import_module") + text("this") + pickle.TUPLE1
                    + pickle.REDUCE + text("s") + pickle.TUPLE2 + pickle.REDUCE + b".")
    assert "refused to load global this.s (through dill's _get_attr)" in refusal(
        through_dill, safe_pickle.UnsafePickleError)
    assert "this" not in sys.modules


@pytest.mark.parametrize("fields", [("__class__",), ("a b",), ("count",), ("x", "x"), ("_f",)])
def test_dill_namedtuples_take_only_distinct_public_identifiers(fields):
    crafted = (b"\x80\x02" + global_op("dill._dill", "_create_namedtuple") + text("State")
               + pickle.MARK + b"".join(text(field) for field in fields) + pickle.TUPLE
               + text("somewhere") + pickle.TUPLE3 + pickle.REDUCE + b".")
    assert "field names that are not distinct public identifiers" in refusal(
        crafted, safe_pickle.UnsafePickleError)


def test_a_dill_namedtuple_of_the_release_must_have_its_fields():
    crafted = (b"\x80\x02" + global_op("dill._dill", "_create_namedtuple")
               + text("_ByolExperimentState") + text("online_params") + pickle.TUPLE1
               + text("byol.byol_experiment") + pickle.TUPLE3 + pickle.REDUCE + b".")
    assert "expected online_params, target_params" in refusal(crafted,
                                                              safe_pickle.UnsafePickleError)


def test_dill_create_array_takes_only_numpy_reconstruct():
    crafted = (b"\x80\x02" + global_op("dill._dill", "_create_array")
               + global_op("_codecs", "encode") + pickle.EMPTY_TUPLE + pickle.NONE
               + pickle.TUPLE3 + pickle.REDUCE + b".")
    assert "only NumPy's _reconstruct" in refusal(crafted, safe_pickle.UnsafePickleError)


# -- Table rows: files that are not files, names that are not text -------------------------------

def test_devices_fifos_and_directories_are_refused_before_they_are_opened(tmp_path):
    """Was a hang: hashing /dev/zero or a FIFO never ends."""
    fifo = tmp_path / "pretrain.pkl"
    os.mkfifo(fifo)
    for path, kind in (("/dev/zero", "a character device"), (str(fifo), "a FIFO"),
                       (str(tmp_path), "a directory")):
        with pytest.raises(official.OfficialCheckpointError,
                           match=f"^{path}: is {kind}, not a regular file"):
            official.read_official_checkpoint(path)
    empty = tmp_path / "empty.pkl"
    empty.touch()
    with pytest.raises(official.OfficialCheckpointError, match="the file is empty"):
        official.read_official_checkpoint(empty)


def test_names_from_the_file_are_escaped(tmp_path):
    """Was a forged line: a module name with a newline and terminal escapes printed raw."""
    module = "os\nOK: imported resnet50 x1 (step 1, sha256 0123) to exports\x1b[2K"
    path = tmp_path / "pretrain_res50x1.pkl"
    path.write_bytes(hostile_global(module))
    with pytest.raises(official.UnsafePickleError) as raised:
        official.import_official(path)
    message = str(raised.value)
    assert "\n" not in message and "\x1b" not in message
    assert "'os\\nOK: imported resnet50 x1 (step 1, sha256 0123) to exports\\x1b[2K'" in message


def test_every_error_of_the_reader_is_a_user_error():
    for error in (safe_pickle.PickleReadError, safe_pickle.UnsafePickleError,
                  official.UnsafePickleError, official.OfficialCheckpointError):
        assert issubclass(error, UserError)


# -- The command: one line, non-zero, no traceback ------------------------------------------------

def run_import(checkpoint, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "byol_flax.export.import_official",
                           f"--checkpoint={checkpoint}", f"--out={tmp_path / 'out'}"],
                          capture_output=True, text=True, env=env, timeout=120, check=False)


@pytest.mark.parametrize("case", ["dev_zero", "object_dtype", "escapes"])
def test_the_command_prints_one_line_for_a_hostile_file(case, tmp_path):
    if case == "dev_zero":
        checkpoint, expected = "/dev/zero", "/dev/zero: is a character device"
    elif case == "object_dtype":  # was a segfault (exit 139)
        crafted = Reduce(np.ndarray, ((4,), np.dtype("O"), b"\x41" * 32))
        checkpoint = release_file(tmp_path, crafted)
        expected = "dtype O8: only bool"
    else:  # was a forged "OK: imported ..." line
        checkpoint = tmp_path / "pretrain_res50x1.pkl"
        checkpoint.write_bytes(hostile_global("os\nOK: imported\x1b[2K"))
        expected = "refused to load global 'os\\nOK: imported\\x1b[2K'.system"
    run = run_import(checkpoint, tmp_path)
    assert run.returncode == 1, (run.returncode, run.stderr[-2000:])
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert expected in lines[0] and "\x1b" not in run.stderr
    assert run.stdout == "" and not (tmp_path / "out").exists()
