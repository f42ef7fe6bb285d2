"""Relax pass: run the integer graph in NHWC, the layout intforge's CPU kernels read: a pixel's channels
contiguous (x86 VNNI, the ARM / x86 dot-product kernels, the depthwise kernel).

TVM's own ConvertLayout turns every conv2d into NHWC / OHWI and carries the layout through the
elementwise requantize chains, residual adds, pooling and concats; it transposes only at the model's
input and before a flatten. The kernels then read their input where the previous layer wrote it, instead
of each conv transposing NCHW -> NHWC and back. TVM 0.27 has no layout rule for `relax.clip` (our
saturation), so we give it the one every unary elementwise op has; without it the layout would
bounce back to NCHW after every requantize.
"""

from __future__ import annotations

import tvm
from tvm import relax


def _register_clip_layout() -> None:
    op = tvm.ir.Op.get("relax.clip")
    if op.get_attr("FRelaxInferLayout") is None:
        op.set_attr("FRelaxInferLayout", tvm.ir.Op.get("relax.round").get_attr("FRelaxInferLayout"))


def nhwc_layout_pass() -> tvm.transform.Pass:
    """ConvertLayout to NHWC activations and OHWI weights for every conv2d (see the module docstring)."""
    _register_clip_layout()
    return relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "OHWI"]})
