"""The layer table's source: every lowering names the compact ops it emits, and compaction holds it to that."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import mann_edge
from mann_edge import compaction, coverage
from mann_edge.errors import CompactionError
from mann_edge.formats import FORMATS
from mann_edge.graph.ops import OPS


def test_every_layer_class_is_in_one_row_and_every_declared_op_exists():
    rows = coverage.layer_rows()
    classes = [cls for row in rows for cls in row.classes]
    assert sorted(classes, key=str) == sorted(compaction.LOWERINGS, key=str)
    assert all(set(row.ops) <= set(OPS) for row in rows)


def test_a_format_ticks_a_row_only_when_it_lowers_every_op_of_it(monkeypatch):
    onnx = FORMATS["onnx"].converter_module()
    without_attention = {op: fn for op, fn in onnx.LOWERINGS.items() if op != "attention"}
    monkeypatch.setattr(onnx, "LOWERINGS", without_attention)
    rows = {row.classes[0].__name__: row for row in coverage.layer_rows()}
    assert rows["Attention"].formats == {name: name != "onnx" for name in FORMATS}
    assert rows["MaskedDense"].formats["onnx"]
    ticks = " | ".join("✗" if name == "onnx" else "✓" for name in FORMATS)
    assert f"| `Attention` | `attention` | {ticks} |" in coverage.layer_table()


class _Doubler(keras.layers.Layer):
    def call(self, x):
        return x * 2.0


def test_a_lowering_that_emits_an_op_it_did_not_declare_is_refused(monkeypatch):
    @compaction.lowers(_Doubler, ops=("scale_shift",))
    def _double(b, layer, inputs, outputs, name):
        return [b.add(name, "add", [inputs[0], inputs[0]], outputs[0])]  # not the op it declared

    x = keras.Input((3,), name="x")
    model = keras.Model(x, _Doubler(name="doubler")(x))
    try:
        with pytest.raises(CompactionError, match=r"layer 'doubler' emitted op 'add', which it does not declare"):
            mann_edge.compact(model)
    finally:
        compaction.LOWERINGS._entries.pop(_Doubler)


def test_the_table_runs_as_a_command(capsys, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{coverage.README_START}\nold\n{coverage.README_END}\nafter\n")
    assert coverage.main(["--write", str(readme)]) == 0
    text = readme.read_text()
    assert "old" not in text and text.endswith("after\n") and coverage.layer_table() in text
    np.testing.assert_equal(coverage.main([]), 0)
    assert coverage.layer_table() in capsys.readouterr().out
