"""ARM: every aarch64 preset cross-compiles real models, which run under qemu-user (each preset's own CPU
model) bit for bit equal to the reference; the tensorized kernels really use sdot and smmla/usmmla; and a board's
RPC server (emulated on loopback) is reachable by `bench --rpc` and `--tracker`, and `tune --tracker` measures
its candidates there."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch import nn

import intforge
from conftest import extreme_int_inputs, quantize_module
from conftest import intforge_cli as cli
from intforge import reference, zoo
from intforge.compiler import PRESETS, build, resolve_target
from intforge.emulate import free_port
from intforge.errors import ArtifactError, IntforgeError

ARM_PRESETS = [name for name, p in PRESETS.items() if p.arch == "aarch64"]


@pytest.fixture(scope="module")
def board():
    """The emulated board: skip (saying why) only where the cross compiler or qemu cannot be had."""
    from intforge import emulate

    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("aarch64-linux-gnu-g++ is not installed (apt-get install g++-aarch64-linux-gnu; `make test` "
                    "installs it when run as root)")
    try:
        return emulate.sysroot()
    except emulate.EmulationUnavailable as exc:
        pytest.skip(f"no emulated arm64 board: {exc}")


def disassemble(library) -> dict[str, str]:
    """Function name -> its aarch64 disassembly."""
    text = subprocess.run(["aarch64-linux-gnu-objdump", "-d", str(library)], capture_output=True, text=True,
                          check=True).stdout
    funcs: dict[str, str] = {}
    name = ""
    for line in text.splitlines():
        if line.endswith(">:"):
            name = line.split("<", 1)[1][:-2]
            funcs[name] = ""
        elif name:
            funcs[name] += line + "\n"
    return funcs


def test_presets_name_the_board_cpu_and_features():
    assert set(ARM_PRESETS) >= {"arm64", "arm64-dotprod", "rpi4", "rpi5", "graviton"}
    assert resolve_target("rpi5").has("dotprod") and not resolve_target("rpi5").has("i8mm")
    assert not resolve_target("rpi4").has("dotprod")
    assert resolve_target("graviton").has("i8mm")
    t = resolve_target("rpi5").tvm_target()
    assert str(t.attrs["mtriple"]) == "aarch64-linux-gnu" and str(t.attrs["mcpu"]) == "cortex-a76"


def test_missing_cross_compiler_says_how_to_install_it(tmp_path, monkeypatch):
    import dataclasses

    import intforge.compiler.targets as targets

    fake = dataclasses.replace(PRESETS["rpi5"], cross_compiler="no-such-aarch64-g++")
    monkeypatch.setitem(targets.PRESETS, "rpi5", fake)
    program = quantize_module(nn.Linear(8, 4), (1, 8))
    with pytest.raises(IntforgeError, match="apt-get install g\\+\\+-aarch64-linux-gnu"):
        build(program, tmp_path / "m", target="rpi5")


class UnsignedStack(nn.Module):
    """ReLU outputs (uint8) into a 3x3 conv with padding and stride, a grouped conv, a 1x1 conv and a
    linear: every path of the dot-product kernels, including the u8 -> s8 shift with its correction."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=2)
        self.c4 = nn.Conv2d(16, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8 * 5 * 5, 10)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = torch.relu(self.c3(x))
        x = torch.relu(self.c4(x))
        x = torch.relu(self.dw(x))
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("preset", ["rpi5", "graviton", "rpi4"])
def test_dot_product_kernels_bit_exact_on_extreme_inputs(board, tmp_path, preset):
    program = quantize_module(UnsignedStack(), (1, 3, 10, 10), scale=2.0)
    assert program.tensors[program.ops[1].inputs[0]].dtype == "uint8"
    art = build(program, tmp_path / preset, target=preset, boundary="int")
    lib = intforge.load(art.library, emulate=True)
    cases = extreme_int_inputs(program, np.random.default_rng(1))
    got = lib.run_many(np.concatenate([c[0] for c in cases]))[0]
    want = np.concatenate([reference.run_int(program, *c)[0] for c in cases])
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


