"""Bad numbers on the command line: argparse's one-line usage error naming the option, before any work
(a zero count used to reach a traceback from numpy, be read as "all", or slice samples off the end)."""

from __future__ import annotations

import re

import pytest

from conftest import intforge_cli
from intforge.cli import build_parser
from intforge.datasets import load_data
from intforge.errors import IntforgeError

MODEL = ("intforge.zoo:mnist_net", "--input-shape", "1,1,28,28")

BAD = [
    (("compile", *MODEL, "--calib", "mnist", "--calib-count", "0"), "--calib-count: must be at least 1, got 0"),
    (("compile", *MODEL, "--calib", "mnist", "--calib-count", "-5"), "--calib-count: must be at least 1, got -5"),
    (("compile", "intforge.zoo:mnist_net", "--input-shape", "1,0,28,28"), "has a dimension below 1"),
    (("tune", *MODEL, "--trials", "0"), "--trials: must be at least 1, got 0"),
    (("analyze", "intforge.zoo:mnist_net", "--data", "mnist", "--batch-size", "0"), "--batch-size: must be at least 1"),
    (("analyze", "intforge.zoo:mnist_net", "--data", "mnist", "--count", "0"), "--count: must be at least 1"),
    (("analyze", "intforge.zoo:mnist_net", "--data", "mnist", "--power-iters", "-1"),
     "--power-iters: must be at least 0, got -1"),
    (("plan", "intforge.zoo:mnist_net", "--analysis", "a.json", "--points", "1"), "--points: must be at least 2"),
    (("run", "m.so", "--data", "mnist", "--count", "0"), "--count: must be at least 1, got 0"),
    (("schedules", "intforge.zoo:mnist_net", "--repeat", "0"), "--repeat: must be at least 1, got 0"),
    (("bench", "m.so", "--repeat", "0"), "--repeat: must be at least 1, got 0"),
    (("bench", "m.so", "--warmup", "-1"), "--warmup: must be at least 0, got -1"),
    (("bench", "m.so", "--threads", "-3"), "--threads: must be at least 1, got -3"),
    (("bench", "m.so", "--threads", "two"), "--threads: 'two' is not an integer"),
    (("board-server", "--port", "70000"), "--port: must be from 1 to 65535, got 70000"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD])
def test_bad_numbers_are_usage_errors_naming_the_option(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(list(argv))
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_numbers_end_to_end_without_traceback(tmp_path):
    proc = intforge_cli("bench", str(tmp_path / "m.so"), "--repeat", "0", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "argument --repeat: must be at least 1, got 0" in proc.stderr


@pytest.mark.parametrize("spec,count", [("mnist:0", None), ("mnist:-5", None), ("random:x", None), ("mnist", 0),
                                        ("mnist", -5)])
def test_data_counts_below_one_are_refused(spec, count):
    with pytest.raises(IntforgeError, match="at least 1"):
        load_data(spec, count)


def test_data_counts_take_the_first_samples():
    x, y = load_data("mnist:7")
    assert len(x) == len(y) == 7
    assert len(load_data("mnist", 3)[0]) == 3
    assert len(load_data("random:2")[0]) == 2
    with pytest.raises(IntforgeError, match="neither a file nor one of the built-in sets"):
        load_data("/no/such:file.npy")  # a ':' in a path is part of the path


def test_timing_needs_a_timed_run():
    from intforge.runtime import check_timing

    check_timing(1, 0)
    with pytest.raises(IntforgeError, match="repeat >= 1"):
        check_timing(0, 5)
    with pytest.raises(IntforgeError, match="warmup >= 0"):
        check_timing(3, -1)


def test_distilled_count_below_one_is_refused(capsys, tmp_path):
    from intforge.cli import main

    assert main(["compile", *MODEL, "--calib", "distilled:0", "-o", str(tmp_path / "m")]) == 2
    assert "the count after ':' must be a whole number of samples, at least 1" in capsys.readouterr().err


def test_an_input_shape_that_the_data_contradicts_is_refused(capsys, tmp_path):
    """--input-shape 1,3,28,28 with MNIST data used to compile a 1,1,28,28 model without a word."""
    from intforge.cli import main

    assert main(["compile", "intforge.zoo:mnist_net", "--input-shape", "1,3,28,28", "--calib", "mnist:20",
                 "-o", str(tmp_path / "m")]) == 2
    assert "--input-shape 1,3,28,28 does not fit the samples of mnist:20, each (1, 28, 28): " \
           "give --input-shape 1,1,28,28" in capsys.readouterr().err
    assert main(["analyze", "intforge.zoo:mnist_net", "--data", "mnist:8", "--input-shape", "1,3,28,28", "--quiet",
                 "-o", str(tmp_path / "a.json")]) == 2
    assert "does not fit the samples of mnist:8, each (1, 28, 28)" in capsys.readouterr().err
    assert main(["analyze", "intforge.zoo:mnist_net", "--data", "mnist:8", "--input-shape", "1,784", "--quiet",
                 "-o", str(tmp_path / "a.json")]) == 2  # as many values, reshaped, and the model refuses them
    assert "mnist_net cannot run on samples of shape (784,) from mnist:8" in capsys.readouterr().err


def test_run_names_an_input_file_it_cannot_read(tmp_path, monkeypatch):
    import intforge.runtime
    from intforge.cli import cmd_run

    # the files are checked before the model runs: any loaded model will do
    monkeypatch.setattr(intforge.runtime, "load", lambda *a, **k: object())
    args = build_parser().parse_args(["run", "m.so", "--input", str(tmp_path / "x.npy")])
    (tmp_path / "x.npy").write_text("not an array")
    with pytest.raises(IntforgeError, match=r"cannot read input .*x.npy: not a .npy array"):
        cmd_run(args)
    (tmp_path / "x.npy").unlink()
    with pytest.raises(IntforgeError, match=r"input file .*x.npy does not exist"):
        cmd_run(args)


@pytest.mark.parametrize("text,message", [("150%", "runs from 0% (every layer at the lowest bits) to 100%"),
                                          ("x%", "a percentage looks like 50%"),
                                          ("3parsecs", "use a percentage (50%) or a number with a unit")])
def test_budgets_the_planner_cannot_read_say_what_it_can(text, message):
    from intforge.cli import parse_budget

    with pytest.raises(IntforgeError, match=re.escape(message)):
        parse_budget("size", text)
