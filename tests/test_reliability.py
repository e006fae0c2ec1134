"""Bad input, faults and hostile files: every kind of file, every command (docs/bad-input.md tables them).

Each case asserts the user-visible behaviour: a clear error naming the file, task or
shape at fault, a non-zero exit with one line from the command, and no file left
half-written under a final name.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mann_edge
import zoo
from mann_edge import safetensors_codec
from mann_edge.bundle import MANIFEST, WEIGHTS
from mann_edge.cli import main
from mann_edge.errors import BundleError, MannEdgeError
from mann_edge.sparse import CSRWeight, encode_weight, to_dense

PROJECT = Path(__file__).resolve().parents[1]
# derandomized: CI runs the same examples every time (a failure is reproducible, not a matter of luck)
FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def good_files(tmp_path_factory, multiconv_model, multiconv_compact):
    """One valid file of every accepted kind, from the same small model."""
    from mann_edge.converters import coreml, onnx, tflite

    out = tmp_path_factory.mktemp("good")
    keras_path = out / "model.keras"
    multiconv_model.save(keras_path)
    return {
        ".keras": keras_path,
        ".h5": zoo.LEGACY / "mann_mlp.h5",
        ".mann": Path(multiconv_compact.save(out / "model.mann")),
        ".tflite": tflite.export(multiconv_compact, out / "model.tflite"),
        ".onnx": next(Path(onnx.export(multiconv_compact, out / "onnx")).glob("*.onnx")),
        ".mlpackage": next(Path(coreml.export(multiconv_compact, out / "coreml")).glob("*.mlpackage")),
    }


def _damage(good: Path, target: Path, how: str) -> Path:
    """A copy of ``good`` at ``target``: empty, truncated to half, or with its middle overwritten."""
    if good.is_dir():  # a package: damage its largest file
        shutil.copytree(good, target)
        inner = max((p for p in target.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        _damage_file(inner.read_bytes(), inner, how)
    else:
        _damage_file(good.read_bytes(), target, how)
    return target


def _damage_file(data: bytes, target: Path, how: str) -> None:
    if how == "empty":
        data = b""
    elif how == "truncated":
        data = data[: len(data) // 2]
    else:
        middle = len(data) // 3
        data = data[:middle] + bytes(range(256)) * 4 + data[middle + 1024:]
    target.write_bytes(data)


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    *progress, last = err.splitlines()
    assert last.startswith("mann-edge: error: ") and "Traceback" not in err, err
    assert all(line.startswith(("[", "    ")) for line in progress), err  # progress lines only, then the error
    return last


# -- bad files of every kind ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", [".keras", ".h5", ".mann"])
@pytest.mark.parametrize("how", ["missing", "empty", "truncated", "corrupt"])
def test_bad_sources_give_one_line_naming_the_file(kind, how, good_files, tmp_path, capsys):
    path = tmp_path / f"bad{kind}"
    if how != "missing":
        _damage(good_files[kind], path, how)
    err = _one_line_error(capsys, ["inspect", str(path)])
    assert path.name in err


@pytest.mark.parametrize("kind", [".mann", ".tflite", ".onnx", ".mlpackage"])
@pytest.mark.parametrize("how", ["missing", "empty", "truncated", "corrupt"])
def test_bad_artifacts_give_one_line_naming_the_file(kind, how, good_files, tmp_path, capsys):
    path = tmp_path / f"bad{kind}"
    if how != "missing":
        _damage(good_files[kind], path, how)
    err = _one_line_error(capsys, ["verify", str(path), "--against", str(good_files[".mann"])])
    assert path.name in err or str(path) in err, err


def test_an_unknown_task_is_refused_by_every_command(good_files, tmp_path, capsys):
    err = _one_line_error(capsys, ["convert", str(good_files[".mann"]), "-o", str(tmp_path / "out"), "--tasks", "nope"])
    assert "'nope'" in err and "digit" in err
    err = _one_line_error(capsys, ["verify", str(good_files[".tflite"]), "--against", str(good_files[".mann"]),
                                   "--tasks", "nope"])
    assert "'nope'" in err
    assert not (tmp_path / "out" / "model.mann").exists()


def test_debug_shows_the_traceback(tmp_path):
    missing = tmp_path / "missing.mann"
    quiet = subprocess.run([sys.executable, "-m", "mann_edge.cli", "inspect", str(missing)], capture_output=True, text=True)
    assert quiet.returncode == 1 and "Traceback" not in quiet.stderr and "missing.mann" in quiet.stderr
    loud = subprocess.run([sys.executable, "-m", "mann_edge.cli", "--debug", "inspect", str(missing)],
                          capture_output=True, text=True)
    assert loud.returncode != 0 and "Traceback" in loud.stderr


def test_bad_usage_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert"])
    assert exit_info.value.code == 2


# -- output directories --------------------------------------------------------------------------


def test_output_directory_that_is_a_file_is_refused(good_files, tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    err = _one_line_error(capsys, ["convert", str(good_files[".mann"]), "-o", str(target), "--to", "tflite"])
    assert "is a file" in err and target.read_text() == "x"


@pytest.mark.skipif(sys.platform == "win32" or (hasattr(__import__("os"), "geteuid") and __import__("os").geteuid() == 0),
                    reason="root writes anywhere")
def test_output_directory_that_is_not_writable_is_refused(good_files, tmp_path, capsys):
    target = tmp_path / "locked"
    target.mkdir()
    target.chmod(0o500)
    try:
        err = _one_line_error(capsys, ["convert", str(good_files[".mann"]), "-o", str(target), "--to", "tflite"])
        assert "not writable" in err
    finally:
        target.chmod(0o700)


def test_unwritable_directory_check_names_it(tmp_path, monkeypatch):
    # The same check as above, independent of the user running the tests (root ignores permissions).
    import os

    from mann_edge.files import check_writable_dir

    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(PermissionError, match=re.escape(str(tmp_path))):
        check_writable_dir(tmp_path)


def test_existing_outputs_are_kept_without_force(good_files, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["convert", str(good_files[".mann"]), "-o", str(out), "--to", "tflite"]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    err = _one_line_error(capsys, ["convert", str(good_files[".mann"]), "-o", str(out), "--to", "tflite"])
    assert "--force" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main(["convert", str(good_files[".mann"]), "-o", str(out), "--to", "tflite", "--force"]) == 0


def test_interrupted_conversion_leaves_no_partial_file(good_files, tmp_path, monkeypatch, capsys):
    from mann_edge.converters import tflite

    def fail_midway(model, **options):
        raise RuntimeError("simulated crash in the converter")

    monkeypatch.setattr(tflite, "_convert", fail_midway)
    out = tmp_path / "out"
    err = _one_line_error(capsys, ["convert", str(good_files[".mann"]), "-o", str(out), "--to", "tflite"])
    assert "simulated crash" in err
    assert not out.exists()  # what the failed call wrote (the bundle, the directory) is gone, no temporary file


# -- the bundle reader ---------------------------------------------------------------------------


def _bundle_entries(path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def _write_zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return path


@pytest.mark.parametrize("name", ["/etc/passwd", "../escape.json", "weights/../../x", "C:evil"])
def test_unsafe_zip_entries_are_refused(name, good_files, tmp_path):
    entries = {**_bundle_entries(good_files[".mann"]), name: b"{}"}
    with pytest.raises(BundleError, match="unsafe entry|unexpected entry"):
        mann_edge.load_compact(_write_zip(tmp_path / "unsafe.mann", entries))


def test_sizes_are_checked_against_the_manifest_before_reading(good_files, tmp_path):
    entries = _bundle_entries(good_files[".mann"])
    manifest = json.loads(entries[MANIFEST])
    manifest["weights_file"]["bytes"] = 10 * 1024**3  # 10 GB claimed, a few KB present
    path = _write_zip(tmp_path / "liar.mann", {**entries, MANIFEST: json.dumps(manifest).encode()})
    with pytest.raises(BundleError, match="manifest says"):
        mann_edge.load_compact(path)


def test_a_huge_declared_shape_is_refused_without_allocating(good_files, tmp_path):
    entries = _bundle_entries(good_files[".mann"])
    manifest = json.loads(entries[MANIFEST])
    key, entry = next((k, e) for k, e in manifest["weights"].items() if e["kind"] == "csr")
    entry["shape"] = [2**40, 2**40] if len(entry["shape"]) == 2 else [2**20] * len(entry["shape"])
    path = _write_zip(tmp_path / "huge.mann", {**entries, MANIFEST: json.dumps(manifest).encode()})
    with pytest.raises(BundleError, match=re.escape(key)):
        mann_edge.load_compact(path)


def test_a_bundle_with_no_tasks_is_refused(good_files, tmp_path):
    entries = _bundle_entries(good_files[".mann"])
    manifest = json.loads(entries[MANIFEST])
    manifest["tasks"] = []
    path = _write_zip(tmp_path / "empty_tasks.mann", {**entries, MANIFEST: json.dumps(manifest).encode()})
    with pytest.raises(BundleError, match="at least one task"):
        mann_edge.load_compact(path)


def test_nan_in_bundle_weights_is_refused(good_files, tmp_path):
    entries = _bundle_entries(good_files[".mann"])
    arrays, metadata = safetensors_codec.decode(entries[WEIGHTS])
    key = next(k for k in arrays if k.endswith("/data") or arrays[k].dtype == np.float32)
    arrays[key] = arrays[key].copy()
    arrays[key].flat[0] = np.nan
    blob = safetensors_codec.encode(arrays, metadata)
    manifest = json.loads(entries[MANIFEST])
    manifest["weights_file"].update(bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest())
    path = _write_zip(tmp_path / "nan.mann", {MANIFEST: json.dumps(manifest).encode(), WEIGHTS: blob})
    with pytest.raises(BundleError, match="NaN"):
        mann_edge.load_compact(path)


@FUZZ
@given(data=st.data())
def test_fuzzed_manifests_load_or_fail_with_a_bundle_error(data, good_files, tmp_path_factory):
    entries = _bundle_entries(good_files[".mann"])
    manifest = json.loads(entries[MANIFEST])
    json_values = st.recursive(
        st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
        lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
        max_leaves=6,
    )
    for _ in range(data.draw(st.integers(1, 3))):
        _replace_somewhere(manifest, data, json_values)
    path = tmp_path_factory.mktemp("fuzz") / "fuzzed.mann"
    _write_zip(path, {**entries, MANIFEST: json.dumps(manifest).encode()})
    try:
        mann_edge.load_compact(path)
    except BundleError as error:
        assert str(path) in str(error)


def _replace_somewhere(node, data, values) -> None:
    """Replaces one value somewhere inside a JSON tree with a drawn value."""
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            return
        key = data.draw(st.sampled_from(keys))
        child = node[key]
        if isinstance(child, (dict, list)) and child and data.draw(st.booleans()):
            node = child
            continue
        node[key] = data.draw(values)
        return


@FUZZ
@given(blob=st.binary(max_size=512), prefix=st.sampled_from([b"", b"PK\x03\x04", b"PK\x05\x06" + b"\0" * 18]))
def test_garbage_files_fail_with_a_bundle_error(blob, prefix, tmp_path_factory):
    path = tmp_path_factory.mktemp("garbage") / "garbage.mann"
    path.write_bytes(prefix + blob)
    with pytest.raises(BundleError, match="garbage.mann"):
        mann_edge.load_compact(path)


@FUZZ
@given(cut=st.integers(0, 10**6), flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=4))
def test_damaged_bundles_load_identically_or_fail_with_a_bundle_error(cut, flips, good_files, multiconv_compact,
                                                                      tmp_path_factory):
    data = bytearray(good_files[".mann"].read_bytes())
    for position, mask in flips:
        data[position % len(data)] ^= mask
    data = data[: max(1, cut % (len(data) + 1))] if cut % 3 == 0 else data
    path = tmp_path_factory.mktemp("damaged") / "damaged.mann"
    path.write_bytes(bytes(data))
    try:
        loaded = mann_edge.load_compact(path)
    except BundleError:
        return
    for key, weight in multiconv_compact.weights.items():  # what loads must be the model, bit for bit
        np.testing.assert_array_equal(to_dense(loaded.weights[key]), to_dense(weight))


# -- the codecs ----------------------------------------------------------------------------------


@FUZZ
@given(
    rows=st.integers(1, 70), columns=st.integers(1, 300), density=st.floats(0, 1),
    dtype=st.sampled_from(["float32", "float16"]), layout=st.sampled_from(["rows", "oi"]), seed=st.integers(0, 2**16),
)
def test_csr_round_trip_is_exact(rows, columns, density, dtype, layout, seed):
    rng = np.random.default_rng(seed)
    array = (rng.normal(size=(rows, columns)) * (rng.random((rows, columns)) < density)).astype(dtype)
    encoded = encode_weight(array, layout)
    np.testing.assert_array_equal(to_dense(encoded), array)
    if isinstance(encoded, CSRWeight):
        encoded.check()
        assert encoded.nbytes < array.nbytes
        assert np.iinfo(encoded.indices.dtype).max >= encoded.matrix_shape[1] - 1


@FUZZ
@given(arrays=st.dictionaries(
    st.text(min_size=1, max_size=10),
    st.tuples(st.sampled_from(["float32", "float16", "int32", "uint8", "uint16", "int64"]),
              st.lists(st.integers(0, 5), max_size=3)),
    max_size=5,
))
def test_safetensors_round_trip_is_exact(arrays):
    rng = np.random.default_rng(0)
    values = {name: (rng.normal(size=shape) * 100).astype(dtype) for name, (dtype, shape) in arrays.items()}
    decoded, metadata = safetensors_codec.decode(safetensors_codec.encode(values, {"k": "v"}))
    assert metadata == {"k": "v"} and set(decoded) == set(values)
    for name, value in values.items():
        assert decoded[name].dtype == value.dtype and decoded[name].shape == value.shape
        assert decoded[name].tobytes() == value.tobytes()


@FUZZ
@given(blob=st.binary(max_size=256), header=st.one_of(st.none(), st.text(max_size=64)),
       claimed=st.integers(0, 2**64 - 1))
def test_garbage_safetensors_fail_with_a_value_error(blob, header, claimed):
    if header is not None:
        encoded = header.encode()
        blob = claimed.to_bytes(8, "little") if claimed % 2 else len(encoded).to_bytes(8, "little")
        blob += encoded
    try:
        safetensors_codec.decode(blob)
    except ValueError:
        pass


def test_safetensors_offsets_past_the_data_are_refused():
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000000], "data_offsets": [0, 4000000]}}).encode()
    blob = len(header).to_bytes(8, "little") + header + b"\0" * 16
    with pytest.raises(ValueError, match="outside"):
        safetensors_codec.decode(blob)


# -- no code execution from files ----------------------------------------------------------------


def test_no_loading_path_can_execute_code_from_a_file():
    pattern = re.compile(r"\bimport pickle\b|\bpickle\.loads?\(|allow_pickle\s*=\s*True|safe_mode\s*=\s*False"
                         r"|\bdill\b|\bcloudpickle\b|\beval\(|\bexec\(")
    offenders = []
    for folder in ("mann_edge", "converters", "runtime"):
        for path in (PROJECT / folder).rglob("*.py"):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{path.relative_to(PROJECT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_a_keras_file_with_a_lambda_layer_is_refused(tmp_path):
    import keras

    x = keras.Input((3,), name="x")
    model = keras.Model(x, keras.layers.Lambda(lambda t: t * 2, name="code")(x))
    path = tmp_path / "lambda.keras"
    model.save(path)
    with pytest.raises(MannEdgeError, match="lambda.keras"):
        mann_edge.inspect(path)


def test_outputs_get_the_permissions_of_any_new_file(tmp_path, multiconv_compact):
    import os

    path = multiconv_compact.save(tmp_path / "perm.mann")
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask
