"""NVIDIA GPU targets: Tensor Core kernels built without a GPU (CI), and run bit for bit where one exists.

Compile-only tests need nvcc (the CUDA toolkit) and no GPU: they check the kernels nvcc produced for
sm_75 / sm_90 contain the Tensor Core instructions (PTX `mma.sync`, SASS `IMMA`). The GPU tests run the
.so on GPU 0 against the reference and skip, saying why, where there is none.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import intforge
from conftest import extreme_int_inputs, quantize_module
from conftest import intforge_cli as cli
from intforge import cuda_env, reference, zoo
from intforge.compiler import build
from intforge.compiler.targets import resolve_target
from intforge.errors import ArtifactError, IntforgeError
from intforge.quantize import QuantConfig

pytestmark = pytest.mark.skipif(cuda_env.nvcc_path() is None, reason="no nvcc: install the CUDA toolkit 13.x")
HAVE_GPU = cuda_env.nvcc_path() is not None and cuda_env.gpu_available()
needs_gpu = pytest.mark.skipif(not HAVE_GPU, reason="no CUDA GPU on this machine: the GPU half of issue 6 "
                                                    "runs where one is (compile-only tests still run)")


class GemmStack(nn.Module):
    """Every Tensor Core path: a signed-input 3x3 conv with padding, stride and odd channel counts (N and
    M tiles only partly full), a dilated conv, a 1x1 conv wider than one 64-channel tile, a grouped and a
    depthwise conv (generic GPU path), and a linear layer on unsigned inputs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 20, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(20, 24, 3, padding=2, dilation=2)
        self.c3 = nn.Conv2d(24, 72, 1)
        self.g = nn.Conv2d(72, 72, 3, padding=1, groups=4)
        self.dw = nn.Conv2d(72, 72, 3, padding=1, groups=72)
        self.fc = nn.Linear(72 * 7 * 7, 10)

    def forward(self, x):
        x = self.c1(x)  # signed output: the next conv reads int8
        x = torch.relu(self.c2(x))
        x = torch.relu(self.c3(x))
        x = torch.relu(self.g(x))
        x = torch.relu(self.dw(x))
        return self.fc(x.flatten(1))


@pytest.fixture(scope="module")
def stack_programs():
    return {bits: quantize_module(GemmStack(), (2, 3, 13, 13), scale=2.0, quant=QuantConfig(bits=bits))
            for bits in (8, 4)}


def ptx_of(cu: Path, arch: str) -> str:
    out = cu.with_suffix(f".{arch}.ptx")
    subprocess.run([cuda_env.nvcc_path(), "-ptx", f"-arch={arch}", "-o", str(out), str(cu)], check=True,
                   capture_output=True)
    return out.read_text()


def sass_of(cu: Path, arch: str) -> str | None:
    tool = cuda_env.nvdisasm_path()
    if tool is None:
        return None
    out = cu.with_suffix(f".{arch}.cubin")
    subprocess.run([cuda_env.nvcc_path(), "-cubin", f"-arch={arch}", "-o", str(out), str(cu)], check=True,
                   capture_output=True)
    return subprocess.run([tool, str(out)], check=True, capture_output=True, text=True).stdout


def test_gpu_presets():
    t4, a100, h100 = (resolve_target(n) for n in ("t4", "a100", "h100"))
    assert (t4.cuda_arch, a100.cuda_arch, h100.cuda_arch) == ("sm_75", "sm_80", "sm_90")
    assert t4.has("int4-tensor-core") and a100.has("int4-tensor-core") and not h100.has("int4-tensor-core")
    assert all(p.has("int8-tensor-core") and not p.is_cross for p in (t4, a100, h100))
    assert str(t4.tvm_target().kind.name) == "cuda" and t4.describe()["device"] == "cuda"
    if not HAVE_GPU:
        with pytest.raises(IntforgeError, match="no CUDA GPU was found.*t4"):
            resolve_target("cuda")


