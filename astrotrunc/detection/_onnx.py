"""Optional ONNX-model inference of the detection networks, through OpenVINO or ONNX Runtime
(``pip install "astrotrunc[openvino]"`` or ``"astrotrunc[onnx]"``).

The torch path is the reference; this one exports the same inference networks (r1's
BatchNorm-fused U-Net and the flux estimator's network with its input scaling and quantile
assembly, each once per set of weights, in memory) to ONNX and runs them on the CPU through
OpenVINO or ONNX Runtime, both faster than torch for these small convolutions. OpenVINO runs r1's
U-Net about 30 % faster than ONNX Runtime on the development CPU, and the flux estimator's network
(a few hundred small cutouts of varying number per map) about 3 times slower, so under
``backend="openvino"`` the flux network runs in ONNX Runtime where that is installed.
Their outputs equal the torch ones to float32 rounding (tested). The export uses torch's
TorchScript-based exporter (fast), or its ``torch.export``-based one where that is gone.
"""

from __future__ import annotations

import copy
import importlib
import io
import logging
import threading
import warnings

import numpy as np
import torch

__all__ = []

BACKENDS = ("auto", "torch", "onnxruntime", "openvino")

# what 'auto' takes, the first installed (fastest for r1's U-Net first), and their extras
_RUNTIMES = {"openvino": "openvino", "onnxruntime": "onnx"}

# torch's exporter keeps its state in globals: two threads exporting at once (the first maps of
# a survey's thread pool) break each other
_EXPORT_LOCK = threading.Lock()


def check_backend(backend, device="cpu"):
    """Validate a backend name and resolve ``'auto'``: OpenVINO, else ONNX Runtime, the first
    installed when the network is on ``device`` ``'cpu'``, else torch. A runtime named must be
    importable."""
    if backend not in BACKENDS:
        msg = f"backend must be one of {BACKENDS}, got {backend!r}"
        raise ValueError(msg)
    if backend == "auto":
        if torch.device(device).type != "cpu":
            return "torch"
        return next((name for name in _RUNTIMES if _installed(name)), "torch")
    if backend != "torch":
        _import(backend)
    return backend


def flux_runtime(backend):
    """The runtime of the flux estimator's network under ``backend`` (resolved): ONNX Runtime
    for ``'openvino'`` too where it is installed (faster on these small inputs)."""
    if backend == "openvino" and _installed("onnxruntime"):
        return "onnxruntime"
    return backend


def _installed(runtime):
    try:
        _import(runtime)
    except (ImportError, OSError):  # not installed, or its compiled libraries do not load
        return False
    return True


def _import(runtime):
    try:
        import onnx  # noqa: F401  (torch's exporter needs it)
        module = importlib.import_module(runtime)
    except ImportError:
        msg = (f"backend={runtime!r} needs the {runtime} and onnx packages: "
               f"pip install 'astrotrunc[{_RUNTIMES[runtime]}]'")
        raise ImportError(msg) from None
    return module


def _export(net, example, names, multiple=None):
    """The ONNX model (bytes) of ``net``, its inputs' first axis dynamic (and the last two of the
    first input, in steps of ``multiple``).

    torch's TorchScript-based exporter takes about 0.3 s for the U-Net. It is deprecated (since
    torch 2.9; "will be removed"), so where it is gone or fails, the ``torch.export``-based one
    (the ``onnxscript`` package) makes the same model, in seconds.
    """
    with _EXPORT_LOCK, warnings.catch_warnings():  # the exporter's deprecation and tracing
        warnings.simplefilter("ignore")
        axes = {name: {0: "n"} for name in names}
        if multiple:
            axes["x0"].update({2: "h", 3: "w"})
        buf = io.BytesIO()
        try:
            torch.onnx.export(net, example, buf, input_names=names, output_names=["y"],
                              dynamic_axes=axes, dynamo=False)
            return buf.getvalue()
        except Exception as exc:  # whatever a torch without it raises
            failure = exc
        try:
            # batches of 2: torch.export takes an axis of length 1 for a constant
            example = tuple(t.expand(2, *t.shape[1:]).contiguous() for t in example)
            shapes = [{0: torch.export.Dim("n")} for _ in example]
            if multiple:
                shapes[0].update({2: multiple * torch.export.Dim("h"),
                                  3: multiple * torch.export.Dim("w")})
            logger = logging.getLogger("torch.onnx")  # its notes on torchvision's operators
            level = logger.level
            logger.setLevel(logging.ERROR)
            try:
                program = torch.onnx.export(net, example, input_names=names,
                                            output_names=["y"], dynamic_shapes=tuple(shapes),
                                            dynamo=True, optimize=True, verbose=False)
            finally:
                logger.setLevel(level)
            return program.model_proto.SerializeToString()
        except Exception as exc:
            msg = (f"torch could not export the network to ONNX ({type(exc).__name__}: {exc}; "
                   f"the TorchScript-based exporter: {type(failure).__name__}: {failure}); "
                   "use backend='torch'")
            raise RuntimeError(msg) from exc


