import subprocess
import sys
import textwrap

import pytest
import torch
from monai.networks.nets import BasicUNet, UNet, resnet18

from monai_qsa.networks import SAResNet, SAUNet, StandAloneSelfAttention
from monai_qsa.quantization import load_quantized, quantize_ptq, save_quantized
from monai_qsa.quantization.int8_conv3d import conv3d_int8_reference
from monai_qsa.utils.compile import compile_for_cpu, has_cpp_compiler, run_mode
from monai_qsa.utils.complexity import serialized_size


def _trained_saunet(dims: int = 2) -> tuple[SAUNet, list[dict]]:
    """A tiny SAUNet trained for a few steps to segment bright squares, and dict batches like a MONAI loader's."""
    torch.manual_seed(0)
    net = SAUNet(dims, 1, 2, features=(8, 16), num_heads=2, kernel_size=3)
    batches = []
    for _ in range(6):
        label = torch.zeros((4, 1) + (16,) * dims)
        label[(slice(None), slice(None)) + (slice(4, 11),) * dims] = 1
        batches.append({"image": label + 0.2 * torch.randn_like(label), "label": label})
    optimizer = torch.optim.Adam(net.parameters(), 1e-2)
    for batch in batches * 10:
        loss = torch.nn.functional.cross_entropy(net(batch["image"]), batch["label"][:, 0].long())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval(), batches


def _dice(logits: torch.Tensor, label: torch.Tensor) -> float:
    pred = logits.argmax(1, keepdim=True).float()
    return float(2 * (pred * label).sum() / (pred.sum() + label.sum()))


@pytest.fixture(scope="module")
def trained():
    return _trained_saunet()


@pytest.mark.parametrize("backend", ["x86_inductor", "x86_eager"])
def test_int8_metric_close_to_fp32(trained, backend):
    net, batches = trained
    qmodel = quantize_ptq(net, batches[:3], batches[0]["image"], backend=backend)
    held_out = batches[3:]
    with torch.no_grad():
        fp32 = sum(_dice(net(b["image"]), b["label"]) for b in held_out) / len(held_out)
        int8 = sum(_dice(qmodel(b["image"]), b["label"]) for b in held_out) / len(held_out)
        # batch size and image size may differ from the example input
        assert qmodel(torch.randn(1, 1, 20, 24)).shape == (1, 2, 20, 24)
    assert fp32 > 0.8
    assert abs(fp32 - int8) <= 0.01
    assert next(iter(net.parameters())).dtype == torch.float32  # the fp32 model is left as it was


def test_int8_convolutions_and_attention(trained):
    net, batches = trained
    eager = quantize_ptq(net, batches[:2], batches[0]["image"], backend="x86_eager")
    qkv = eager.encoder[0][0].attn.qkv
    assert "quantized" in type(qkv.module).__module__ and qkv.module.weight().dtype == torch.qint8
    assert eager.encoder[0][0].attn.rel_pos[0].dtype == torch.float32
    pt2e = quantize_ptq(net, batches[:2], batches[0]["image"])
    targets = [str(n.target) for n in pt2e.program.graph.nodes if n.op == "call_function"]
    assert sum("dequantize_per_channel" in t for t in targets) >= 8  # stem, 6 qkv projections, head
    # the projection and the attention core (logits, softmax, weighted sum) are one int8 node per SA layer, with
    # calibrated scales, reading the layer's input; without int8_attention the core is one fp32 node per SA layer
    layers = sum(isinstance(m, StandAloneSelfAttention) for m in net.modules())
    projected = torch.ops.monai_qsa.projected_local_attention_int8.default
    cores = [n for n in pt2e.program.graph.nodes if n.target == projected]
    assert len(cores) == layers
    assert all(isinstance(scale, float) and scale > 0 for core in cores for scale in core.args[-3:])  # q, k, v
    assert "monai_qsa.local_attention_int8.default" not in targets  # no attention left apart from its projection
    fp32_core = quantize_ptq(net, batches[:2], batches[0]["image"], int8_attention=False)
    cores = [n for n in fp32_core.program.graph.nodes if n.target == torch.ops.monai_qsa.local_attention.default]
    assert len(cores) == layers
    assert all(arg.meta["val"].dtype == torch.float32 for core in cores for arg in core.args[:2])  # projection, table
    # no fp32 copy of a quantized weight survives conversion
    assert not [name for name, _ in pt2e.named_parameters() if name.endswith("qkv.weight")]


