"""The integer-only verifier: emitted programs pass, a planted float op fails the build."""

import numpy as np
import pytest
from torch import nn
from tvm import relax

from conftest import quantize_module
from intforge.compiler import compile_module
from intforge.errors import VerificationError
from intforge.relay_passes import VerifyIntegerOnly, emit_program, find_float_values


@pytest.fixture(scope="module")
def program():
    return quantize_module(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)), (1, 3, 6, 6))


@pytest.mark.parametrize("boundary", ["float", "int"])
def test_emitted_program_is_integer_only(program, boundary):
    assert find_float_values(emit_program(program, boundary=boundary)) == []


def planted_module():
    """int8 in -> int32 conv -> (float32 requantize: the planted violation) -> int8 out."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 3, 6, 6), "int8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            w = relax.const(np.ones((4, 3, 3, 3), np.int8), "int8")
            acc = bb.emit(relax.op.nn.conv2d(x, w, out_dtype="int32"))
            f = bb.emit(relax.op.astype(acc, "float32"))
            f = bb.emit(relax.op.multiply(f, relax.const(0.01, "float32")))
            q = bb.emit(relax.op.astype(relax.op.clip(relax.op.round(f), -128, 127), "int8"))
            gv = bb.emit_output(q)
        bb.emit_func_output(gv)
    return bb.get()


def test_verifier_catches_a_planted_float_op():
    bad = find_float_values(planted_module())
    assert [b.op for b in bad][:2] == ["relax.astype", "relax.multiply"]
    # Raised through TVM's pass infrastructure, the error keeps its message (the type becomes TVM's).
    with pytest.raises(Exception, match="integer-only check failed: 4 floating-point value"):
        VerifyIntegerOnly()(planted_module())


def test_build_refuses_a_module_with_float_inside():
    with pytest.raises(VerificationError, match="was not built"):
        compile_module(planted_module(), "x86")


def test_float_boundary_alone_is_allowed():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4,), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            q = bb.emit(relax.op.astype(relax.op.round(relax.op.multiply(x, relax.const(10.0, "float32"))), "int8"))
            q = bb.emit(relax.op.add(q, q))
            y = bb.emit(relax.op.multiply(relax.op.astype(q, "float32"), relax.const(0.1, "float32")))
            gv = bb.emit_output(y)
        bb.emit_func_output(gv)
    assert find_float_values(bb.get()) == []
