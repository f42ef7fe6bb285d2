"""The CLI end to end on the real MNIST model: compile, run (npy and labelled set), inspect."""

import json

import numpy as np
import pytest

from conftest import intforge_cli
from intforge import zoo


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


def test_cli_run_emulate_on_a_native_library_says_it_runs_natively(compiled):
    proc = intforge_cli("run", str(compiled), "--emulate", "--data", "mnist", "--count", "50")
    assert "built for this machine's architecture; it runs natively" in proc.stdout
    assert float(proc.stdout.split("accuracy ")[1].split()[0]) > 0.9


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


def test_cli_bench_reports_latency_statistics_as_json(compiled, tmp_path):
    out = tmp_path / "bench.json"
    proc = intforge_cli("bench", str(compiled), "--repeat", "20", "--warmup", "2", "--threads", "1", "--json",
                        str(out))
    assert "median" in proc.stdout and "1 threads" in proc.stdout
    stats = json.loads(out.read_text())
    assert 0 < stats["min_ms"] <= stats["median_ms"] <= stats["p90_ms"]
    assert stats["repeat"] == 20 and stats["batch"] == 1
    assert stats["threads"] == 1 and stats["thread_pool"] == "tvm"  # one thread: nothing for intforge's pool


def test_cli_errors_are_one_paragraph_without_traceback(tmp_path):
    proc = intforge_cli("run", str(tmp_path / "nope.so"), "--data", "mnist", check=False)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    proc = intforge_cli("compile", "model.onnx", check=False)
    assert proc.returncode == 2 and "ONNX file model.onnx does not exist" in proc.stderr