class OnnxNetwork:
    """An inference network (`~astrotrunc.detection.unet.UNet` copy, the flux estimator's
    `~astrotrunc.detection.photometry._Quantiles`) exported to ONNX and run by ONNX Runtime or
    OpenVINO, called like the network on float32 tensors.

    Parameters
    ----------
    net : `torch.nn.Module`
        In evaluation mode.
    example : tuple of `torch.Tensor`
        Example inputs; their first axis (the batch) is dynamic.
    multiple : int, optional
        The first input's last two axes are dynamic too and padded (with zeros, as the U-Net
        does) to multiples of this, the output cropped back.
    threads : int, optional
        The runtime's threads (torch's number by default).
    runtime : {'onnxruntime', 'openvino'}
        Which runs it.
    """

    def __init__(self, net, example, multiple=None, threads=None, runtime="onnxruntime"):
        module = _import(runtime)
        # a copy: `Module.to` works in place, and the caller's (cached, channels-last) network
        # must stay as it is
        net = copy.deepcopy(net).to(memory_format=torch.contiguous_format)
        names = [f"x{i}" for i in range(len(example))]
        model = _export(net, tuple(example), names, multiple)
        threads = int(threads or torch.get_num_threads())
        if runtime == "openvino":
            self.session = _OpenVinoSession(module, model, threads)
        else:
            options = module.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            # no spinning between calls: idle ONNX Runtime threads would take the cores from
            # the torch and numpy work in between (measured: 25 % slower per 128 x 128 map)
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self.session = module.InferenceSession(model, options,
                                                   providers=["CPUExecutionProvider"])
        self.names, self.multiple, self.runtime = names, multiple, runtime

    def __call__(self, *inputs):
        return torch.from_numpy(self.run(*(t.detach().cpu().numpy() for t in inputs)))

    def run(self, *arrays):
        """The network's output for numpy inputs, as a numpy array."""
        arrays = [np.ascontiguousarray(a, dtype=np.float32) for a in arrays]
        h, w = arrays[0].shape[-2:]
        if self.multiple:
            ph, pw = (-h) % self.multiple, (-w) % self.multiple
            if ph or pw:  # the zero padding the U-Net itself applies
                arrays[0] = np.pad(arrays[0], ((0, 0), (0, 0), (0, ph), (0, pw)))
        out = self.session.run(None, dict(zip(self.names, arrays)))[0]
        return out[..., :h, :w] if self.multiple else out


class _OpenVinoSession:
    """An OpenVINO model compiled for the CPU, run as an ONNX Runtime session is
    (``run(None, inputs) -> [output]``), with one inference request per calling thread (a
    request serves one call at a time).

    The first input shapes it runs get a model compiled for those shapes alone; any other shapes,
    the dynamic model (compiled when first needed). A static model runs the shipped detector's
    network on one 128 x 128 map 0.3-0.4 ms faster (3.4-3.6 against 3.7-4.0 ms, interleaved) and
    compiles in the same ~0.1 s, so a finder on maps of one shape compiles once, as before.
    """

    def __init__(self, ov, model, threads):
        self._ov, self._model = ov, model
        self._core = ov.Core()
        self._config = {
            "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
            # float32 on every CPU: OpenVINO's default is bfloat16 or float16 where the CPU has
            # them, and that would move the detections
            "INFERENCE_PRECISION_HINT": "f32",
            # its threads not pinned to cores: numpy's and torch's work shares them
            "ENABLE_CPU_PINNING": False}
        self._static_shapes = self._static = self._dynamic = None
        self._lock = threading.Lock()
        self._local = threading.local()

    def _compile(self, shapes=None):
        model = self._core.read_model(self._model)
        if shapes is not None:
            model.reshape({port: self._ov.PartialShape(list(shape))
                           for port, shape in zip(model.inputs, shapes)})
        return self._core.compile_model(model, "CPU", self._config)

    def compiled(self, shapes):
        """The compiled model that runs inputs of these shapes."""
        if shapes == self._static_shapes:
            return self._static
        with self._lock:
            if self._static is None:
                self._static, self._static_shapes = self._compile(shapes), shapes
                return self._static
            if shapes == self._static_shapes:  # another thread compiled it meanwhile
                return self._static
            if self._dynamic is None:
                self._dynamic = self._compile()
            return self._dynamic

    def run(self, _, inputs):
        compiled = self.compiled(tuple(a.shape for a in inputs.values()))
        requests = self._local.__dict__.setdefault("requests", {})
        request = requests.get(id(compiled))
        if request is None:
            request = requests[id(compiled)] = compiled.create_infer_request()
        # the inputs read in place (contiguous float32, and the call is synchronous): copying
        # them took 0.3 ms per 128 x 128 map; the output is a copy (the request reuses its own)
        return [request.infer(inputs, share_inputs=True)[0]]
