"""First-layer kernels from the weight files trained AlexNets come in, behind one function.

    conv1 = read_weights("bvlc_alexnet.caffemodel")
    conv1.kernels        # (towers, kernels per tower, 3, h, w), float64, RGB
    conv1.towers_from    # how the towers were found: "conv2 'conv2' has group 2", "--towers 2", ...
    conv1.channels       # "BGR, flipped to RGB" or "RGB"

| file | how it is read | towers from | channels |
|---|---|---|---|
| ``.caffemodel`` | ``protobuf``, with the few messages of Caffe's ``caffe.proto`` that hold weights (below) | the ``group`` of the next convolution (conv2) | BGR |
| ``.onnx`` | ``onnx``: the first Conv's weight initializer | the ``group`` of the next Conv | BGR (the model zoo's AlexNets are Caffe conversions) |
| ``.index`` (+ ``.data-*``) | TensorFlow's own checkpoint reader (``tf.train.load_checkpoint``) | one variable per tower (``variables``, default demul/AlexNet's ``conv1_gpu1,conv1_gpu2``), HWIO | BGR (demul/AlexNet reads images with OpenCV) |
| ``.pt``/``.pth``/``.ckpt``/``.bin`` | ``torch.load(weights_only=True)``: this project's checkpoints, a state dict (torchvision's ``alexnet``), a bare tensor | the checkpoint's ``num_towers``; a state dict's next convolution: conv1's outputs / its inputs per group | RGB |
| ``.npy`` | ``numpy.load(allow_pickle=False)`` | ``towers`` | RGB |

``channels`` overrides a format's order; ``towers`` overrides (and is checked against) what the file
says. No reader runs code from a file: no pickle (PyTorch files load with ``weights_only``, arrays
without ``allow_pickle``), protobuf and ONNX are data. Each library is an optional extra
(``pip install 'towers[caffe]'``, ``[onnx]``, ``[tf]``); a missing one is a :class:`MissingExtra`
naming what to install.
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from towers.errors import UserError

TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
WEIGHT_SUFFIXES = (".caffemodel", ".onnx", ".index", ".npy", *TORCH_SUFFIXES)
TF_VARIABLES = ("conv1_gpu1", "conv1_gpu2")  # demul/AlexNet: tf.get_variable('conv1_gpu1', [11, 11, 3, 48])
PROJECT_CONV1 = "model.features.conv1.weight"  # a TowerClassifier checkpoint's state_dict key
CHANNELS = ("rgb", "bgr")


class WeightFileError(UserError, ValueError):
    """A weight file that cannot give conv1's kernels; the message says what to give or do."""


class MissingExtra(UserError, ImportError):
    """The library that reads a format is not installed (an optional extra)."""


@dataclass(frozen=True)
class Conv1:
    kernels: np.ndarray  # (towers, n, 3, h, w), float64, RGB
    towers_from: str  # how the tower count and membership were found
    channels: str  # the file's channel order and what was done with it
    source: str  # what was read (format, layer or variable names)
    checkpoint: dict = field(default_factory=dict)  # a TowerClassifier checkpoint: callback state, epoch, step

    def describe(self) -> str:
        t, n = self.kernels.shape[:2]
        return f"{self.source}; {t} tower(s) x {n} kernels ({self.towers_from}); channels {self.channels}"


def _need(module: str, extra: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"reading {what} needs {module!r}: pip install 'towers[{extra}]'") from None


def weight_kind(path: Path) -> str | None:
    """The format a path is read as ("caffe", "onnx", "tf", "npy", "torch"), None for none of them."""
    suffix = path.suffix.lower()
    if suffix == ".caffemodel":
        return "caffe"
    if suffix == ".onnx":
        return "onnx"
    if suffix == ".index" or (path.with_name(path.name + ".index")).is_file() or ".data-" in path.name:
        return "tf"
    if suffix == ".npy":
        return "npy"
    if suffix in TORCH_SUFFIXES:
        return "torch"
    return None