def test_dotprod_convolutions_use_sdot_and_i8mm_uses_smmla(board, tmp_path):
    """The tensorized kernels really run the instruction: sdot on the rpi5, usmmla for unsigned and smmla
    for signed activations on Graviton, no dot product on the rpi4."""
    program = quantize_module(UnsignedStack(), (1, 3, 10, 10))
    found = {}
    for preset in ("rpi5", "graviton", "rpi4"):
        funcs = disassemble(build(program, tmp_path / preset, target=preset).library)
        # the kernel's name is the fused function's up to its first epilogue op (the requantize's cast)
        kernels = {re.split(r"_(?:add|cast)\d*_", n)[0].removeprefix("fused_"): body for n, body in funcs.items()
                   if n.startswith(("fused_conv2d", "fused_dense")) and n.endswith("_compute_")}
        assert len(kernels) == 5, f"{preset}: expected the 4 convs and the dense as kernels: {list(kernels)}"
        found[preset] = {name: {op for op in ("sdot", "usdot", "udot", "smmla", "usmmla") if f"\t{op}\t" in body}
                         for name, body in kernels.items()}
    # the 3 groups-1 convs and the dense: the stem (signed input) too, its 3 channels padded to the group
    assert sorted(found["rpi5"]) == ["conv2d_dot", "conv2d_sdot", "conv2d_sdot1", "conv2d_sdot2", "dense_sdot"]
    assert all(ops == {"sdot"} for ops in found["rpi5"].values())
    assert found["graviton"]["conv2d_smmla"] == {"smmla"}  # the stem: int8 input
    assert sorted(n for n, ops in found["graviton"].items() if ops == {"usmmla"}) == [
        "conv2d_usmmla", "conv2d_usmmla1", "dense_usmmla"]
    # the grouped conv keeps the contiguous-layout kernel (on the rpi5, sdot from LLVM's vectorizer)
    assert "conv2d_dot" in found["graviton"]
    # the Cortex-A72 has no dot product (and qemu would trap it): plain NEON widening multiplies instead
    assert sorted(found["rpi4"]) == ["conv2d_dot", "conv2d_neon", "conv2d_neon1", "conv2d_neon2", "dense_neon"]
    assert not any(found["rpi4"].values())


def test_foreign_library_refuses_to_load_natively_and_names_the_ways_to_run_it(board, tmp_path):
    program = quantize_module(nn.Linear(8, 4), (1, 8))
    art = build(program, tmp_path / "m", target="rpi5")
    with pytest.raises(ArtifactError, match="--emulate") as err:
        intforge.load(art.library)
    assert "aarch64" in str(err.value) and "--rpc" in str(err.value)
    with pytest.raises(IntforgeError, match="bench"):
        intforge.load(art.library, emulate=True).time()


@pytest.fixture(scope="module")
def mnist_arm(board, tmp_path_factory):
    x, y = zoo.mnist_digits()
    program, _ = intforge.quantize_model(zoo.mnist_net(), (torch.from_numpy(x[:100]),), x[:500])
    out = tmp_path_factory.mktemp("mnist-arm")
    return x, y, program, {p: build(program, out / p, target=p) for p in ARM_PRESETS}


def test_mnist_on_every_arm_preset_is_bit_exact_and_as_accurate_as_x86(mnist_arm):
    x, y, program, arts = mnist_arm
    want = np.concatenate([reference.run_float(program, x[i:i + 100])[0] for i in range(0, len(x), 100)])
    x86 = intforge.load(build(program, arts["rpi5"].library.parent.parent / "x86", target="x86").library)
    np.testing.assert_array_equal(x86(x[:100]), want[:100])
    acc_ref = float((want.argmax(1) == y).mean())
    assert acc_ref > 0.99
    for preset, art in arts.items():
        n = len(x) if preset == "rpi5" else 1000  # all 5,000 digits on one board, 1,000 on the others
        got = intforge.load(art.library, emulate=True).run_many(x[:n])[0]
        np.testing.assert_array_equal(got, want[:n], err_msg=preset)
    assert float((got.argmax(1) == y[:n]).mean()) == float((want[:n].argmax(1) == y[:n]).mean())


@pytest.fixture(scope="module", params=["resnet18", "mobilenet_v2"])
def imagenet_program(request):
    x = zoo.random_images(3)
    program, _ = intforge.quantize_model(getattr(zoo, request.param)(), (torch.from_numpy(x[:1]),), x)
    want = np.concatenate([reference.run_float(program, x[i:i + 1])[0] for i in range(2)])
    return program, x[:2], want


# arm64 and arm64-dotprod compile the same kernels as rpi4 and rpi5 (only -mcpu differs), and MNIST covers
# them in the default run; their ImageNet models run with `make test-all`. So do graviton's (its i8mm
# kernels: MNIST on every preset and the INT4 ones cover them; 25 s of a default run on the Zen 3).
@pytest.mark.parametrize("preset", [pytest.param(p, marks=pytest.mark.slow)
                                    if p.startswith("arm64") or p == "graviton" else p for p in ARM_PRESETS])
