"""Optional ONNX Runtime inference of the r1 network (``pip install "astrotrunc[onnx]"``).

The torch path is the reference; this one runs the same BatchNorm-fused network (exported once
per set of weights and output channel, in memory) through ONNX Runtime's CPU kernels, which are
faster than torch's for the U-Net's small convolutions on CPUs. Its logits equal the torch ones
to float32 rounding (tested).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch

__all__ = []

BACKENDS = ("torch", "onnxruntime")


def check_backend(backend):
    """Validate a backend name; ``'onnxruntime'`` must be importable."""
    if backend not in BACKENDS:
        msg = f"backend must be one of {BACKENDS}, got {backend!r}"
        raise ValueError(msg)
    if backend == "onnxruntime":
        _import()
    return backend


def _import():
    try:
        import onnx  # noqa: F401  (torch's exporter needs it)
        import onnxruntime
    except ImportError:
        msg = ("backend='onnxruntime' needs the onnxruntime and onnx packages: "
               "pip install 'astrotrunc[onnx]'")
        raise ImportError(msg) from None
    return onnxruntime


class OnnxNetwork:
    """An ONNX Runtime session of a `~astrotrunc.detection.unet.UNet` inference copy.

    Called like the network on ``(n, c, H, W)`` float32 tensors whose H and W are multiples of
    ``multiple`` (the caller pads), it returns a CPU tensor.
    """

    def __init__(self, net, multiple, threads=None):
        ort = _import()
        net = net.to(memory_format=torch.contiguous_format)
        example = torch.zeros(1, net.down[0][0].in_channels // net.space_to_depth**2,
                              2 * multiple, 2 * multiple)
        buf = io.BytesIO()
        with warnings.catch_warnings():  # the TorchScript exporter's deprecation and tracing
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (example,), buf, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}}, dynamo=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(buf.getvalue(), options,
                                            providers=["CPUExecutionProvider"])
        self.multiple = int(multiple)

    def __call__(self, x):
        x = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.multiple, (-w) % self.multiple
        if ph or pw:  # the zero padding the U-Net itself applies
            x = np.pad(x, ((0, 0), (0, 0), (0, ph), (0, pw)))
        return torch.from_numpy(self.session.run(None, {"x": x})[0][..., :h, :w])
