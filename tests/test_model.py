"""scViT: parameter count, shapes, padding, ablations, attention paths, init, intermediates."""

import json
import math

import pytest
import torch
from torch import nn

from scvit_core.config import ScViTConfig
from scvit_core.flops import forward_flops, total_forward_flops
from scvit_core.likelihood import nll
from scvit_core.model import Attention, Dropout, MatmulConv1d, PatchwiseLinear, ScViT


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def counts(cells: int, genes: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.poisson(torch.rand(cells, genes, generator=g) * 2.0, generator=g)


# parameter count of the paper preset, derived by hand from DESIGN.md section 2 -------------


def test_paper_parameter_count_matches_design():
    def mha(d):  # nn.MultiheadAttention: in_proj 3d x d + 3d bias, out_proj d x d + d
        return 3 * d * d + 3 * d + d * d + d

    def bn(c):  # BatchNorm1d: weight and bias (running stats are buffers)
        return 2 * c

    stem = 40 * 1 * 40 + bn(40) + (40 * 40 + 40)  # conv k=40 without bias, BN, 1x1 conv
    encoder = sum(
        [
            bn(40) + 40 * 1487 * 500 + bn(40) + mha(500),  # (40, 500, 1487, 4)
            bn(40) + 40 * 500 * 100 + bn(40) + mha(100),  # (40, 100, 500, 4)
            bn(40) + 40 * 100 * 20 + bn(40) + mha(20),  # (40, 20, 100, 4)
            bn(20) + 20 * 40 * 5 + bn(20) + mha(5),  # (20, 5, 40, 1)
        ]
    )
    ln = bn  # LayerNorm(d): weight and bias
    bottleneck = (
        (100 * 512 + 512 + ln(512)) + (512 * 256 + 256 + ln(256)) + (256 * 64 + 64 + ln(64))
    )
    decoder_dense = (
        (64 * 512 + 512 + bn(512))
        + (512 * 256 + 256 + bn(256))
        + (256 * 64 + 64 + bn(64))
        + (64 * 100 + 100 + bn(100))
    )
    decoder_stages = sum(
        [
            mha(5) + 20 * 5 * 40 + bn(20),  # mirror of (20, 5, 40, 1)
            mha(20) + 40 * 20 * 100 + bn(40),  # mirror of (40, 20, 100, 4)
            mha(100) + 40 * 100 * 500 + bn(40),  # mirror of (40, 100, 500, 4)
            mha(500),  # mirror of (40, 500, 1487, 4): no linear, the output layer follows
        ]
    )
    output = 40 * 500 * (3 * 1487)
    expected = stem + encoder + bottleneck + decoder_dense + decoder_stages + output
    assert expected == 125_611_052

    with torch.device("meta"):
        model = ScViT(ScViTConfig.paper())
    assert n_params(model) == expected


def test_paper_config():
    cfg = ScViTConfig.paper()
    assert cfg.n_genes == 59_480 and cfg.n_windows == 1487 and cfg.n_genes_padded == 59_480
    assert cfg.stages == ((40, 500, 1487, 4), (40, 100, 500, 4), (40, 20, 100, 4), (20, 5, 40, 1))
    assert cfg.likelihood == "legacy" and cfg.head == "legacy_thirds"
    assert not cfg.library_scaling
    assert ScViTConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_for_genes_keeps_structure():
    cfg = ScViTConfig.for_genes(4000)
    assert cfg.stages[0] == (40, 500, 100, 4) and cfg.stages[1:] == ScViTConfig.paper().stages[1:]
    odd = ScViTConfig.for_genes(4001)
    assert odd.n_windows == 101 and odd.n_genes_padded == 4040 and odd.stages[0][2] == 101
    big = ScViTConfig.for_genes(400, width=2.0)
    assert big.stages[0][1] == 1000 and big.encoder_dims == (1024, 512, 64)


def test_config_validation():
    with pytest.raises(ValueError, match="likelihood"):
        ScViTConfig.small(likelihood="poisson")
    with pytest.raises(ValueError, match="first stage"):
        ScViTConfig.small(64, stages=((8, 32, 7, 4),))
    with pytest.raises(ValueError, match="heads"):
        ScViTConfig.small(64, stages=((8, 30, 8, 4),))
    with pytest.raises(ValueError, match="library_scaling"):
        ScViTConfig.small(library_scaling=True)


# shapes, padding, gradients -----------------------------------------------------------------


@pytest.mark.parametrize("n_genes", [256, 250])
def test_small_forward_shapes(n_genes):
    torch.manual_seed(0)
    model = ScViT(ScViTConfig.small(n_genes))
    out = model(counts(6, n_genes))
    assert out.z.shape == (6, 8)
    for t in (out.mean, out.theta, out.gate_logits):
        assert t.shape == (6, n_genes) and torch.isfinite(t).all()


def test_for_genes_4000_forward():
    torch.manual_seed(0)
    model = ScViT(ScViTConfig.for_genes(4000)).eval()
    with torch.no_grad():
        out = model(counts(3, 4000))
    assert out.z.shape == (3, 64) and out.mean.shape == (3, 4000)


def test_padding_is_zero_and_dropped():
    cfg = ScViTConfig.small(250, stem_padding=0)
    model = ScViT(cfg).eval()
    x = counts(2, 250)
    assert cfg.n_genes_padded == 256
    padded = torch.cat([x, torch.zeros(2, 6)], 1)
    stem = model.stem(padded)
    torch.testing.assert_close(model.patchify(x), stem)
    assert model(x).mean.shape == (2, 250)
    with pytest.raises(ValueError, match="250"):
        model(counts(2, 256))


def test_reference_stem_padding_skips_last_genes():
    # torchvision's default padding (k - 1) // 2 = 3 for k = 8: the last 3 genes are never read
    model = ScViT(ScViTConfig.small(64)).eval()
    x = counts(2, 64)
    y = x.clone()
    y[:, -3:] += 5.0
    torch.testing.assert_close(model.patchify(x), model.patchify(y))
    y[:, -4] += 5.0
    assert not torch.allclose(model.patchify(x), model.patchify(y))


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = ScViT(ScViTConfig.small(128))
    x = counts(8, 128)
    nll(model(x), x, likelihood="legacy").mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name


ABLATIONS = {
    "no_attention": dict(attention=False),
    "no_conv_stem": dict(conv_stem=False),
    "shared_linear": dict(patchwise=False),
    "extra_convs": dict(extra_convs=2),
    "explicit_attention": dict(fused_attention=False),
    "per_token_head": dict(head="per_token"),
    "corrected": dict(likelihood="corrected"),
    "nb": dict(likelihood="nb"),
    "library_scaling": dict(likelihood="corrected", library_scaling=True),
}


@pytest.mark.parametrize("switches", ABLATIONS.values(), ids=ABLATIONS.keys())
def test_ablation_builds_and_trains(switches):
    torch.manual_seed(0)
    cfg = ScViTConfig.small(200, **switches)
    model = ScViT(cfg)
    x = counts(8, 200)
    out = model(x, library=x.sum(1))
    assert out.mean.shape == (8, 200)
    assert (out.gate_logits is None) == (cfg.likelihood == "nb")
    loss = model.loss(out, x)
    torch.testing.assert_close(loss, nll(out, x, likelihood=cfg.likelihood).mean())
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())