def test_cli_compiles_a_saved_torch_export_program_with_npy_calibration(tmp_path):
    import torch

    import intforge
    from intforge import dyadic, reference

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU6(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    calib = np.random.default_rng(0).standard_normal((32, 3, 16, 16)).astype(np.float32)
    torch.export.save(torch.export.export(model, (torch.from_numpy(calib[:2]),)), tmp_path / "m.pt2")
    np.save(tmp_path / "calib.npy", calib)
    intforge_cli("compile", str(tmp_path / "m.pt2"), "--input-shape", "2,3,16,16", "--calib",
                 str(tmp_path / "calib.npy"), "--boundary", "int", "--precise-requant", "-o", str(tmp_path / "out"))
    lib = intforge.load(tmp_path / "out" / "model.so")
    assert lib.inputs[0]["dtype"] == "int8" and lib.inputs[0]["shape"] == [2, 3, 16, 16]
    program = lib.program()
    # --precise-requant: the conv's multipliers keep 24+ bits (shifts past the short form's 24)
    conv = next(op for op in program.ops if op.kind == "conv2d")
    assert (conv.params["shift"] > dyadic.SHORT_SHIFT).all()
    q = reference.quantize_inputs(program, calib[:2])
    np.testing.assert_array_equal(lib(*q), reference.run_int(program, *q)[0])


def test_cli_analyze_plan_compile_closed_loop_on_mnist(tmp_path):
    """analyze -> plan (size at 50% between all-INT4 and all-INT8, GPTQ's rounding, the 4-bit perturbations
    measured on the data) -> compile --plan (which takes the rounding from the plan) -> run."""
    import intforge
    from intforge.program import IntegerProgram

    an = tmp_path / "analysis.json"
    proc = intforge_cli("analyze", "intforge.zoo:mnist_net", "--data", "mnist:64", "--max-probes", "4",
                        "--power-iters", "4", "--tol", "0.5", "--quiet", "-o", str(an))
    assert "classifier.0" in proc.stdout and an.exists() and an.with_suffix(".png").exists()
    plan_path = tmp_path / "plan.json"
    proc = intforge_cli("plan", "intforge.zoo:mnist_net", "--analysis", str(an), "--data", "mnist:64",
                        "--int4-rounding", "gptq", "--size", "50%", "--pareto", "--points", "3", "-o", str(plan_path))
    assert "status: optimal" in proc.stdout and "as its inputs see them" in proc.stdout
    assert plan_path.with_suffix(".pareto.png").exists()
    bits = json.loads(plan_path.read_text())
    intforge_cli("compile", "intforge.zoo:mnist_net", "--input-shape", "1,1,28,28", "--calib", "mnist:200",
                 "--plan", str(plan_path), "-o", str(tmp_path / "mixed"))
    lib = intforge.load(tmp_path / "mixed" / "model.so")
    program = IntegerProgram.load(tmp_path / "mixed" / "model.iprog")
    assert bits["int4_rounding"] == program.meta["int4_rounding"] == "gptq"  # (from the plan: its 4-bit layers)
    got = {r["name"]: r["weight_bits"] for r in lib.manifest["layers"]}
    assert got == {layer["name"]: layer["bits"] for layer in bits["layers"]}
    assert 4 in got.values()  # 50% of the way from all-INT4 to all-INT8 needs some INT4
    proc = intforge_cli("run", str(tmp_path / "mixed" / "model.so"), "--data", "mnist", "--count", "500")
    assert float(proc.stdout.split("accuracy ")[1].split()[0]) > 0.97


def test_cli_plan_reports_the_smallest_feasible_budget(tmp_path):
    from intforge.hessian import LayerSensitivity, SensitivityReport

    rows = [("features.0", "conv2d", 288), ("features.3", "conv2d", 18432), ("classifier.0", "linear", 401408),
            ("classifier.2", "linear", 1280)]
    SensitivityReport(layers=[LayerSensitivity(n, k, p, 1.0, 1.0 / p, 1.0, 1, 1) for n, k, p in rows]).to_json(
        tmp_path / "a.json")
    proc = intforge_cli("plan", "intforge.zoo:mnist_net", "--analysis", str(tmp_path / "a.json"), "--input-shape",
                        "1,1,28,28", "--size", "100kB", "-o", str(tmp_path / "p.json"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "cannot be met" in proc.stderr and "210.704 kB" in proc.stderr


@pytest.mark.slow  # covered by test_arm's `tune --tracker` then `compile` (CLI) and test_tuning (x86, API)
def test_cli_tune_then_compile_reuses_the_database(tmp_path):
    import os

    env = {**os.environ, "INTFORGE_CACHE": str(tmp_path / "cache")}
    model = ("intforge.zoo:mnist_net", "--input-shape", "1,1,28,28", "--calib", "mnist:100")
    proc = intforge_cli("tune", *model, "--trials", "2", env=env)
    assert "-> database" in proc.stdout
    proc = intforge_cli("compile", *model, "-o", str(tmp_path / "m"), env=env)
    assert "schedule: tuned" in proc.stdout
    proc = intforge_cli("compile", *model, "--untuned", "-o", str(tmp_path / "u"), env=env)
    assert "schedule: default" in proc.stdout


def test_cli_schedules_compares_layers_under_each_schedule(tmp_path):
    import os

    env = {**os.environ, "INTFORGE_CACHE": str(tmp_path / "cache")}  # no tuning database: plain + default
    out = tmp_path / "sched.json"
    proc = intforge_cli("schedules", "intforge.zoo:mnist_net", "--input-shape", "1,1,28,28", "--repeat", "3",
                        "-o", str(out), env=env)
    assert "features.3" in proc.stdout and "default GOPS" in proc.stdout
    rows = json.loads(out.read_text())
    assert [r["name"] for r in rows] == ["features.0", "features.3", "classifier.0", "classifier.2"]
    assert all(set(r["ms"]) == {"plain", "default", "tensorized"} and min(r["ms"].values()) > 0 for r in rows)
    assert abs(sum(r["share_of_default"] for r in rows) - 1) < 1e-9
    assert out.with_suffix(".png").exists()
