"""Whole real models: the .so is bit-exact with the reference, and INT8 keeps the float accuracy."""

import numpy as np
import pytest
import torch

import intforge
import intforge.compiler
from intforge import reference, zoo
from intforge.cli import predict


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    model = zoo.mnist_net()
    x, y = zoo.mnist_digits()
    art = intforge.compile(model, (torch.from_numpy(x[:1]),), x[:500],
                           output=tmp_path_factory.mktemp("mnist"))
    return model, x, y, art, intforge.load(art.library)


def test_mnist_int8_accuracy_within_0_3_points_of_float(mnist):
    model, x, y, _, lib = mnist
    with torch.no_grad():
        float_acc = float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())
    preds, _ = predict(lib, x)
    int_acc = float((preds == y).mean())
    assert float_acc > 0.99
    assert abs(int_acc - float_acc) <= 0.003, (float_acc, int_acc)


def test_mnist_so_is_bit_exact_with_reference(mnist):
    _, x, _, _, lib = mnist
    program = lib.program()
    for i in range(0, 200, 7):
        np.testing.assert_array_equal(lib(x[i:i + 1]), reference.run_float(program, x[i:i + 1])[0])


def test_mnist_layer_table_has_stable_module_names(mnist):
    _, _, _, art, _ = mnist
    names = [row["name"] for row in art.manifest["layers"]]
    assert names == ["features.0", "features.3", "classifier.0", "classifier.2"]
    assert all(row["weight_bits"] == 8 for row in art.manifest["layers"])


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_model_at_224_is_bit_exact(name, tmp_path):
    model = getattr(zoo, name)()
    x = zoo.random_images(9, seed=1)
    art = intforge.compile(model, (torch.from_numpy(x[:1]),), x[1:], output=tmp_path)
    lib = intforge.load(art.library)
    program = lib.program()
    for i in range(2):
        got = lib(x[i:i + 1])
        np.testing.assert_array_equal(got, reference.run_float(program, x[i:i + 1])[0])
    # Integer-only boundary too: same integers end to end.
    q = reference.quantize_inputs(program, x[:1])
    int_art = intforge.compiler.build(program, tmp_path / "int", boundary="int")
    np.testing.assert_array_equal(intforge.load(int_art.library)(*q), reference.run_int(program, *q)[0])
    # BatchNorm is folded: one quantized conv per torchvision conv, no BN left.
    n_convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert sum(r["kind"] == "conv2d" for r in art.manifest["layers"]) == n_convs
    # And the integers still mean what the float model computes (random weights: a loose check).
    with torch.no_grad():
        want = model(torch.from_numpy(x[:1])).numpy()
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.95


def test_zoo_models_are_reproducible_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b = zoo.mobilenet_v2(), zoo.mobilenet_v2()
    assert torch.equal(torch.rand(1), before)  # the caller's RNG stream is untouched
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(zoo.mobilenet_v2(seed=1).features[0][0].weight, a.features[0][0].weight)
