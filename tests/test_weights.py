"""towers.weights: conv1 read from files written by each format's own library (Caffe's protobuf messages,
onnx, torch/torchvision, TensorFlow), exactly, in the right tower and channel order; bad files and a
missing extra get one line and exit status 2 from analysis/kernels.py."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from analysis import kernels as analysis
from towers.model import TowerAlexNet
from towers.weights import MissingExtra, WeightFileError, caffe_messages, read_weights

ROOT = Path(__file__).resolve().parents[1]


def conv1_weights(k: int = 8, seed: int = 0) -> np.ndarray:
    """(k, 3, 11, 11) float32 whose every value differs (so any reordering shows)."""
    return np.random.default_rng(seed).normal(size=(k, 3, 11, 11)).astype(np.float32)


def caffe_net(w1: np.ndarray, group: int, v1: bool = False) -> bytes:
    """A Caffe NetParameter as the model zoo stores it: conv1 (BGR), then a conv2 with ``group``;
    ``v1``: the old ``layers`` (V1LayerParameter, legacy blob dimensions) of the zoo's 2014 files."""
    m = caffe_messages()
    net = m["NetParameter"](name="tiny")
    w2 = np.zeros((4, len(w1) // group, 5, 5), np.float32)
    for name, bottom, w, g in (("conv1", "data", w1, 1), ("conv2", "conv1", w2, group)):
        if v1:
            layer = net.layers.add(name=name, type=4, bottom=[bottom], top=[name])  # 4: CONVOLUTION
            blob = layer.blobs.add(num=w.shape[0], channels=w.shape[1], height=w.shape[2], width=w.shape[3])
        else:
            layer = net.layer.add(name=name, type="Convolution", bottom=[bottom], top=[name])
            blob = layer.blobs.add()
            blob.shape.dim.extend(w.shape)
        blob.data.extend(w.ravel().tolist())
        layer.convolution_param.num_output = w.shape[0]
        if g != 1:
            layer.convolution_param.group = g
    return net.SerializeToString()


@pytest.mark.parametrize("v1", [False, True])
def test_caffemodel_towers_from_conv2_group_and_bgr(tmp_path, v1):
    w1 = conv1_weights()
    path = tmp_path / "net.caffemodel"
    path.write_bytes(caffe_net(w1, group=2, v1=v1))
    conv1 = read_weights(path)
    assert conv1.kernels.shape == (2, 4, 3, 11, 11) and "'conv2' has group 2" in conv1.towers_from
    assert np.array_equal(conv1.kernels[1, 0], w1[4, ::-1])  # kernel 4 opens tower 2; B,G,R -> R,G,B
    assert np.array_equal(conv1.kernels.reshape(8, 3, 11, 11), w1[:, ::-1])
    assert np.array_equal(read_weights(path, channels="rgb").kernels.reshape(8, 3, 11, 11), w1)
    with pytest.raises(WeightFileError, match="so 2 tower"):
        read_weights(path, towers=4)
    path.write_bytes(caffe_net(w1, group=1, v1=v1))
    assert read_weights(path).kernels.shape == (1, 8, 3, 11, 11)


def test_onnx_towers_from_the_next_convs_group(tmp_path):
    onnx = pytest.importorskip("onnx", reason="the onnx extra: pip install 'towers[onnx]'")
    from onnx import TensorProto, helper, numpy_helper

    w1 = conv1_weights()
    nodes = [
        helper.make_node("Conv", ["data", "conv1_w"], ["conv1"], name="conv1", strides=[4, 4]),
        helper.make_node("Relu", ["conv1"], ["relu1"]),
        helper.make_node("LRN", ["relu1"], ["norm1"], size=5),
        helper.make_node("Conv", ["norm1", "conv2_w"], ["conv2"], name="conv2", group=2, pads=[2, 2, 2, 2]),
    ]
    weights = [
        numpy_helper.from_array(w1, "conv1_w"),
        numpy_helper.from_array(np.zeros((4, 4, 5, 5), np.float32), "conv2_w"),
    ]
    graph = helper.make_graph(
        nodes,
        "caffenet-like",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 227, 227])],
        [helper.make_tensor_value_info("conv2", TensorProto.FLOAT, [1, 4, 55, 55])],
        initializer=weights,
    )
    model = helper.make_model(graph)
    onnx.checker.check_model(model)
    onnx.save(model, tmp_path / "caffenet.onnx")
    conv1 = read_weights(tmp_path / "caffenet.onnx")
    assert "'conv2' has group 2" in conv1.towers_from
    assert np.array_equal(conv1.kernels, w1[:, ::-1].reshape(2, 4, 3, 11, 11))


def test_torchvision_alexnet_and_tower_state_dicts(tmp_path):
    state = torchvision.models.alexnet().state_dict()
    torch.save(state, tmp_path / "alexnet.pth")
    conv1 = read_weights(tmp_path / "alexnet.pth")
    assert conv1.kernels.shape == (1, 64, 3, 11, 11) and conv1.channels == "RGB"
    assert np.array_equal(conv1.kernels[0], state["features.0.weight"].double().numpy())
    # this project's network (a quarter of the width) as a plain state dict: conv2 reads 12 of 24 channels a tower
    model = TowerAlexNet(num_towers=2, num_classes=2, width_multiplier=0.25, image_size=67)
    torch.save(model.state_dict(), tmp_path / "towers.pt")
    conv1 = read_weights(tmp_path / "towers.pt")
    assert conv1.kernels.shape == (2, 12, 3, 11, 11) and "reads 12 of conv1's 24" in conv1.towers_from
    assert np.array_equal(conv1.kernels, model.conv1_kernels().detach().double().numpy())