def read_weights(path, towers: int | None = None, channels: str | None = None, variables=None) -> Conv1:
    """conv1's kernels (towers, n, 3, h, w), RGB, from a weight file (the table in the module docstring).

    Args:
        towers: the tower count, for files that do not say it (a bare array); checked against files that do.
        channels: "rgb" or "bgr", the file's channel order; None: the format's own (the table).
        variables: TensorFlow checkpoints: conv1's variable names, one per tower (default ``TF_VARIABLES``).
    """
    path = Path(path)
    if channels is not None and channels not in CHANNELS:
        raise WeightFileError(f"channels {channels!r}: expected rgb or bgr")
    kind = weight_kind(path)
    if kind is None:
        raise WeightFileError(f"{path}: not a weight file this reader knows ({', '.join(WEIGHT_SUFFIXES)})")
    if kind != "tf" and not path.is_file():
        raise WeightFileError(f"{path}: no such file")
    reader = {"caffe": _caffe, "onnx": _onnx, "tf": _tensorflow, "npy": _npy, "torch": _torch}[kind]
    weights, found, default_order, source, extra = reader(path, variables) if kind == "tf" else reader(path)
    weights = np.asarray(weights, dtype=np.float64)  # also native byte order
    if weights.ndim == 4:
        weights, found = _split(weights, found, towers, path)
    elif towers is not None and towers != weights.shape[0]:
        raise WeightFileError(f"{path}: holds {weights.shape[0]} towers ({found}), not --towers {towers}")
    order = channels or default_order
    if order == "bgr":
        weights = weights[:, :, ::-1]
    how = {"bgr": "BGR, flipped to RGB", "rgb": "RGB"}[order]
    if channels is not None and channels != default_order:
        how += f" (given; the format's usual order is {default_order.upper()})"
    if not np.isfinite(weights).all():
        raise WeightFileError(f"{path}: conv1's weights are not finite (NaN or inf)")
    return Conv1(np.ascontiguousarray(weights), found, how, source, extra)


def _split(weights: np.ndarray, found: str | int | None, towers: int | None, path: Path):
    """(K, 3, h, w) -> (towers, K / towers, 3, h, w), kernels 0..K/T-1 in tower 1 (a grouped layer reads
    its input channels in contiguous blocks, one per group)."""
    k = weights.shape[0]
    if isinstance(found, tuple):  # (count, how) from the file
        count, how = found
        if towers is not None and towers != count:
            raise WeightFileError(f"{path}: {how}, so {count} tower(s), not --towers {towers}")
    elif towers is not None:
        count, how = towers, "--towers"
    else:
        raise WeightFileError(
            f"{path}: {found or 'the file does not say how many towers conv1 fed'}; give --towers "
            f"(2 for the paper's network, kernels 0..{k // 2 - 1} being tower 1; 1 for a one-tower network)"
        )
    if towers is not None and isinstance(found, tuple):
        how += " (--towers agrees)"
    if count < 1 or k % count:
        raise WeightFileError(f"{path}: {k} kernels cannot be split into {count} equal towers")
    return weights.reshape(count, k // count, *weights.shape[1:]), how


def _first_line(error: Exception) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0][:200]


def _first_layer(weights: np.ndarray, name: str, path: Path) -> np.ndarray:
    if weights.ndim != 4 or weights.shape[1] != 3 or weights.shape[0] == 0:
        raise WeightFileError(f"{path}: {name} has shape {tuple(weights.shape)}, not conv1's (K, 3, h, w)")
    return weights


# ----------------------------------------------------------------------------- Caffe


def caffe_messages():
    """The message classes of the part of Caffe's ``caffe.proto`` that holds a net's weights: NetParameter
    with its layers (current ``layer`` = 100 and the V1 ``layers`` = 2 of older files such as the model
    zoo's), LayerParameter / V1LayerParameter (name, type, bottom, top, blobs, convolution_param),
    BlobProto (shape, or the legacy num/channels/height/width; data) and ConvolutionParameter (num_output,
    group). Field numbers and types as in caffe.proto; every other field is skipped by the parser.
    Returns {name: class}."""
    _need("google.protobuf", "caffe", "a .caffemodel")
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    optional, repeated = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    messages = {
        "BlobShape": [("dim", 1, F.TYPE_INT64, repeated, None, True)],
        "BlobProto": [
            ("num", 1, F.TYPE_INT32, optional, None, False),
            ("channels", 2, F.TYPE_INT32, optional, None, False),
            ("height", 3, F.TYPE_INT32, optional, None, False),
            ("width", 4, F.TYPE_INT32, optional, None, False),
            ("data", 5, F.TYPE_FLOAT, repeated, None, True),
            ("shape", 7, F.TYPE_MESSAGE, optional, "BlobShape", False),
            ("double_data", 8, F.TYPE_DOUBLE, repeated, None, True),
        ],
        "ConvolutionParameter": [
            ("num_output", 1, F.TYPE_UINT32, optional, None, False),
            ("group", 5, F.TYPE_UINT32, optional, None, False),
        ],
        "LayerParameter": [
            ("name", 1, F.TYPE_STRING, optional, None, False),
            ("type", 2, F.TYPE_STRING, optional, None, False),
            ("bottom", 3, F.TYPE_STRING, repeated, None, False),
            ("top", 4, F.TYPE_STRING, repeated, None, False),
            ("blobs", 7, F.TYPE_MESSAGE, repeated, "BlobProto", False),
            ("convolution_param", 106, F.TYPE_MESSAGE, optional, "ConvolutionParameter", False),
        ],
        "V1LayerParameter": [
            ("bottom", 2, F.TYPE_STRING, repeated, None, False),
            ("top", 3, F.TYPE_STRING, repeated, None, False),
            ("name", 4, F.TYPE_STRING, optional, None, False),
            ("type", 5, F.TYPE_INT32, optional, None, False),  # enum LayerType; CONVOLUTION = 4
            ("blobs", 6, F.TYPE_MESSAGE, repeated, "BlobProto", False),
            ("convolution_param", 10, F.TYPE_MESSAGE, optional, "ConvolutionParameter", False),
        ],
        "NetParameter": [
            ("name", 1, F.TYPE_STRING, optional, None, False),
            ("layers", 2, F.TYPE_MESSAGE, repeated, "V1LayerParameter", False),
            ("layer", 100, F.TYPE_MESSAGE, repeated, "LayerParameter", False),
        ],
    }
    file = descriptor_pb2.FileDescriptorProto(name="towers_caffe_weights.proto", package="caffe", syntax="proto2")
    for name, fields in messages.items():
        message = file.message_type.add(name=name)
        for field_name, number, kind, label, type_name, packed in fields:
            f = message.field.add(name=field_name, number=number, type=kind, label=label)
            if type_name:
                f.type_name = f".caffe.{type_name}"
            if packed:
                f.options.packed = True
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"caffe.{name}")) for name in messages}