def test_t4_build_has_int8_and_int4_tensor_core_instructions(stack_programs, tmp_path):
    for bits, want in ((8, r"mma\.sync\.aligned\.m8n8k16\.row\.col\.s32\.(u8|s8)\.s8\.s32"),
                       (4, r"mma\.sync\.aligned\.m8n8k32\.row\.col\.s32\.(u4|s4)\.s4\.s32")):
        art = build(stack_programs[bits], tmp_path / f"t4-{bits}", target="t4", boundary="int")
        assert art.manifest["target"]["cuda_arch"] == "sm_75" and "Tensor Core" in art.manifest["kernels"]
        ptx = ptx_of(art.library.with_suffix(".cu"), "sm_75")
        found = set(re.findall(want, ptx))
        # the signed-input conv and the unsigned-input convs / linear each got their instruction
        assert found == {"s8", "u8"} if bits == 8 else found == {"s4", "u4"}, found
        # four layers on Tensor Cores (c1, c2, c3, fc): four kernels with the mma
        kernels = re.findall(r"\.entry (\w+)", ptx)
        assert sum(k.startswith("intforge_tc_") for k in kernels) == 4, kernels
        sass = sass_of(art.library.with_suffix(".cu"), "sm_75")
        if sass is not None:
            assert "IMMA" in sass
        if bits == 4:  # INT4 weights travel packed: half the bytes of the INT8 build's weights
            assert art.library.stat().st_size < (tmp_path / "t4-8" / "model.so").stat().st_size


def test_h100_runs_int4_layers_on_int8_tensor_cores(stack_programs, tmp_path):
    art = build(stack_programs[4], tmp_path / "h100", target="h100", boundary="int")
    assert "widened to int8" in art.manifest["kernels"]
    ptx = ptx_of(art.library.with_suffix(".cu"), "sm_90")
    assert "m8n8k16" in ptx and "m8n8k32" not in ptx
    sass = sass_of(art.library.with_suffix(".cu"), "sm_90")
    if sass is not None:
        assert "IMMA" in sass


def test_depthwise_and_grouped_convs_run_one_thread_an_output(stack_programs, tmp_path):
    """The convs off the Tensor Cores (depthwise: 9 products an output, grouped: 162) sum in one thread
    each (kernels/cuda_generic.ShortReduction), not one thread block an output summing across threads."""
    from intforge.kernels.cuda_generic import SHORT_REDUCTION

    art = build(stack_programs[8], tmp_path / "m", target="t4", boundary="int")
    cu = art.library.with_suffix(".cu").read_text()
    generic = re.findall(r"__global__ void __launch_bounds__\((\d+)\) (\w*conv2d\w*)\(", cu)
    names = {name for _, name in generic}
    assert len(names) >= 2, names  # the grouped and the depthwise conv
    assert "__shfl_down_sync" not in cu and "red_buf" not in cu
    assert 9 * 72 // 4 <= SHORT_REDUCTION


def test_gpu_library_loads_without_gpu_and_says_what_it_needs(stack_programs, tmp_path):
    import tvm

    art = build(stack_programs[8], tmp_path / "m", target="t4", boundary="int")
    mod = tvm.runtime.load_module(str(art.library))  # a real CUDA module with its fatbin, not a stub

    def kinds(m):
        return [m.kind] + [k for i in m.imports for k in kinds(i)]

    assert "cuda" in kinds(mod)
    if not HAVE_GPU:
        with pytest.raises(ArtifactError, match="no CUDA GPU"):
            intforge.load(art.library)


def test_missing_nvcc_is_an_instruction(stack_programs, tmp_path, monkeypatch):
    monkeypatch.setattr(cuda_env, "nvcc_path", lambda: None)
    with pytest.raises(IntforgeError, match="nvcc, which is not installed.*CUDA toolkit"):
        build(stack_programs[8], tmp_path / "m", target="a100")


def test_cli_compile_mnist_for_t4(tmp_path):
    out = tmp_path / "mnist"
    proc = cli("compile", "intforge.zoo:mnist_net", "--input-shape", "1,1,28,28", "--calib", "mnist:200",
               "--target", "t4", "-o", str(out))
    assert "target t4" in proc.stdout and "integer-only: yes" in proc.stdout and "Tensor Core" in proc.stdout
    assert (out / "model.cu").exists()
    inspect = cli("inspect", str(out / "model.so"))
    assert "sm_75" in inspect.stdout
    if not HAVE_GPU:
        run = cli("run", str(out / "model.so"), "--data", "mnist", "--count", "10", check=False)
        assert run.returncode == 2 and "no CUDA GPU" in run.stderr and "Traceback" not in run.stderr


def test_tune_and_schedules_refuse_gpu_targets_clearly():
    for cmd in (["tune", "intforge.zoo:mnist_net", "--input-shape", "1,1,28,28", "--calib", "mnist:20", "--trials",
                 "1", "--target", "t4"],
                ["schedules", "intforge.zoo:mnist_net", "--input-shape", "1,1,28,28", "--target", "a100"]):
        proc = cli(*cmd, check=False)
        assert proc.returncode == 2 and "is a GPU" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