def test_saved_artifact_loads_in_fresh_process(trained, tmp_path):
    net, batches = trained
    qmodel = quantize_ptq(net, batches[:2], batches[0]["image"])
    path = save_quantized(tmp_path / "model_int8.pt2", qmodel, batches[0]["image"], metadata={"labels": ["bg", "fg"]})
    x = batches[4]["image"]
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        expected = qmodel(x)
    script = textwrap.dedent(
        f"""
        import torch
        from monai_qsa.quantization import load_quantized
        model = load_quantized({str(path)!r})
        assert model.monai_qsa_metadata["labels"] == ["bg", "fg"], model.monai_qsa_metadata
        assert model.monai_qsa_metadata["backend"] == "x86_inductor"
        with torch.no_grad():
            torch.save(model(torch.load({str(tmp_path / "x.pt")!r})), {str(tmp_path / "y.pt")!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected)
    assert not list(tmp_path.glob("*.partial"))


def test_loaded_artifact_saves_again_unchanged(trained, tmp_path):
    """save_quantized encodes the program as it is (no second export): a loaded artifact saved again calls the same
    operators on the same tensors, and computes the same."""
    import json
    import zipfile

    net, batches = trained
    x = batches[0]["image"]
    first = save_quantized(tmp_path / "first.pt2", quantize_ptq(net, batches[:2], x), x)
    loaded = load_quantized(first)
    second = save_quantized(tmp_path / "second.pt2", loaded, x)
    with zipfile.ZipFile(first) as a, zipfile.ZipFile(second) as b:
        calls = [[node["target"] for node in json.loads(z.read("graph.json"))["nodes"]] for z in (a, b)]
        assert calls[0] == calls[1] and a.read("tensors.bin") == b.read("tensors.bin")
    with torch.no_grad():
        assert torch.equal(load_quantized(second)(x), loaded(x))


def test_artifact_size_of_default_saunet(tmp_path):
    net = SAUNet(spatial_dims=2, in_channels=1, out_channels=2).eval()  # default features 16-128
    x = torch.randn(2, 1, 32, 32)
    qmodel = quantize_ptq(net, [x], x)
    path = save_quantized(tmp_path / "model_int8.pt2", qmodel, x)
    assert serialized_size(path) <= 0.3 * serialized_size(net)
    # transposed convolutions (left fp32 by the quantiser) are stored as int8 too, without changing the output much
    assert not [name for name, _ in qmodel.named_parameters() if "upsample.weight" in name]
    with torch.no_grad():
        assert (qmodel(x) - net(x)).norm() / net(x).norm() < 0.1


def test_3d_convolutions_compute_in_int8(tmp_path, caplog):
    # the sa_seg3d network: X86InductorQuantizer leaves conv3d unannotated; with int8_conv3d, quantize_ptq swaps
    # each one for monai_qsa::conv3d_int8 (oneDNN, uint8 input calibrated in the graph); the artifact carries the
    # plain int8 weights
    net = SAUNet(
        spatial_dims=3, in_channels=1, out_channels=2, features=(8, 16, 32, 64), kernel_size=3, num_heads=2
    ).eval()
    x = torch.randn(2, 1, 16, 16, 16)
    with caplog.at_level("WARNING", logger="monai_qsa.quantization.ptq"):
        qmodel = quantize_ptq(net, [x], x, int8_conv3d=True)
    assert "computed in fp32" not in caplog.text
    targets = [node.target for node in qmodel.program.graph.nodes]
    assert torch.ops.monai_qsa.conv3d_int8.default in targets
    assert torch.ops.aten.conv3d.default not in targets
    assert not [name for name, p in qmodel.named_parameters() if p.dtype == torch.float32 and p.ndim == 5]
    path = save_quantized(tmp_path / "model_int8.pt2", qmodel, x)
    assert serialized_size(path) <= 0.35 * serialized_size(net)
    loaded = load_quantized(path)
    assert torch.ops.monai_qsa.conv3d_int8.default in [node.target for node in loaded.program.graph.nodes]
    with torch.no_grad():
        reference, int8 = net(x), qmodel(x)
        assert (int8 - reference).norm() / reference.norm() < 0.05
        torch.testing.assert_close(loaded(x), int8)
        eager = quantize_ptq(net, [x], x, backend="x86_eager")
        assert "quantized" in type(eager.encoder[0][0].attn.qkv.module).__module__
        assert (eager(x) - reference).norm() / reference.norm() < 0.1


def test_int8_3d_convolutions_compiled_under_inference_mode():
    # freezing under torch.inference_mode folds the weight scales into inference tensors, which keep no version
    # counter: the packed-weight cache must not ask them for one
    net = SAUNet(spatial_dims=3, in_channels=1, out_channels=2, features=(8, 8), kernel_size=3, num_heads=2).eval()
    x = torch.randn(1, 1, 8, 8, 8)
    qmodel = quantize_ptq(net, [x], x, int8_conv3d=True)
    compiled = compile_for_cpu(qmodel, freezing=True)
    with torch.inference_mode():
        out = compiled(x)
        torch.testing.assert_close(out, qmodel(x), rtol=1e-3, atol=1e-3)
    assert run_mode(compiled) == ("compiled" if has_cpp_compiler() else "eager")


def test_3d_convolutions_weight_only_by_default(caplog):
    # int8_conv3d=False by default: measured slower end to end (docs/quantization.md); the warning says so
    net = SAUNet(
        spatial_dims=3, in_channels=1, out_channels=2, features=(8, 8, 8, 8), kernel_size=3, num_heads=2
    ).eval()
    x = torch.randn(2, 1, 8, 8, 8)
    with caplog.at_level("WARNING", logger="monai_qsa.quantization.ptq"):
        qmodel = quantize_ptq(net, [x], x)
    assert "3D convolutions are stored in int8 but computed in fp32" in caplog.text
    assert torch.ops.monai_qsa.conv3d_int8.default not in [node.target for node in qmodel.program.graph.nodes]


@pytest.mark.parametrize(
    "kernel, stride, padding, dilation, zero_point",
    [
        (3, [1, 1, 1], [1, 1, 1], [1, 1, 1], 120),
        (3, [2, 1, 2], [0, 2, 1], [1, 2, 1], 0),
        (1, [1, 1, 1], [0, 0, 0], [1, 1, 1], 0),  # computed as a 2D convolution of the (D*H, W) plane
        (1, [1, 1, 1], [0, 0, 0], [2, 1, 1], 37),
        (1, [2, 2, 1], [0, 0, 0], [1, 1, 1], 0),  # strided: a 3D convolution
    ],
)
def test_conv3d_int8_matches_its_reference(kernel, stride, padding, dilation, zero_point):
    """oneDNN's int32 sums are exact; the fp32 reference sums the same exact products in another order."""
    x = torch.randint(0, 256, (2, 5, 7, 9, 8), dtype=torch.uint8)
    weight = torch.randint(-127, 128, (6, 5, kernel, kernel, kernel), dtype=torch.int8)
    weight_scale, bias = torch.rand(6) / 100 + 1e-3, torch.randn(6)
    args = (x, 0.02, zero_point, weight, weight_scale, bias, stride, padding, dilation)
    out = torch.ops.monai_qsa.conv3d_int8(*args)
    expected = conv3d_int8_reference(*args)
    assert out.shape == expected.shape and out.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(out, expected, atol=1e-4 * expected.abs().max().item(), rtol=0)


@pytest.mark.parametrize(
    "index, value, message",
    [
        (0, torch.zeros(1, 5, 4, 4, 4), "x must be a 5-D uint8 tensor"),
        (3, torch.zeros(6, 4, 3, 3, 3, dtype=torch.int8), "weight must be int8"),
        (4, torch.ones(5), "weight_scale must be fp32"),
        (5, torch.ones(7), "bias must be None or fp32"),
        (1, float("nan"), "x_scale must be positive"),
        (2, 256, "x_zero_point must be in"),
        (6, [0, 1, 1], "stride must be 3 integers"),
        (7, [1, 1], "padding must be 3 integers"),
    ],
)
def test_conv3d_int8_mismatched_arguments_are_a_value_error(index, value, message):
    """An artifact's graph chooses these arguments, and oneDNN trusts them."""
    args = [torch.zeros(1, 5, 4, 4, 4, dtype=torch.uint8), 0.1, 0, torch.zeros(6, 5, 3, 3, 3, dtype=torch.int8)]
    args += [torch.ones(6), None, [1, 1, 1], [1, 1, 1], [1, 1, 1]]
    args[index] = value
    with pytest.raises(ValueError, match=message):
        torch.ops.monai_qsa.conv3d_int8(*args)


def test_monai_cnn_and_classifier_quantize():
    cnn = BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=(4, 4, 8, 8, 16, 4)).eval()
    x = torch.randn(2, 1, 32, 32)
    q = quantize_ptq(cnn, [x, torch.randn_like(x)], x, backend="x86_eager")
    with torch.no_grad():
        relative_error = (q(x) - cnn(x)).norm() / cnn(x).norm()
    assert relative_error < 0.2  # untrained random weights: a sanity bound; garbage would be ~1
    assert sum("quantized" in type(m).__module__ for m in q.modules()) >= 10
    cls = SAResNet(3, 1, 3, layers=(1, 1), block_inplanes=(6, 12), num_heads=2, kernel_size=3).eval()
    v = torch.randn(2, 1, 16, 16, 16)
    q = quantize_ptq(cls, [v, v], v, backend="x86_eager")
    assert q(v).shape == (2, 3)