TF_WRITER = """
import sys
import numpy as np
import tensorflow as tf

w = np.load(sys.argv[1])  # (2, 48, 3, 11, 11) BGR
tf.compat.v1.disable_eager_execution()
with tf.Graph().as_default():
    for t in range(2):  # demul/AlexNet: tf.get_variable('conv1_gpu1', [11, 11, 3, 48]), HWIO
        tf.compat.v1.get_variable(f"conv1_gpu{t + 1}", initializer=w[t].transpose(2, 3, 1, 0))
    tf.compat.v1.get_variable("conv2_gpu1", initializer=np.zeros((5, 5, 48, 128), np.float32))
    saver = tf.compat.v1.train.Saver()
    with tf.compat.v1.Session() as session:
        session.run(tf.compat.v1.global_variables_initializer())
        saver.save(session, sys.argv[2])

from towers.weights import read_weights
np.save(sys.argv[3], read_weights(sys.argv[2] + ".index").kernels)
try:
    read_weights(sys.argv[2], variables=["conv1"])
except ValueError as e:
    print(e)
"""


# TensorFlow and the triton that torch brings clash in one environment (a segfault when both load), so CI
# installs TensorFlow into a folder of its own (.ci/run: pip install --target) and names it here; the
# checkpoint is written and read in a child process with that folder on its path.
TF_PATH = os.environ.get("TOWERS_TF_PATH", "")
HAS_TF = importlib.util.find_spec("tensorflow") is not None or (Path(TF_PATH) / "tensorflow").is_dir()


@pytest.mark.skipif(
    not HAS_TF and os.environ.get("CI") != "true",  # CI always has it: there a missing TensorFlow fails
    reason="the tf extra: pip install 'towers[tf]', or TOWERS_TF_PATH=a folder holding tensorflow",
)
def test_tf1_checkpoint_with_demuls_variable_names(tmp_path):
    """Written by TensorFlow's own tf.compat.v1 Saver (.index + .data-00000-of-00001), read by its reader.
    In a child process: TensorFlow loaded before triton (which Lightning imports) crashes the process."""
    assert HAS_TF, "CI installs TensorFlow into TOWERS_TF_PATH (.ci/run); it is missing"
    w = conv1_weights(96).reshape(2, 48, 3, 11, 11)
    np.save(tmp_path / "w.npy", w)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in [str(ROOT), TF_PATH, os.environ.get("PYTHONPATH", "")] if p),
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    done = subprocess.run(
        [sys.executable, "-c", TF_WRITER, str(tmp_path / "w.npy"), str(tmp_path / "model"), str(tmp_path / "read.npy")],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "model.data-00000-of-00001").is_file()
    assert np.array_equal(np.load(tmp_path / "read.npy"), w[:, :, ::-1])  # towers in order, BGR -> RGB
    assert "no variable 'conv1'" in done.stdout and "conv1_gpu1, conv1_gpu2" in done.stdout


def test_a_missing_extra_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    (tmp_path / "m.onnx").write_bytes(b"\x08\x07")
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if not installed
    with pytest.raises(MissingExtra, match=r"pip install 'towers\[onnx\]'"):
        read_weights(tmp_path / "m.onnx")
    assert run_cli(tmp_path / "m.onnx", capsys) == (2, "reading a .onnx file needs 'onnx': pip install 'towers[onnx]'")


def run_cli(path, capsys, *options) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit:
        analysis.cli([str(path), *options])
    err = capsys.readouterr().err.strip()
    return exit.value.code, err


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("objects.npy", np.array([{"a": 1}], dtype=object), "never unpickled"),
        ("empty.npy", np.zeros((0, 3, 11, 11)), "empty"),
        ("text.npy", b"96 kernels, honest", "not a numeric .npy array"),
        ("zero.npy", np.zeros((2, 3, 11, 11)), "all"),  # "all-zero" (this verdict), "all zero" (branch V's)
        ("shape.npy", np.zeros((5, 5)), "not conv1's"),
        ("missing.npy", None, "no such file"),
        ("notes.caffemodel", b"\xff\xff\xff", "cannot be read as a Caffe NetParameter"),
    ],
)
def test_bad_weight_files_are_one_line_exit_2(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        np.save(path, content, allow_pickle=True)
    code, err = run_cli(path, capsys, "--towers", "2", "--permutations", "999")
    assert code == 2 and message in err and "\n" not in err and "Traceback" not in err
    if name == "zero.npy":
        assert "zero" in err


def test_a_big_endian_array_reads_like_a_native_one(tmp_path):
    w = conv1_weights()
    np.save(tmp_path / "little.npy", w)
    np.save(tmp_path / "big.npy", w.astype(">f4"))
    assert np.array_equal(
        read_weights(tmp_path / "big.npy", 2).kernels, read_weights(tmp_path / "little.npy", 2).kernels
    )


def test_a_picture_bomb_and_a_missing_picture_are_one_line_exit_2(tmp_path, capsys):
    from PIL import Image

    Image.new("1", (6000, 6000)).save(tmp_path / "bomb.png")  # 36 million pixels in a few kB
    code, err = run_cli(tmp_path / "bomb.png", capsys, "--towers", "2")
    assert code == 2 and "6000x6000 pixels" in err and "decompression bomb" in err and "\n" not in err
    code, err = run_cli(tmp_path / "missing.png", capsys, "--towers", "2")
    assert code == 2 and err.endswith("missing.png: no such file")
