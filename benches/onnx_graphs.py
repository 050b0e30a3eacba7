"""ONNX graphs of our networks, built from our own safetensors files with the `onnx`
package, so onnxruntime runs the very weights candle runs (see `side_by_side.py`).

The layout is read from the weights the way `shared/src/models/efficientnet_lite.rs` reads
it (kernel from the depthwise filter, expansion from the expand convolution, a new stage
where the channel count changes), BatchNorm is folded into the convolutions the same way
(eps 1e-3), TF "SAME" padding becomes each convolution's asymmetric `pads` for the fixed
input size. The embedder adds GeM pooling, the projection and L2 normalisation; the
detector adds the FCOS head of `shared/src/models/detector.rs` (GroupNorm expressed as
InstanceNormalization over reshaped groups, which onnxruntime implements natively).
"""

import json
import struct

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

BN_EPS = 1e-3
STAGE_STRIDES = [1, 2, 2, 2, 1, 2, 1]
STEM = 32
GEM_EPS = 1e-6
GN_EPS = 1e-5
MAX_LOG_DISTANCE = 8.0
OPSET = 17


def read_safetensors(path):
    """Tensors (numpy float32) and the metadata of a safetensors file."""
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__", {})
    body = raw[8 + n :]
    dtypes = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "BF16": None}
    out = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        dt = dtypes[info["dtype"]]
        if dt is None:
            u16 = np.frombuffer(body[start:end], dtype=np.uint16)
            arr = (u16.astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(body[start:end], dtype=dt)
        out[name] = arr.reshape(info["shape"]).astype(np.float32) if dt is not np.int64 else arr.reshape(info["shape"])
    return out, meta


def same_padding(n, k, s):
    out = -(-n // s)
    total = max((out - 1) * s + k - n, 0)
    return total // 2, total - total // 2, out


class Graph:
    def __init__(self):
        self.nodes, self.inits, self.count = [], [], 0

    def name(self, prefix):
        self.count += 1
        return f"{prefix}_{self.count}"

    def const(self, array, prefix="c"):
        n = self.name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(array), n))
        return n

    def op(self, op_type, inputs, prefix=None, **attrs):
        out = self.name(prefix or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def conv(self, x, w, b, hw, stride, group=1):
        """TF-SAME convolution; `hw` is the input's (h, w); returns (output, (h, w))."""
        k = w.shape[2]
        pt, pb, ho = same_padding(hw[0], k, stride)
        pl, pr, wo = same_padding(hw[1], k, stride)
        y = self.op("Conv", [x, self.const(w, "w"), self.const(b, "b")], kernel_shape=[k, k], strides=[stride, stride], pads=[pt, pl, pb, pr], group=group)
        return y, (ho, wo)

    def relu6(self, x):
        return self.op("Clip", [x, self.const(np.float32(0.0)), self.const(np.float32(6.0))])

    def model(self, x_name, x_shape, outputs):
        graph = helper.make_graph(
            self.nodes,
            "shoplens",
            [helper.make_tensor_value_info(x_name, TensorProto.FLOAT, x_shape)],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, [f"{o}_d{i}" for i in range(rank)]) for o, rank in outputs],
            self.inits,
        )
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="shoplens-side-by-side")
        m.ir_version = 8
        onnx.checker.check_model(m)
        return m


def fold(t, conv, bn):
    w = t[f"{conv}.weight"]
    scale = t[f"{bn}.weight"] / np.sqrt(t[f"{bn}.running_var"] + BN_EPS)
    shift = t[f"{bn}.bias"] - t[f"{bn}.running_mean"] * scale
    return (w * scale[:, None, None, None]).astype(np.float32), shift.astype(np.float32)


