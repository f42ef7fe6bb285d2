"""The CLI end to end on the real MNIST model: compile, run (npy and labelled set), inspect."""

import json
import subprocess
import sys

import numpy as np
import pytest

from intforge import zoo


def intforge_cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "intforge.cli", *args], capture_output=True, text=True,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"intforge {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    proc = intforge_cli("compile", "intforge.zoo:mnist_net", "--input-shape", "1,1,28,28", "--calib", "mnist:300",
                        "--calib-method", "percentile", "-o", str(out / "mnist"))
    assert "integer-only: yes" in proc.stdout
    return out / "mnist" / "model.so"


def test_cli_run_prints_accuracy_on_the_labelled_set(compiled):
    proc = intforge_cli("run", str(compiled), "--data", "mnist", "--count", "1000")
    acc = float(proc.stdout.split("accuracy ")[1].split()[0])
    assert acc > 0.98


def test_cli_run_on_npy_inputs_matches_the_python_api(compiled, tmp_path):
    import intforge

    x, _ = zoo.mnist_digits()
    np.save(tmp_path / "x.npy", x[:1])
    intforge_cli("run", str(compiled), "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npy"))
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), intforge.load(compiled)(x[:1]))


def test_cli_inspect_shows_layers_and_integer_only_verdict(compiled):
    proc = intforge_cli("inspect", str(compiled))
    assert "integer-only: yes" in proc.stdout
    assert "features.3" in proc.stdout and "classifier.0" in proc.stdout
    manifest = json.loads(intforge_cli("inspect", str(compiled), "--json").stdout)
    assert manifest["integer_only_verified"] is True
    assert manifest["target"]["preset"] == "x86"
    assert manifest["inputs"][0]["shape"] == [1, 1, 28, 28]


def test_cli_errors_are_one_paragraph_without_traceback(tmp_path):
    proc = intforge_cli("run", str(tmp_path / "nope.so"), "--data", "mnist", check=False)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    proc = intforge_cli("compile", "model.onnx", check=False)
    assert proc.returncode == 2 and "ONNX import is not supported yet" in proc.stderr


def test_cli_compiles_a_saved_torch_export_program_with_npy_calibration(tmp_path):
    import torch

    import intforge
    from intforge import reference

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU6(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    calib = np.random.default_rng(0).standard_normal((32, 3, 16, 16)).astype(np.float32)
    torch.export.save(torch.export.export(model, (torch.from_numpy(calib[:2]),)), tmp_path / "m.pt2")
    np.save(tmp_path / "calib.npy", calib)
    intforge_cli("compile", str(tmp_path / "m.pt2"), "--input-shape", "2,3,16,16", "--calib",
                 str(tmp_path / "calib.npy"), "--boundary", "int", "-o", str(tmp_path / "out"))
    lib = intforge.load(tmp_path / "out" / "model.so")
    assert lib.inputs[0]["dtype"] == "int8" and lib.inputs[0]["shape"] == [2, 3, 16, 16]
    program = lib.program()
    q = reference.quantize_inputs(program, calib[:2])
    np.testing.assert_array_equal(lib(*q), reference.run_int(program, *q)[0])