# ---------------------------------------------------------------- on a GPU


@needs_gpu
@pytest.mark.parametrize("bits", [8, 4])
def test_stack_bit_exact_on_gpu(stack_programs, tmp_path, bits):
    program = stack_programs[bits]
    lib = intforge.load(build(program, tmp_path / "m", target="cuda", boundary="int").library)
    for case in extreme_int_inputs(program, np.random.default_rng(bits)):
        np.testing.assert_array_equal(lib(*case), reference.run_int(program, *case)[0])


@needs_gpu
def test_mnist_on_gpu_bit_exact_and_accurate(tmp_path):
    x, y = zoo.mnist_digits()
    net = zoo.mnist_net().eval()
    for label, quant in (("int8", QuantConfig()), ("mixed", QuantConfig(layer_bits={"features.3": 4}))):
        program, _ = intforge.quantize_model(net, (torch.from_numpy(x[:1].copy()),), x[:300], quant=quant)
        art = build(program, tmp_path / label, target="cuda")
        lib = intforge.load(art.library)
        got = np.concatenate([lib(x[i:i + 1]) for i in range(500)])
        want = np.concatenate([reference.run_float(program, x[i:i + 1])[0] for i in range(500)])
        np.testing.assert_array_equal(got, want)
        assert (got.argmax(1) == y[:500]).mean() > 0.97


@needs_gpu
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_imagenet_models_bit_exact_on_gpu(name, tmp_path):
    model = getattr(zoo, name)()
    images = zoo.random_images(4)
    quant = QuantConfig() if name == "mobilenet_v2" else QuantConfig(layer_bits={"layer3.0.conv1": 4,
                                                                                  "layer3.0.conv2": 4})
    program, _ = intforge.quantize_model(model, (torch.from_numpy(images[:1].copy()),), images, quant=quant)
    lib = intforge.load(build(program, tmp_path / name, target="cuda").library)
    np.testing.assert_array_equal(lib(images[:1]), reference.run_float(program, images[:1])[0])



# ---------------------------------------------------------------- without a GPU: the kernels, emulated


def _layer_io(program, inputs):
    env = dict(zip(program.inputs, inputs, strict=True))
    for op in program.ops:
        env[op.output] = reference.run_op(program, op, [env[i] for i in op.inputs])
    return env


@pytest.mark.parametrize("bits", [8, 4])
def test_tensor_core_kernels_bit_exact_under_cpu_emulation(stack_programs, tmp_path, bits):
    """Every Tensor Core layer of the stack, its CUDA C as nvcc gets it, run on the CPU with `mma.sync`
    emulated from the PTX fragment tables: equal to the reference on random and extreme inputs."""
    import tvm
    from cuda_emulator import build_emulator

    from intforge.compiler.build import cuda_source
    from intforge.kernels.cuda_tensorcore import THREADS
    from intforge.relay_passes.tensor_core import layer_kernel

    program = stack_programs[bits]
    cuda_env.ensure_runtime()
    os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc")
    # the kernels and their compile-time arguments exactly as the GPU emitter makes them for this program
    kernels = {op.name: k for op in program.ops if (k := layer_kernel(program, op, int4_tensor_cores=True))}
    assert set(kernels) == {"c1", "c2", "c3", "fc"}
    target = resolve_target("t4").tvm_target()
    cases = extreme_int_inputs(program, np.random.default_rng(bits))
    for name, kernel in kernels.items():
        op = next(o for o in program.ops if o.name == name)
        with target:
            ex = tvm.compile(tvm.IRModule({"main": kernel.func.with_attr("global_symbol", "main")}), target=target)
        launch, params = build_emulator(cuda_source(ex), "main_kernel", tmp_path)
        for case in cases[:3] + cases[4:5]:  # two random, all-min, all-max inputs to the model
            env = _layer_io(program, case)
            want = env[op.output]
            y = np.zeros(want.size, want.dtype)
            arrays = {"x": np.ascontiguousarray(env[op.inputs[0]]).ravel(), "y": y,
                      **{arg: arr for arg, (arr, _) in kernel.constants.items()}}
            launch(*kernel.grid, THREADS, arrays)
            np.testing.assert_array_equal(y.reshape(want.shape), want, err_msg=f"layer {name}, {bits}-bit")