def test_ablations_change_the_architecture():
    base = n_params(ScViT(ScViTConfig.small(200)))
    assert n_params(ScViT(ScViTConfig.small(200, attention=False))) < base
    assert n_params(ScViT(ScViTConfig.small(200, extra_convs=1))) == base + 8 * 8 * 5 + 16
    assert not any(
        isinstance(m, PatchwiseLinear)
        for m in ScViT(ScViTConfig.small(200, patchwise=False)).modules()
    )
    assert not any(
        isinstance(m, nn.Conv1d) for m in ScViT(ScViTConfig.small(200, conv_stem=False)).modules()
    )


def test_bigger_model():
    torch.manual_seed(0)
    small, big = ScViTConfig.for_genes(200), ScViTConfig.for_genes(200, width=1.2)
    assert n_params(ScViT(big)) > n_params(ScViT(small))
    model = ScViT(big)
    x = counts(4, 200)
    nll(model(x), x, likelihood="legacy").mean().backward()


def test_no_conv_stem_reshapes_genes_into_tokens():
    model = ScViT(ScViTConfig.small(256, conv_stem=False))
    x = counts(2, 256)
    torch.testing.assert_close(model.patchify(x), x.view(2, 8, 32))


# heads -------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["legacy_thirds", "per_token"])
def test_head_layout(head):
    """Zero token 0 of the output layer and see which genes' parameters it produced."""
    cfg = ScViTConfig.small(256, head=head)
    model = ScViT(cfg).eval()
    with torch.no_grad():
        model.head.weight[0] = 0.0
        out = model(counts(2, 256))
    length = cfg.head_length  # 32 values per token and parameter; token 0 emits 3 * 32
    hit = out.gate_logits == -math.log(2.0)  # logsigmoid(0)
    if head == "per_token":  # genes 0..31 get all three parameters from token 0
        assert hit[:, :length].all() and not hit[:, length:].any()
        assert (out.mean[:, :length] == 1e-6).all()
    else:  # the first 96 flattened values are all means: genes 0..95, no gates
        assert not hit.any()
        assert (out.mean[:, : 3 * length] == 1e-6).all()