def blocks_of(t):
    blocks, cin, stage, i = [], STEM, 0, 0
    while f"_blocks.{i}._depthwise_conv.weight" in t:
        hidden, _, k, _ = t[f"_blocks.{i}._depthwise_conv.weight"].shape
        cout = t[f"_blocks.{i}._project_conv.weight"].shape[0]
        first = i > 0 and cin != cout
        if first:
            stage += 1
        stride = STAGE_STRIDES[stage] if (i == 0 or first) else 1
        blocks.append(dict(cin=cin, cout=cout, expand=hidden // cin, k=k, stride=stride))
        cin = cout
        i += 1
    return blocks


def pyramid_taps(blocks):
    stride, taps = 2, []
    for i, b in enumerate(blocks):
        stride *= b["stride"]
        if stride >= 8 and (i + 1 == len(blocks) or blocks[i + 1]["stride"] > 1):
            taps.append(i)
    return taps


def backbone(g, t, x, size, taps=(), tuned=None):
    """Stem and blocks; returns (last output, its (h, w), [(tap output, (h, w))]).
    `tuned`: a detector file's fine-tuned blocks (`backbone.{i}.{expand,depthwise,project}`,
    BatchNorm already folded), which replace the ImageNet ones."""
    tuned = tuned or {}

    def layer(i, name, conv, bn):
        key = f"backbone.{i}.{name}"
        if f"{key}.weight" in tuned:
            return tuned[f"{key}.weight"], tuned[f"{key}.bias"]
        return fold(t, conv, bn)

    w, b = fold(t, "_conv_stem", "_bn0")
    y, hw = g.conv(x, w, b, (size, size), 2)
    y = g.relu6(y)
    levels = []
    for i, blk in enumerate(blocks_of(t)):
        p = f"_blocks.{i}."
        h, hhw = y, hw
        if blk["expand"] != 1:
            w, b = layer(i, "expand", p + "_expand_conv", p + "_bn0")
            h, hhw = g.conv(h, w, b, hhw, 1)
            h = g.relu6(h)
        w, b = layer(i, "depthwise", p + "_depthwise_conv", p + "_bn1")
        h, hhw = g.conv(h, w, b, hhw, blk["stride"], group=w.shape[0])
        h = g.relu6(h)
        w, b = layer(i, "project", p + "_project_conv", p + "_bn2")
        h, hhw = g.conv(h, w, b, hhw, 1)
        if blk["stride"] == 1 and blk["cin"] == blk["cout"]:
            h = g.op("Add", [h, y])
        y, hw = h, hhw
        if i in taps:
            levels.append((y, hw))
    return y, hw, levels


def head_features(g, t, y, hw):
    w, b = fold(t, "_conv_head", "_bn1")
    y, hw = g.conv(y, w, b, hw, 1)
    return g.relu6(y), hw


def backbone_model(backbone_path, size=224):
    """Input `[n, 3, size, size]` → the pooled 1280-d feature `[n, 1280]`."""
    t, _ = read_safetensors(backbone_path)
    g = Graph()
    y, hw, _ = backbone(g, t, "input", size)
    y, hw = head_features(g, t, y, hw)
    out = g.op("Flatten", [g.op("GlobalAveragePool", [y])], axis=1)
    return g.model("input", ["n", 3, size, size], [(out, 2)])


def embedder_model(embedder_path, backbone_path, size=224):
    """Input `[n, 3, size, size]` → unit embeddings `[n, dim]`."""
    t, _ = read_safetensors(backbone_path)
    head, meta = read_safetensors(embedder_path)
    parts = json.loads(meta["shoplens.config"]).get("parts") or []
    g = Graph()
    y, hw, _ = backbone(g, t, "input", size)
    y, hw = head_features(g, t, y, hw)
    p = head["gem.p"].reshape(())
    logs = g.op("Log", [g.op("Max", [y, g.const(np.float32(GEM_EPS))])])
    powered = g.op("Exp", [g.op("Mul", [logs, g.const(np.float32(p))])])
    pooled = g.op("GlobalAveragePool", [powered])
    gem = g.op("Exp", [g.op("Div", [g.op("Log", [pooled]), g.const(np.float32(p))])])
    flat = g.op("Flatten", [gem], axis=1)
    proj = g.op("Gemm", [flat, g.const(head["proj.weight"]), g.const(head["proj.bias"])], transB=1)
    if not parts:
        out = g.op("LpNormalization", [proj], axis=1, p=2)
    else:
        # Each part of the projection normalised on its own and weighted (`EmbeddingPart`).
        pieces, start = [], 0
        for part in parts:
            piece = g.op("Slice", [proj, g.const(np.array([start], np.int64)), g.const(np.array([start + part["len"]], np.int64)), g.const(np.array([1], np.int64))])
            pieces.append(g.op("Mul", [g.op("LpNormalization", [piece], axis=1, p=2), g.const(np.float32(part["weight"]))]))
            start += part["len"]
        out = g.op("Concat", pieces, axis=1)
    return g.model("input", ["n", 3, size, size], [(out, 2)])


def detector_model(detector_path, backbone_path):
    """Input `[n, 3, S, S]` → raw head outputs `[n, classes + 5, locations]` (the Rust
    `GarmentDetector::forward`)."""
    t, _ = read_safetensors(backbone_path)
    head, meta = read_safetensors(detector_path)
    cfg = json.loads(meta["shoplens.config"])
    if cfg.get("semantic_top"):
        raise SystemExit("semantic_top detectors are not translated")
    size, groups, channels = cfg["preprocess"]["size"], cfg["groups"], cfg["channels"]
    g = Graph()
    taps = pyramid_taps(blocks_of(t))
    _, _, levels = backbone(g, t, "input", size, taps, tuned=head)
    laterals = []
    for i, (x, hw) in enumerate(levels):
        y, _ = g.conv(x, head[f"fpn.lateral.{i}.weight"], head[f"fpn.lateral.{i}.bias"], hw, 1)
        laterals.append([y, hw])
    for i in range(len(laterals) - 2, -1, -1):
        (h, w), (h2, w2) = laterals[i][1], laterals[i + 1][1]
        # candle's upsample_nearest2d takes source index floor(dst · in / out).
        up = g.op(
            "Resize",
            [laterals[i + 1][0], "", g.const(np.array([1, 1, h / h2, w / w2], dtype=np.float32))],
            mode="nearest",
            coordinate_transformation_mode="asymmetric",
            nearest_mode="floor",
        )
        laterals[i][0] = g.op("Add", [laterals[i][0], up])
    k = head["output.weight"].shape[0] - 5
    outputs = []
    for level, (x, hw) in enumerate(laterals):
        for j in range(cfg["tower"]):
            y, _ = g.conv(x, head[f"tower.{j}.weight"], head[f"tower.{j}.bias"], hw, 1)
            grouped = g.op("Reshape", [y, g.const(np.array([0, groups, -1], dtype=np.int64))])
            normed = g.op("InstanceNormalization", [grouped, g.const(np.ones(groups, np.float32)), g.const(np.zeros(groups, np.float32))], epsilon=GN_EPS)
            normed = g.op("Reshape", [normed, g.const(np.array([0, channels, hw[0], hw[1]], dtype=np.int64))])
            gamma = g.const(head[f"tower.{j}.gn.weight"].reshape(1, channels, 1, 1))
            beta = g.const(head[f"tower.{j}.gn.bias"].reshape(1, channels, 1, 1))
            x = g.op("Relu", [g.op("Add", [g.op("Mul", [normed, gamma]), beta])])
        y, _ = g.conv(x, head["output.weight"], head["output.bias"], hw, 1)
        y = g.op("Reshape", [y, g.const(np.array([0, k + 5, hw[0] * hw[1]], dtype=np.int64))])
        cls = g.op("Slice", [y, g.const(np.array([0], np.int64)), g.const(np.array([k], np.int64)), g.const(np.array([1], np.int64))])
        dist = g.op("Slice", [y, g.const(np.array([k], np.int64)), g.const(np.array([k + 4], np.int64)), g.const(np.array([1], np.int64))])
        ctr = g.op("Slice", [y, g.const(np.array([k + 4], np.int64)), g.const(np.array([k + 5], np.int64)), g.const(np.array([1], np.int64))])
        scaled = g.op("Mul", [dist, g.const(np.float32(head["scales"][level]))])
        dist = g.op("Exp", [g.op("Clip", [scaled, g.const(np.float32(-MAX_LOG_DISTANCE)), g.const(np.float32(MAX_LOG_DISTANCE))])])
        outputs.append(g.op("Concat", [cls, dist, ctr], axis=1))
    out = g.op("Concat", outputs, axis=2)
    return g.model("input", ["n", 3, size, size], [(out, 3)])
