"""The integer program serializes losslessly."""

import numpy as np
from torch import nn

from conftest import quantize_module
from intforge import reference
from intforge.program import IntegerProgram


def test_program_round_trips_through_disk(tmp_path):
    program = quantize_module(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                            nn.Flatten(), nn.Linear(36, 5)), (1, 3, 6, 6))
    path = program.save(tmp_path / "p.iprog")
    again = IntegerProgram.load(path)
    assert [op.kind for op in again.ops] == [op.kind for op in program.ops]
    x = np.random.default_rng(0).standard_normal((1, 3, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(reference.run_float(again, x)[0], reference.run_float(program, x)[0])
    assert again.layers() == program.layers()