# attention ---------------------------------------------------------------------------------


def test_attention_matches_multihead_attention_parameters():
    ours = Attention(500, 4, dropout=0.5, fused=True)
    ref = nn.MultiheadAttention(500, 4, dropout=0.5, batch_first=True)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }
    assert n_params(ours) == n_params(ref) == 4 * 500 * 500 + 4 * 500


@pytest.mark.parametrize("dim,heads", [(500, 4), (20, 4), (5, 1)])
def test_fused_explicit_and_torch_attention_agree(dim, heads):
    torch.manual_seed(0)
    fused = Attention(dim, heads, dropout=0.5, fused=True).eval()
    explicit = Attention(dim, heads, dropout=0.5, fused=False).eval()
    ref = nn.MultiheadAttention(dim, heads, dropout=0.5, batch_first=True).eval()
    explicit.load_state_dict(fused.state_dict())
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(3, 40, dim)
    with torch.no_grad():
        a, b, c = fused(x), explicit(x), ref(x, x, x, need_weights=False)[0]
    assert (a - b).abs().max() <= 1e-5
    assert (a - c).abs().max() <= 1e-5


def test_fused_and_explicit_models_agree():
    torch.manual_seed(0)
    fused = ScViT(ScViTConfig.small(200)).eval()
    explicit = ScViT(ScViTConfig.small(200, fused_attention=False)).eval()
    explicit.load_state_dict(fused.state_dict())
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in explicit.named_parameters()]
    x = torch.log1p(counts(4, 200))
    with torch.no_grad():
        a, b = fused(x), explicit(x)
    for name in ("z", "mean", "theta", "gate_logits"):
        assert (getattr(a, name) - getattr(b, name)).abs().max() <= 1e-5, name


@pytest.mark.parametrize("p", [0.0, 0.2, 0.5])
def test_dropout_keeps_each_value_with_probability_one_minus_p(p):
    """The fast dropout is nn.Dropout's distribution: keep 1 - p, scale 1 / (1 - p)."""
    torch.manual_seed(0)
    drop = Dropout(p)
    x = torch.ones(400, 1000, requires_grad=True)
    out = drop(x)
    kept = out != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 0.005
    assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / (1 - p)))
    out.sum().backward()  # the gradient flows through the kept values only, scaled
    assert torch.equal(x.grad, out.detach())
    assert drop.eval()(x) is x  # identity in evaluation mode
    assert isinstance(drop, nn.Dropout) and drop.p == p