V1_CONVOLUTION = 4


def _blob_array(blob) -> np.ndarray:
    shape = list(blob.shape.dim) if blob.HasField("shape") else [blob.num, blob.channels, blob.height, blob.width]
    data = np.asarray(blob.data if len(blob.data) else blob.double_data, dtype=np.float64)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"blob of shape {shape} holds {data.size} values")
    return data.reshape(shape)


def _caffe(path: Path):
    net = caffe_messages()["NetParameter"]()
    try:
        net.ParseFromString(path.read_bytes())
    except Exception as e:  # protobuf's DecodeError and friends
        raise WeightFileError(f"{path}: cannot be read as a Caffe NetParameter ({e})") from None
    layers = list(net.layer) or list(net.layers)
    convs = [
        layer
        for layer in layers
        if (layer.type == "Convolution" if isinstance(layer.type, str) else layer.type == V1_CONVOLUTION)
        and len(layer.blobs)
    ]
    if not convs:
        raise WeightFileError(f"{path}: no convolution layer with weights in it (a .prototxt without weights?)")
    conv1 = convs[0]
    try:
        weights = _first_layer(_blob_array(conv1.blobs[0]), f"layer {conv1.name!r}", path)
    except ValueError as e:
        raise WeightFileError(f"{path}: layer {conv1.name!r}: {e}") from None
    found = "no convolution after conv1 says how many towers it fed"
    if len(convs) > 1:
        nxt = convs[1]
        group = nxt.convolution_param.group or 1  # caffe.proto's default group: 1
        found = (group, f"the next convolution {nxt.name!r} has group {group}")
    return weights, found, "bgr", f"{path} (Caffe, layer {conv1.name!r})", {}


# ----------------------------------------------------------------------------- ONNX


def _onnx(path: Path):
    onnx = _need("onnx", "onnx", "a .onnx file")
    from onnx import numpy_helper

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise WeightFileError(f"{path}: cannot be read as an ONNX model ({str(e)[:200]})") from None
    graph = model.graph
    convs = [node for node in graph.node if node.op_type == "Conv"]
    if not convs:
        raise WeightFileError(f"{path}: no Conv node in the graph")
    init = {t.name: t for t in graph.initializer}
    conv1 = convs[0]
    if len(conv1.input) < 2 or conv1.input[1] not in init:
        raise WeightFileError(f"{path}: the first Conv {conv1.name!r} takes its weights from no initializer")
    weights = _first_layer(numpy_helper.to_array(init[conv1.input[1]]), f"Conv {conv1.name!r}", path)
    found = "no Conv after the first says how many towers it fed"
    if len(convs) > 1:
        nxt = convs[1]
        group = next((int(a.i) for a in nxt.attribute if a.name == "group"), 1)  # ONNX's default group: 1
        found = (group, f"the next Conv {nxt.name or nxt.output[0]!r} has group {group}")
    return weights, found, "bgr", f"{path} (ONNX, Conv {conv1.name or conv1.output[0]!r})", {}


# ----------------------------------------------------------------------------- TensorFlow 1