def test_imagenet_models_cross_compiled_and_bit_exact_under_emulation(board, imagenet_program, tmp_path, preset):
    program, x, want = imagenet_program
    art = build(program, tmp_path / "m", target=preset)
    np.testing.assert_array_equal(intforge.load(art.library, emulate=True).run_many(x)[0], want)


class WideStack(nn.Module):
    """Convs with enough output channels (128, 64) that an INT4 layer's threads take whole channel blocks
    and unpack each block's weights once for all its rows."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.c1 = nn.Conv2d(8, 128, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(128, 64, 1)
        self.fc = nn.Linear(64 * 5 * 5, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).flatten(1))


@pytest.mark.parametrize("preset", ["rpi5", "graviton", "rpi4"])
def test_int4_weights_on_arm_bit_exact(board, tmp_path, preset):
    """INT4 weights unpacked in registers by the sdot, i8mm and NEON kernels (the grouped conv: by the shared
    unpack kernel) and by the depthwise kernel, on extreme inputs."""
    from intforge.quantize import QuantConfig

    torch.manual_seed(3)
    depthwise = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),
                              nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16))
    for i, (module, shape) in enumerate([(UnsignedStack(), (1, 3, 10, 10)), (WideStack(), (1, 8, 9, 9)),
                                         (depthwise.eval(), (1, 16, 9, 9))]):
        program = quantize_module(module, shape, quant=QuantConfig(bits=4))
        assert any(op.attrs.get("weight_bits") == 4 for op in program.ops)
        art = build(program, tmp_path / f"m{i}", target=preset, boundary="int")
        cases = extreme_int_inputs(program, np.random.default_rng(2))
        got = intforge.load(art.library, emulate=True).run_many(np.concatenate([c[0] for c in cases]))[0]
        np.testing.assert_array_equal(got, np.concatenate([reference.run_int(program, *c)[0] for c in cases]))


@pytest.fixture(scope="module")
def rpi5_cli_build(board, tmp_path_factory):
    out = tmp_path_factory.mktemp("rpi5-cli") / "mnist"
    proc = cli("compile", "intforge.zoo:mnist_net", "--input-shape", "1,1,28,28", "--calib", "mnist:300",
               "--target", "rpi5", "-o", str(out))
    assert "target rpi5" in proc.stdout and "integer-only: yes" in proc.stdout
    return out / "model.so"


def test_cli_compile_for_rpi5_then_run_under_emulation(rpi5_cli_build):
    proc = cli("run", str(rpi5_cli_build), "--data", "mnist", "--count", "500", "--emulate")
    assert float(proc.stdout.split("accuracy ")[1].split()[0]) > 0.98
    assert "emulation (cortex-a76)" in proc.stdout
    native = cli("run", str(rpi5_cli_build), "--data", "mnist", "--count", "10", check=False)
    assert native.returncode == 2 and "--emulate" in native.stderr and "Traceback" not in native.stderr
    inspect = cli("inspect", str(rpi5_cli_build))
    assert "-mtriple=aarch64-linux-gnu" in inspect.stdout and "+dotprod" in inspect.stdout


def test_bench_over_rpc_against_an_emulated_board(rpi5_cli_build, tmp_path):
    from intforge.emulate import EmulatedRPCServer
    from intforge.remote import RemoteModel, connect
    from intforge.runtime import read_checked

    with EmulatedRPCServer("cortex-a76") as server:
        proc = cli("bench", str(rpi5_cli_build), "--rpc", f"127.0.0.1:{server.port}", "--repeat", "10",
                   "--warmup", "2", "--threads", "1", "--json", str(tmp_path / "b.json"))
        stats = json.loads((tmp_path / "b.json").read_text())
        assert stats["median_ms"] > 0 and stats["repeat"] == 10 and "via RPC" in proc.stdout
        assert stats["target"]["preset"] == "rpi5"
        # the library runs remotely with the same integers as the reference
        path, manifest = read_checked(rpi5_cli_build)
        remote = RemoteModel(connect(f"127.0.0.1:{server.port}"), path, manifest)
        x, _ = zoo.mnist_digits()
        program = intforge.load(rpi5_cli_build, emulate=True).program()
        np.testing.assert_array_equal(remote(x[:1]), reference.run_float(program, x[:1])[0])


def test_tune_and_bench_through_an_rpc_tracker(rpi5_cli_build, tmp_path, monkeypatch):
    """The fleet path, from the command line: `tune` measures MetaSchedule's candidates on the board a
    tracker hands out, `compile --target rpi5` then takes its schedules from those records (and
    `--untuned` does not), the tuned library stays bit-exact, and `bench` times it through the same
    tracker."""
    import os

    import tvm

    from intforge.compiler import tuning
    from intforge.compiler.build import _legalize_passes
    from intforge.emulate import EmulatedRPCServer, stop_process_group
    from intforge.relay_passes import emit_program

    env = {**os.environ, "INTFORGE_CACHE": str(tmp_path / "cache")}  # a private database; the board stays
    model = ("intforge.zoo:mnist_net", "--input-shape", "1,1,28,28", "--calib", "mnist:300", "--target", "rpi5")
    port = free_port()
    tracker = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port",
                                str(port), "--port-end", str(port + 1)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(60):
            assert tracker.poll() is None, "TVM's RPC tracker exited (is tornado installed?)"
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        with EmulatedRPCServer("cortex-a76", tracker=f"127.0.0.1:{port}", key="rpi5"):
            time.sleep(3)  # the server registers with the tracker after it starts listening
            proc = cli("tune", *model, "--trials", "2", "--tracker", f"127.0.0.1:{port}", "--key", "rpi5", env=env)
            assert f"on 127.0.0.1:{port}" in proc.stdout and "-> database" in proc.stdout
            monkeypatch.setattr(tuning, "tuning_root", lambda: tmp_path / "cache" / "tuning")
            preset = resolve_target("rpi5")
            # the candidates ran on the board: measured times, not MetaSchedule's failure marker
            records = [json.loads(line) for line in
                       (tuning.database_dir(preset) / "database_tuning_record.json").read_text().splitlines()]
            times = [t for r in records for t in (r[1][1] or [])]
            assert times and all(0 < t < 1 for t in times), times
            proc = cli("compile", *model, "-o", str(tmp_path / "tuned"), env=env)
            assert "schedule: tuned" in proc.stdout
            assert "schedule: default" in cli("compile", *model, "--untuned", "-o", str(tmp_path / "u"),
                                              env=env).stdout
            library = tmp_path / "tuned" / "model.so"
            program = intforge.load(library, emulate=True).program()
            tgt = tuning._tuning_target(preset)
            with tgt:
                fused = tvm.transform.Sequential(_legalize_passes(preset))(emit_program(program))
                applied = tuning.apply_database_pass(tuning.open_database(preset), tgt)(fused)
            assert any(isinstance(f, tvm.tirx.PrimFunc) and f.attrs.get("tir.is_scheduled", False)
                       for f in applied.functions.values()), "no kernel found in the board's tuning records"
            x, _ = zoo.mnist_digits()
            np.testing.assert_array_equal(intforge.load(library, emulate=True)(x[:1]),
                                          reference.run_float(program, x[:1])[0])
            proc = cli("bench", str(library), "--tracker", f"127.0.0.1:{port}", "--key", "rpi5",
                       "--repeat", "5", "--warmup", "1")
            assert "median" in proc.stdout and "key rpi5" in proc.stdout
    finally:
        stop_process_group(tracker)


def test_tune_for_a_board_needs_its_rpc_server(rpi5_cli_build):
    proc = cli("tune", "intforge.zoo:mnist_net", "--input-shape", "1,1,28,28", "--calib", "mnist:16", "--target",
               "rpi5", "--trials", "1", check=False)
    assert proc.returncode == 2 and "--rpc HOST:PORT" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("tune", "intforge.zoo:mnist_net", "--input-shape", "1,1,28,28", "--calib", "mnist:16", "--target",
               "rpi5", "--trials", "1", "--rpc", f"127.0.0.1:{free_port()}", check=False)
    assert proc.returncode == 2 and "cannot reach the RPC server" in proc.stderr and "Traceback" not in proc.stderr


def test_bench_rpc_to_nothing_is_a_clear_error(rpi5_cli_build):
    proc = cli("bench", str(rpi5_cli_build), "--rpc", f"127.0.0.1:{free_port()}", check=False)
    assert proc.returncode == 2 and "cannot reach the RPC server" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("bench", str(rpi5_cli_build), "--rpc", "nohostport", check=False)
    assert proc.returncode == 2 and "HOST:PORT" in proc.stderr