def test_training_attention_with_dropout_drops_weights():
    """While training, the fused attention with dropout takes the explicit path's Dropout."""
    torch.manual_seed(0)
    att = Attention(20, 4, dropout=0.5, fused=True)
    seen = []
    att.attn_drop.register_forward_hook(lambda mod, i, o: seen.append((o != 0).float().mean()))
    x = torch.randn(8, 10, 20)
    a, b = att(x), att(x)
    assert not torch.allclose(a, b)  # a new mask per call
    assert len(seen) == 2 and all(0.45 < s < 0.55 for s in seen)
    att.eval()
    assert torch.allclose(att(x), att(x))


def test_explicit_attention_uses_modules():
    att = Attention(20, 4, dropout=0.0, fused=False)
    seen = []
    for m in (att.qk, att.softmax, att.av):
        m.register_forward_hook(lambda mod, i, o: seen.append(type(mod).__name__))
    att(torch.randn(2, 5, 20))
    assert seen == ["MatMul", "Softmax", "MatMul"]


# init, intermediates, flops -----------------------------------------------------------------


def test_init():
    torch.manual_seed(0)
    model = ScViT(ScViTConfig.small(200, patchwise=True))
    gain = 3.0 / 4.0  # torch.nn.init.calculate_gain("selu")
    for name, m in model.named_modules():
        if type(m) is nn.Linear:
            assert m.weight.abs().max() <= gain * math.sqrt(3.0 / m.in_features), name
            assert torch.all(m.bias == 0), name
        elif isinstance(m, PatchwiseLinear):
            _, fan_in_a, fan_in_b = m.weight.shape  # kaiming_uniform_ on a 3-d tensor
            bound = gain * math.sqrt(3.0 / (fan_in_a * fan_in_b))
            assert m.weight.abs().max() <= bound, name
            assert m.weight.abs().max() > 0.9 * bound, name
        elif isinstance(m, Attention):
            assert torch.all(m.in_proj_bias == 0) and torch.all(m.out_proj.bias == 0)


def test_matmul_conv_matches_conv1d():
    torch.manual_seed(0)
    for c_in, c_out, k, stride, pad in [(1, 8, 8, 8, 3), (1, 8, 8, 8, 0), (4, 8, 1, 1, 0)]:
        ours = MatmulConv1d(c_in, c_out, k, stride=stride, padding=pad)
        ref = nn.Conv1d(c_in, c_out, k, stride=stride, padding=pad)
        ref.load_state_dict(ours.state_dict())
        x = torch.randn(3, c_in, 64)
        torch.testing.assert_close(ours(x), ref(x))


def test_forward_intermediates():
    torch.manual_seed(0)
    model = ScViT(ScViTConfig.small(200)).eval()
    x = counts(3, 200)
    with torch.no_grad():
        inter = model.forward_intermediates(x)
        out = model(x)
    expected = ["stem"]
    for i in range(4):
        expected += [f"encoder.{i}.linear", f"encoder.{i}.attention", f"encoder.{i}"]
    expected += ["bottleneck.0", "bottleneck.1", "bottleneck.2", "latent"]
    expected += [f"decoder.dense.{j}" for j in range(4)]
    for i in (3, 2, 1, 0):
        expected += [f"decoder.{i}.attention", f"decoder.{i}"]
    expected += ["head", "mean", "theta", "gate_logits"]
    assert list(inter) == expected
    assert inter["stem"].shape == (3, 8, 25)
    assert inter["encoder.3"].shape == (3, 4, 4)
    torch.testing.assert_close(inter["latent"], out.z)
    torch.testing.assert_close(inter["mean"], out.mean)


def test_flops():
    cfg = ScViTConfig.paper()
    rows = {r.name: r.flops for r in forward_flops(cfg)}
    assert rows["encoder.0.linear"] == 2 * 40 * 1487 * 500
    assert rows["head"] == 2 * 40 * 500 * 3 * 1487
    assert rows["encoder.0.attention.in_proj"] == 2 * 40 * 500 * 1500
    assert rows["encoder.0.attention.qk"] == 2 * 40 * 40 * 500
    assert total_forward_flops(cfg) == sum(rows.values())
    no_att = total_forward_flops(cfg.replace(attention=False))
    assert no_att < total_forward_flops(cfg)