def _tensorflow(path: Path, variables=None):
    prefix = str(path)
    for cut in (".index", ".data-"):
        if cut in path.name:
            prefix = str(path)[: str(path).rindex(cut)]
    if not Path(prefix + ".index").is_file():
        raise WeightFileError(f"{path}: no TensorFlow checkpoint here ({prefix}.index is missing)")
    tf = _need("tensorflow", "tf", "a TensorFlow checkpoint")
    try:
        reader = tf.train.load_checkpoint(prefix)
        shapes = reader.get_variable_to_shape_map()
    except Exception as e:
        raise WeightFileError(f"{path}: TensorFlow cannot read the checkpoint ({_first_line(e)})") from None
    names = list(variables or TF_VARIABLES)
    missing = [n for n in names if n not in shapes]
    if missing:
        candidates = sorted(n for n, s in shapes.items() if len(s) == 4 and s[2] == 3)
        raise WeightFileError(
            f"{path}: no variable {', '.join(map(repr, missing))}; give --variables NAME,NAME (one per tower); "
            f"variables shaped like conv1 (h, w, 3, k): {', '.join(candidates) or 'none'}"
        )
    towers = []
    for name in names:
        w = np.asarray(reader.get_tensor(name))
        if w.ndim != 4 or w.shape[2] != 3:
            raise WeightFileError(f"{path}: variable {name!r} has shape {w.shape}, not conv1's HWIO (h, w, 3, k)")
        towers.append(w.transpose(3, 2, 0, 1))  # HWIO -> (k, 3, h, w)
    if len({t.shape for t in towers}) != 1:
        raise WeightFileError(f"{path}: the variables {names} differ in shape: {[t.shape for t in towers]}")
    how = f"one variable per tower: {', '.join(names)}"
    return np.stack(towers), how, "bgr", f"{prefix} (TensorFlow checkpoint, HWIO)", {}


# ----------------------------------------------------------------------------- arrays and PyTorch


def _npy(path: Path):
    try:
        weights = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        reason = "it holds Python objects, which are never unpickled" if "pickle" in str(e) else str(e)[:200]
        raise WeightFileError(f"{path}: not a numeric .npy array ({reason})") from None
    if not np.issubdtype(weights.dtype, np.number) or np.issubdtype(weights.dtype, np.complexfloating):
        raise WeightFileError(f"{path}: holds {weights.dtype} values, not real numbers")
    return _array(weights, path), None, "rgb", f"{path} (weight array)", {}


def _array(weights: np.ndarray, path: Path) -> np.ndarray:
    if weights.ndim == 5 and weights.shape[2] == 3 and weights.size:
        return weights
    if weights.size == 0:
        raise WeightFileError(f"{path}: the array is empty (shape {tuple(weights.shape)}): no kernels")
    return _first_layer(weights, "the array", path)


def _torch(path: Path):
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values only, no code
    except Exception as e:
        raise WeightFileError(
            f"{path}: cannot be read as a PyTorch file of tensors ({type(e).__name__}: {_first_line(e)})"
        ) from None
    if isinstance(obj, torch.Tensor):
        return _array(obj.double().numpy(), path), None, "rgb", f"{path} (weight tensor)", {}
    if not isinstance(obj, dict):
        raise WeightFileError(f"{path}: holds a {type(obj).__name__}, not a tensor or a state dict")
    if PROJECT_CONV1 in obj.get("state_dict", {}):  # this project's checkpoint
        state = obj["state_dict"]
        num_towers = obj.get("hyper_parameters", {}).get("num_towers")
        found = (num_towers, f"the checkpoint was trained with num_towers {num_towers}") if num_towers else None
        extra = {
            "callback": obj.get("callbacks", {}).get("KernelBisectionCallback"),
            "epoch": obj.get("epoch"),
            "step": obj.get("global_step"),
        }
        source = f"{path} (checkpoint, epoch {extra['epoch']}, step {extra['step']})"
        return state[PROJECT_CONV1].double().numpy(), found, "rgb", source, extra
    state = obj.get("state_dict", obj) if isinstance(obj.get("state_dict"), dict) else obj
    convs = [(k, v) for k, v in state.items() if isinstance(v, torch.Tensor) and v.dim() == 4 and k.endswith("weight")]
    at = next((i for i, (_, v) in enumerate(convs) if v.shape[1] == 3), None)
    if at is None:
        raise WeightFileError(
            f"{path}: no convolution weight with 3 input channels among its tensors "
            f"({', '.join(list(state)[:6])}{', ...' if len(state) > 6 else ''})"
        )
    name, weights = convs[at]
    found = "no convolution after conv1 says how many towers it fed"
    if at + 1 < len(convs):
        nxt, w2 = convs[at + 1]
        if weights.shape[0] % w2.shape[1] == 0:
            groups = weights.shape[0] // w2.shape[1]
            found = (
                groups,
                f"the next convolution {nxt!r} reads {w2.shape[1]} of conv1's {weights.shape[0]} channels per group",
            )
    return weights.double().numpy(), found, "rgb", f"{path} (state dict, {name!r})", {}