@pytest.mark.parametrize(
    "make_network",
    [
        lambda: resnet18(spatial_dims=2, n_input_channels=1, num_classes=3),  # shared self.act, out += residual
        lambda: UNet(
            2, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=2
        ),  # output_padding in its up-sampling
    ],
    ids=["resnet18", "UNet"],
)
def test_monai_networks_quantize_with_pt2e(make_network):
    """The CNN baselines of the benchmark go through the default backend with their convolutions in int8, and
    Inductor compiles the result."""
    network = make_network().eval()
    x = torch.randn(2, 1, 32, 32)
    q = quantize_ptq(network, [x, torch.randn_like(x)], x)
    compiled = compile_for_cpu(q, freezing=True)
    with torch.no_grad():
        relative_error = (q(x) - network(x)).norm() / network(x).norm()
        assert torch.allclose(compiled(x), q(x), atol=0.05)
    assert run_mode(compiled) == "compiled"
    assert relative_error < 0.2
    int8_convolutions = [
        n
        for n in q.program.graph.nodes
        if "dequantize" in str(n.target) and n.args and getattr(n.args[0], "op", "") == "get_attr"
    ]
    assert len(int8_convolutions) >= 5


def test_errors(tmp_path, trained):
    net, batches = trained
    with pytest.raises(ValueError, match="no batches"):
        quantize_ptq(net, [], batches[0]["image"], backend="x86_eager")
    with pytest.raises(ValueError, match="backend"):
        quantize_ptq(net, batches, batches[0]["image"], backend="fbgemm_magic")
    with pytest.raises(ValueError, match="'img'"):
        quantize_ptq(net, batches, batches[0]["image"], backend="x86_eager", image_key="img")

    class Unexportable(torch.nn.Module):
        def forward(self, x):
            return x * 2 if x.sum().item() > 0 else x  # data-dependent Python control flow

    with pytest.raises(ValueError, match="torch.export"):
        quantize_ptq(Unexportable(), [torch.randn(1, 1, 4, 4)], torch.randn(1, 1, 4, 4))
    with pytest.raises(FileNotFoundError, match="missing.pt2"):
        load_quantized(tmp_path / "missing.pt2")
    corrupt = tmp_path / "corrupt.pt2"
    corrupt.write_bytes(b"not a zip at all")
    with pytest.raises(ValueError, match="corrupt.pt2"):
        load_quantized(corrupt)
    eager = quantize_ptq(net, batches[:1], batches[0]["image"], backend="x86_eager")
    with pytest.raises(NotImplementedError, match="x86_eager"):
        save_quantized(tmp_path / "eager.pt2", eager, batches[0]["image"])
