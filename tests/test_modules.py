"""Interaction modules and the CTR model: hand-computed values, the equations of MODELS.md,
ML-DCN ≡ low-rank DCNv2 when the mask is 1, batch axis at B = 1, ONNX export."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from model.config import ARCHS, ModelConfig
from model.ctr import CTRModel, LogisticRegression, build_model
from model.modules import (
    MLP,
    CrossNet,
    LowRankCrossNet,
    LowRankMixtureCrossNet,
    MaskBlock,
    MaskedLowRankCrossNet,
    ParallelMaskNet,
    SerialMaskNet,
)

D = 7


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _x0(batch: int = 5, d: int = D) -> torch.Tensor:
    return torch.randn(batch, d, generator=torch.Generator().manual_seed(1))


def _ln(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


# --- hand-computed values ---------------------------------------------------------------------


def test_crossnet_hand_computed() -> None:
    net = CrossNet(in_features=2, num_layers=1)
    with torch.no_grad():
        net.kernels[0].weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        net.kernels[0].bias.copy_(torch.tensor([0.5, -0.5]))
    # W x0 + b = [5.5, 10.5]; x0 ⊙ that = [5.5, 21]; + x0 = [6.5, 23]
    out = net(torch.tensor([[1.0, 2.0]]))
    torch.testing.assert_close(out, torch.tensor([[6.5, 23.0]]))


def test_lowrank_crossnet_hand_computed() -> None:
    net = LowRankCrossNet(in_features=2, num_layers=2, rank=1)
    with torch.no_grad():
        for layer in range(2):
            net.down[layer].weight.copy_(torch.tensor([[1.0, 1.0]]))  # Vᵀ x = x1 + x2
            net.up[layer].weight.copy_(torch.tensor([[1.0], [0.0]]))  # U z = [z, 0]
            net.up[layer].bias.copy_(torch.tensor([0.0, 1.0]))
    # layer 1: z = 3, U z + b = [3, 1], x1 = [1, 2] ⊙ [3, 1] + [1, 2] = [4, 4]
    # layer 2: z = 8, U z + b = [8, 1], x2 = [1, 2] ⊙ [8, 1] + [4, 4] = [12, 6]
    out = net(torch.tensor([[1.0, 2.0]]))
    torch.testing.assert_close(out, torch.tensor([[12.0, 6.0]]))


def test_mask_block_hand_computed() -> None:
    block = MaskBlock(mask_input_dim=2, in_features=2, out_features=2, reduction_ratio=0.5)
    with torch.no_grad():
        block.mask_hidden.weight.copy_(torch.tensor([[1.0, 0.0]]))  # t = 1: a = ReLU(v1)
        block.mask_hidden.bias.zero_()
        block.mask_out.weight.copy_(torch.tensor([[1.0], [0.0]]))  # m = [a + 1, 1]
        block.projection.weight.copy_(torch.eye(2))
    # v = [2, 5]: m = [3, 1]; m ⊙ h = [3, -1] → LN gives [1, -1] (up to eps) → ReLU [1, 0]
    out = block(torch.tensor([[2.0, 5.0]]), torch.tensor([[1.0, -1.0]]))
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.0]]), atol=1e-5, rtol=0)


# --- the equations, computed independently from the modules' weights ---------------------------


def test_crossnet_matches_equation() -> None:
    net, x0 = CrossNet(D, 3), _x0()
    x = x0
    for k in net.kernels:
        x = x0 * (x @ k.weight.T + k.bias) + x
    torch.testing.assert_close(net(x0), x)


@pytest.mark.parametrize("use_c, g", [(False, "relu"), (True, "relu"), (True, "tanh")])
def test_lowrank_crossnet_matches_equation(use_c: bool, g: str) -> None:
    net, x0 = LowRankCrossNet(D, 2, rank=3, use_c=use_c, nonlinearity=g), _x0()
    act = torch.relu if g == "relu" else torch.tanh
    x = x0
    for layer in range(2):
        z = x @ net.down[layer].weight.T  # (B, r)
        if use_c:
            z = act(act(z) @ net.mids[layer][1].weight.T)
        x = x0 * (z @ net.up[layer].weight.T + net.up[layer].bias) + x
    torch.testing.assert_close(net(x0), x)


def test_mixture_crossnet_matches_equation() -> None:
    k, r = 3, 2
    net, x0 = LowRankMixtureCrossNet(D, 2, rank=r, num_experts=k, nonlinearity="tanh"), _x0()
    with torch.no_grad():
        for b in net.bias:
            b.normal_()  # non-zero shared bias
    x = x0
    for layer in range(2):
        gates = torch.softmax(x @ net.gates[layer].weight.T, dim=-1)  # (B, K)
        out = torch.zeros_like(x)
        for i in range(k):
            v_i = net.down[layer].weight[i * r : (i + 1) * r]  # (r, d) = V_iᵀ
            z = torch.tanh(torch.tanh(x @ v_i.T) @ net.c[layer][i])
            out = out + gates[:, i : i + 1] * x0 * (z @ net.u[layer][i] + net.bias[layer])
        x = out + x
    torch.testing.assert_close(net(x0), x)


def test_masknets_match_equations() -> None:
    x0 = _x0()
    serial = SerialMaskNet(D, num_blocks=2, block_dim=4, reduction_ratio=0.5)
    h = _ln(x0, serial.emb_norm)
    for block in serial.blocks:
        m = torch.relu(x0 @ block.mask_hidden.weight.T + block.mask_hidden.bias)
        m = m @ block.mask_out.weight.T + block.mask_out.bias
        h = torch.relu(_ln((m * h) @ block.projection.weight.T, block.norm))
    torch.testing.assert_close(serial(x0), h)

    parallel = ParallelMaskNet(D, num_blocks=3, block_dim=4)
    h0 = _ln(x0, parallel.emb_norm)
    expected = torch.cat([b(x0, h0) for b in parallel.blocks], dim=1)
    torch.testing.assert_close(parallel(x0), expected)
    assert [b.hidden_dim for b in parallel.blocks] == [1, 1, 1]  # round(0.2 · 7) = 1


def test_mldcn_matches_equation() -> None:
    net, x0 = MaskedLowRankCrossNet(D, 2, rank=3, mask_hidden=2), _x0()
    with torch.no_grad():  # a mask far from 1, so that it matters
        for layer in net.layers:
            layer.mask_out.weight.normal_()
    x = x0
    for index, layer in enumerate(net.layers):
        a = torch.relu(_ln(x0, net.mask_norms[0]) @ net.mask_w1[index].T + net.mask_b1[index])
        m = a @ layer.mask_out.weight.T + layer.mask_out.bias  # (B, r)
        z = m * (x @ layer.down.weight.T)
        x = x0 * (z @ layer.up.weight.T + layer.up.bias) + x
    torch.testing.assert_close(net(x0), x)


# --- ML-DCN with m ≡ 1 is low-rank DCNv2 -------------------------------------------------------


def _set_mask_to_one(net: MaskedLowRankCrossNet, activation: str) -> None:
    with torch.no_grad():
        for layer in net.layers:
            layer.mask_out.weight.zero_()
            layer.mask_out.bias.fill_(1.0 if activation == "linear" else 0.0)


@pytest.mark.parametrize(
    "position, source, activation",
    [
        ("rank", "x0", "linear"),
        ("rank", "xl", "linear"),
        ("input", "x0", "linear"),
        ("rank", "x0", "2sigmoid"),
        ("input", "xl", "2sigmoid"),
    ],
)
def test_mldcn_with_unit_mask_equals_lowrank_dcnv2(
    position: str, source: str, activation: str
) -> None:
    num_layers, rank = 3, 4
    dcn = LowRankCrossNet(D, num_layers, rank)
    mldcn = MaskedLowRankCrossNet(
        D,
        num_layers,
        rank,
        mask_hidden=3,
        mask_position=position,
        mask_source=source,
        mask_activation=activation,
    )
    with torch.no_grad():
        for layer, down, up in zip(mldcn.layers, dcn.down, dcn.up, strict=True):
            layer.down.weight.copy_(down.weight)
            layer.up.weight.copy_(up.weight)
            layer.up.bias.copy_(up.bias.normal_())
    _set_mask_to_one(mldcn, activation)
    x0 = _x0()
    out, masks = mldcn.forward_with_masks(x0)
    assert all(torch.equal(m, torch.ones_like(m)) for m in masks)
    torch.testing.assert_close(out, dcn(x0), atol=1e-6, rtol=0)


def test_mldcn_mixture_with_unit_mask_equals_dcn_mix() -> None:
    """Masked experts with m ≡ 1 are DCN-Mix with C = I and g = identity."""
    num_layers, rank, k = 2, 3, 4
    mix = LowRankMixtureCrossNet(D, num_layers, rank, num_experts=k, nonlinearity="identity")
    mldcn = MaskedLowRankCrossNet(D, num_layers, rank, mask_hidden=2, num_experts=k)
    with torch.no_grad():
        for index, layer in enumerate(mldcn.layers):
            mix.c[index].copy_(torch.eye(rank).expand(k, rank, rank))
            mix.bias[index].normal_()
            layer.down.weight.copy_(mix.down[index].weight)
            layer.u.copy_(mix.u[index])
            layer.bias.copy_(mix.bias[index])
            layer.gate.weight.copy_(mix.gates[index].weight)
    _set_mask_to_one(mldcn, "linear")
    x0 = _x0()
    torch.testing.assert_close(mldcn(x0), mix(x0), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "activation, start", [("linear", 1.0), ("2sigmoid", 1.0), ("sigmoid", 0.5)]
)
def test_mldcn_mask_starts_at_its_neutral_value(activation: str, start: float) -> None:
    net = MaskedLowRankCrossNet(64, 2, rank=16, mask_activation=activation)
    _, masks = net.forward_with_masks(torch.randn(32, 64))
    for m in masks:
        assert m.shape == (32, 16)
        assert (m - start).abs().max().item() < 0.05


def test_mldcn_ablations_change_shapes_not_interface() -> None:
    x0 = _x0(batch=1)
    net = MaskedLowRankCrossNet(
        D, 2, rank=3, mask_position="input", mask_source="xl", residual_layernorm=True
    )
    out, masks = net.forward_with_masks(x0)
    assert out.shape == (1, D) and [m.shape for m in masks] == [(1, D), (1, D)]
    assert len(net.mask_norms) == 2  # one LN(x_l) per layer
    mixture = MaskedLowRankCrossNet(D, 2, rank=3, num_experts=2)
    out, masks = mixture.forward_with_masks(x0)
    assert out.shape == (1, D) and masks[0].shape == (1, 6)  # K·r mask directions


def test_mldcn_residual_layernorm_normalises_each_layer() -> None:
    net = MaskedLowRankCrossNet(D, 2, rank=3, residual_layernorm=True)
    out = net(_x0() * 10)
    torch.testing.assert_close(out.mean(dim=1), torch.zeros(5), atol=1e-5, rtol=0)


# --- shapes, batch size 1, bad arguments ------------------------------------------------------

MODULES = {
    "crossnet": lambda: CrossNet(D, 2),
    "lowrank": lambda: LowRankCrossNet(D, 2, rank=3, use_c=True),
    "mixture": lambda: LowRankMixtureCrossNet(D, 2, rank=3, num_experts=2),
    "mldcn": lambda: MaskedLowRankCrossNet(D, 2, rank=3),
    "mldcn_mixture": lambda: MaskedLowRankCrossNet(
        D, 2, rank=3, num_experts=2, mask_source="xl", mask_activation="sigmoid"
    ),
    "serial_masknet": lambda: SerialMaskNet(D, 2, block_dim=5),
    "parallel_masknet": lambda: ParallelMaskNet(D, 2, block_dim=5),
    "mlp": lambda: MLP(D, [6, 5]),
}


@pytest.mark.parametrize("name", sorted(MODULES))
@pytest.mark.parametrize("batch", [1, 4])
def test_module_shapes(name: str, batch: int) -> None:
    module = MODULES[name]()
    out = module(_x0(batch))
    assert out.shape == (batch, module.output_dim)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "make",
    [
        lambda: CrossNet(0, 2),
        lambda: LowRankCrossNet(D, 2, rank=0),
        lambda: LowRankMixtureCrossNet(D, 2, rank=2, num_experts=0),
        lambda: LowRankCrossNet(D, 2, rank=2, use_c=True, nonlinearity="gelu"),
        lambda: MaskedLowRankCrossNet(D, 2, rank=2, mask_position="output"),
        lambda: MaskedLowRankCrossNet(D, 2, rank=2, mask_hidden=0),
        lambda: SerialMaskNet(D, 0, block_dim=4),
        lambda: MLP(D, [4, 0]),
    ],
)
def test_bad_arguments_raise_value_error(make) -> None:
    with pytest.raises(ValueError):
        make()


def _small_cfg(arch: str, **kw) -> ModelConfig:
    return ModelConfig(
        arch=arch, embed_dim=3, num_layers=2, rank=3, block_dim=4, mlp_dims=(6,), **kw
    )


@pytest.mark.parametrize("arch", [*ARCHS, "lr"])
@pytest.mark.parametrize("layout", [([4, 5, 6], 2), ([4, 5], 0), ([], 3)])
def test_ctr_model_returns_one_logit_per_example(arch: str, layout) -> None:
    cards, num_dense = layout
    model = build_model(_small_cfg(arch), cards, num_dense)
    for batch in (1, 3):
        ids = torch.randint(0, 4, (batch, len(cards)))
        dense = torch.randn(batch, num_dense)
        model.check_inputs(ids, dense)
        logits = model(ids, dense)
        assert logits.shape == (batch,) and logits.dtype == torch.float32


@pytest.mark.parametrize("structure", ["parallel", "stacked", "cross_only"])
def test_ctr_model_structures(structure: str) -> None:
    model = build_model(_small_cfg("dcnv2", structure=structure), [4, 5], 2)
    assert isinstance(model, CTRModel)
    head_in = {"parallel": 8 + 6, "stacked": 6, "cross_only": 8}[structure]
    assert model.head.in_features == head_in
    logits = model(torch.tensor([[1, 2]]), torch.zeros(1, 2))
    assert logits.shape == (1,)


def test_ctr_model_embeddings_and_x0() -> None:
    model = build_model(_small_cfg("mldcn"), [4, 5], 1)
    assert isinstance(model, CTRModel) and model.input_dim == 2 * 3 + 1
    assert model.embedding is not None
    weight = model.embedding.table.weight
    assert weight.shape == (9, 3) and weight.std().item() < 1e-3  # N(0, 1e-4)
    x0 = model.embed(torch.tensor([[3, 0]]), torch.tensor([[7.0]]))
    expected = torch.cat([weight[3], weight[4 + 0], torch.tensor([7.0])])  # field 2 offset by 4
    torch.testing.assert_close(x0, expected.unsqueeze(0))


def test_check_inputs_rejects_out_of_range_ids_and_bad_shapes() -> None:
    model = build_model(_small_cfg("dcnv2"), [4, 5], 1)
    with pytest.raises(ValueError, match=r"fields \[0\]"):
        model.check_inputs(torch.tensor([[4, 0]]), torch.zeros(1, 1))
    with pytest.raises(ValueError, match=r"fields \[1\]"):
        model.check_inputs(torch.tensor([[0, -1]]), torch.zeros(1, 1))
    with pytest.raises(ValueError, match="dense"):
        model.check_inputs(torch.tensor([[0, 0]]), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="batch size"):
        model.check_inputs(torch.tensor([[0, 0]]), torch.zeros(2, 1))


@pytest.mark.parametrize("layout", [([], 0), ([0, 3], 1), ([3], -1)])
def test_bad_layout_raises(layout) -> None:
    with pytest.raises(ValueError):
        build_model(_small_cfg("mldcn"), *layout)


def test_logistic_regression_is_linear_in_one_hot_features() -> None:
    model = build_model(ModelConfig(arch="lr"), [3, 2], 2)
    assert isinstance(model, LogisticRegression) and model.embedding is not None
    with torch.no_grad():
        model.embedding.table.weight.copy_(torch.arange(5.0).unsqueeze(1))  # ids 0..2 | 3..4
        model.dense.weight.copy_(torch.tensor([[10.0, 100.0]]))
        model.bias.fill_(0.5)
    logits = model(torch.tensor([[2, 1]]), torch.tensor([[1.0, 2.0]]))
    torch.testing.assert_close(logits, torch.tensor([0.5 + 2 + 4 + 10 + 200]))


# --- ONNX export ------------------------------------------------------------------------------


def _export(module: nn.Module, args: tuple[torch.Tensor, ...], names: list[str]) -> bytes:
    f = io.BytesIO()
    axes = {n: {0: "batch"} for n in [*names, "out"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(
            module.eval(),
            args,
            f,
            opset_version=17,
            dynamo=False,
            input_names=names,
            output_names=["out"],
            dynamic_axes=axes,
        )
    return f.getvalue()


def _check_onnx(blob: bytes, module: nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    onnx = pytest.importorskip("onnx")
    onnx.checker.check_model(onnx.load_from_string(blob))
    try:
        import onnxruntime as ort
    except ImportError:
        return
    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    with torch.no_grad():
        expected = module(*inputs.values())
    torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(set(MODULES) - {"mlp"}))
def test_interaction_module_exports_to_onnx(name: str) -> None:
    pytest.importorskip("onnx")
    module = MODULES[name]()
    blob = _export(module, (_x0(2),), ["x0"])
    _check_onnx(blob, module, {"x0": _x0(5)})  # another batch size: the batch axis is dynamic


@pytest.mark.parametrize("arch", [*ARCHS, "lr"])
@pytest.mark.parametrize("num_dense", [0, 2])
def test_ctr_model_exports_to_onnx(arch: str, num_dense: int) -> None:
    pytest.importorskip("onnx")
    model = build_model(_small_cfg(arch), [4, 5, 6], num_dense)
    ids, dense = torch.randint(0, 4, (2, 3)), torch.randn(2, num_dense)
    blob = _export(model, (ids, dense), ["cat_ids", "dense"])
    onnx = pytest.importorskip("onnx")
    graph_inputs = [i.name for i in onnx.load_from_string(blob).graph.input]
    assert graph_inputs == ["cat_ids", "dense"]  # kept even when F_num = 0
    _check_onnx(
        blob, model, {"cat_ids": torch.randint(0, 4, (1, 3)), "dense": torch.randn(1, num_dense)}
    )
