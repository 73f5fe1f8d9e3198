"""Attributions: the safe copy equals the fast path, its rules are exact, every method's
sanity figure passes on the safe path and the fast path's failure is detected."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from interpret.attribution import (
    METHODS,
    ClassifierTarget,
    LatentTarget,
    MeanTarget,
    attribute,
    method_agreement,
    prepare,
    randomisation_check,
    scvi_encoder,
)
from interpret.safe import (
    Product,
    ProductMatMul,
    Rescale,
    SafeLayerNorm,
    SafeLogSoftmax,
    SafeSoftmax,
    attribution_safe,
    deeplift_rules,
    layer_names,
    probe,
)
from scvit_core.config import ScViTConfig
from scvit_core.evaluate import fit_report_mlp
from scvit_core.model import Attention, ScViT

N_GENES = 256
BACKGROUND_METHODS = ("deepshap", "deepliftshap")


def log_counts(n: int, *, seed: int, n_genes: int = N_GENES) -> torch.Tensor:
    """``log1p`` of sparse Poisson-gamma counts ``(n, n_genes)``, like the model's inputs."""
    rng = np.random.default_rng(seed)
    rates = rng.gamma(0.3, 4.0, size=(n, n_genes))
    return torch.as_tensor(np.log1p(rng.poisson(rates)), dtype=torch.float32)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one thread is several times faster than two on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vit() -> ScViT:
    torch.manual_seed(0)
    return ScViT(ScViTConfig.small(N_GENES)).eval()


@pytest.fixture(scope="module")
def cells() -> torch.Tensor:
    return log_counts(3, seed=1)


@pytest.fixture(scope="module")
def background() -> torch.Tensor:
    return log_counts(4, seed=2)


@pytest.fixture(scope="module")
def latent_safe(vit) -> nn.Module:
    return prepare(LatentTarget(vit))


def baselines_for(method: str, background: torch.Tensor) -> torch.Tensor | None:
    return background if method in BACKGROUND_METHODS else None


# --------------------------------------------------------------------------------------------
# the safe copy is the same function
# --------------------------------------------------------------------------------------------

SWITCHES = [
    dict(likelihood="legacy"),
    dict(likelihood="corrected"),
    dict(likelihood="nb"),
    dict(likelihood="corrected", library_scaling=True),
    dict(attention=False),
    dict(conv_stem=False),
    dict(patchwise=False),
]


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: "-".join(map(str, s.values())))
def test_safe_copy_equals_fast_path(switches):
    torch.manual_seed(0)
    assert_safe_copy_equals_fast_path(ScViT(ScViTConfig.small(N_GENES, **switches)).eval())


PERCEIVER_SWITCHES = [
    dict(likelihood=likelihood, tokens=tokens, attention=attention)
    for likelihood in ("nb", "corrected", "legacy")
    for tokens in ("genes", "conv")
    for attention in (True, False)
] + [
    dict(likelihood="corrected", library_scaling=False),
    dict(likelihood="legacy", library_scaling=False),
    dict(norm="batch", variational=False),
    dict(fused_attention=True),  # the safe copy takes the explicit path of a fused model
    dict(encoder="mlp", decoder="mlp"),  # scVI's network shape (ablation)
    dict(encoder="mlp", decoder="mlp", norm="batch", dropout=0.1),  # scVI's networks exactly
    dict(encoder="mlp", likelihood="corrected"),
    dict(decoder="mlp", variational=False),
]


@pytest.mark.parametrize(
    "switches", PERCEIVER_SWITCHES, ids=lambda s: "-".join(map(str, s.values()))
)
def test_perceiver_safe_copy_equals_fast_path(switches, make_perceiver):
    model = make_perceiver(**switches)
    safe = assert_safe_copy_equals_fast_path(model)
    # every nonlinearity and product of two cell-dependent tensors has its rule module
    left = {type(m).__name__ for m in safe.modules()} & {"Softmax", "Mul", "MatMul", "GELU"}
    assert not left
    if model.config.decoder == "attention":
        readout = safe.readout.mixing.softmax
        assert isinstance(readout, SafeSoftmax) and readout.dim == 1  # over the m tokens
        assert all(isinstance(m, Product) for m in safe.readout.weigh)


def assert_safe_copy_equals_fast_path(model: nn.Module) -> nn.Module:
    """The safe copy (with a probe on every layer) computes what ``model`` does; returns it."""
    fused = [m.fused for m in model.modules() if isinstance(m, Attention)]
    norms = sum(type(m) is nn.LayerNorm for m in model.modules())
    safe = attribution_safe(model)
    for name in layer_names(safe):  # probes must not change anything either
        probe(safe, name)
    x = log_counts(5, seed=3, n_genes=model.config.n_genes)
    library = torch.linspace(500.0, 5000.0, 5)
    with torch.no_grad():
        fast_layers = model.forward_intermediates(x, library=library)
        safe_layers = safe.forward_intermediates(x, library=library)
        fast_out, safe_out = model(x, library=library), safe(x, library=library)
    assert fast_layers.keys() == safe_layers.keys()
    for key, value in fast_layers.items():
        # float32 rounding of the rule modules' reordered sums (the safe LayerNorm and softmax)
        torch.testing.assert_close(safe_layers[key], value, atol=5e-5, rtol=5e-5, msg=key)
    for key in ("z", "mean", "theta", "gate_logits"):
        a, b = getattr(fast_out, key), getattr(safe_out, key)
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(b, a, atol=5e-5, rtol=5e-5, msg=key)
    # the user's model is untouched: its attention paths as they were, still nn.LayerNorm
    assert [m.fused for m in model.modules() if isinstance(m, Attention)] == fused
    assert sum(type(m) is nn.LayerNorm for m in model.modules()) == norms
    assert not any(type(m) is nn.LayerNorm for m in safe.modules())
    return safe


# --------------------------------------------------------------------------------------------
# the rules are exact
# --------------------------------------------------------------------------------------------


def completeness_gap(module: nn.Module, *pairs: tuple[torch.Tensor, torch.Tensor]) -> float:
    """|sum_i m_i Δx_i - w·Δy| relative to |w·Δy|, for a random linear readout w of the output."""
    joint = [torch.cat([x, r]).requires_grad_() for x, r in pairs]
    with deeplift_rules(module):
        y = module(*joint)
    y_in, y_ref = y.chunk(2)
    w = torch.randn_like(y_in)
    (torch.cat([w, w]) * y).sum().backward()  # both halves carry the same multipliers
    lhs = sum((j.grad.chunk(2)[0] * (x - r)).sum() for j, (x, r) in zip(joint, pairs, strict=True))
    y_in, y_ref = y_in.detach(), y_ref.detach()
    rhs = (w * (y_in - y_ref)).sum()
    return float((lhs - rhs).abs() / rhs.abs())


@pytest.mark.parametrize(
    "module, shapes",
    [
        (SafeSoftmax(-1), [(3, 4, 7)]),
        (SafeSoftmax(1), [(3, 4, 7)]),
        (SafeLogSoftmax(-1), [(3, 7)]),
        (SafeLayerNorm((6,)), [(3, 6)]),
        (Product(), [(3, 5), (3, 1)]),
        (ProductMatMul(), [(3, 2, 4, 5), (3, 2, 5, 4)]),
        (Rescale(torch.nn.functional.selu), [(3, 9)]),
    ],
    ids=["softmax", "softmax_dim1", "log_softmax", "layer_norm", "product", "matmul", "selu"],
)
def test_rules_are_complete_on_random_pairs(module, shapes):
    torch.manual_seed(0)
    module = module.double()
    pairs = [(3 * torch.randn(s).double(), 3 * torch.randn(s).double()) for s in shapes]
    assert completeness_gap(module, *pairs) < 1e-10


@pytest.mark.parametrize("gap", [30.0, 200.0, 1000.0])
@pytest.mark.parametrize(
    "module",
    [SafeSoftmax(-1), SafeLogSoftmax(-1), SafeSoftmax(1)],
    ids=["sm", "log_sm", "sm_dim1"],
)
def test_softmax_rules_stay_exact_and_bounded_in_float32_for_sharp_scores(module, gap):
    # trained attention can be sharp: score gaps of hundreds between a cell and its reference
    torch.manual_seed(0)
    x, r = torch.randn(4, 3, 40), torch.randn(4, 3, 40)
    if module.dim == 1:  # normalised over the middle axis: put the gaps there
        x, r = x.transpose(1, 2).contiguous(), r.transpose(1, 2).contiguous()
        x[:, 3] += gap
        r[:, 11] -= gap / 2
    else:
        x[..., 3] += gap
        r[..., 11] -= gap / 2
    assert completeness_gap(module, (x, r)) < 1e-4
    joint = torch.cat([x, r]).requires_grad_()
    with deeplift_rules(module):
        y = module(joint)
    y.sum().backward()
    assert torch.isfinite(joint.grad).all()
    if isinstance(module, SafeLogSoftmax):
        assert joint.grad.abs().max() <= 2 * 40  # |1 - 40 w| with weights in [0, 1]
    else:
        assert joint.grad.abs().max() <= 2  # no exp(gap)-sized terms that cancel


def test_rescale_uses_the_derivative_where_input_equals_reference():
    x = torch.tensor([[-1.0, 0.5, 2.0]], dtype=torch.float64)
    joint = torch.cat([x, x]).requires_grad_()
    module = Rescale(torch.nn.functional.selu)
    with deeplift_rules(module):
        module(joint).sum().backward()
    expected = torch.autograd.functional.jacobian(torch.nn.functional.selu, x[0]).diagonal()
    torch.testing.assert_close(joint.grad[0], expected)
    assert torch.isfinite(joint.grad).all()


def test_linear_toy_model_has_closed_form_attributions():
    torch.manual_seed(0)
    toy = nn.Linear(5, 3)
    x, background = torch.randn(4, 5), torch.randn(6, 5)
    w = toy.weight.detach()[2]
    expected_zero_ref = (w * x).numpy()  # DeepLift = IG = w (x - 0) for a linear map
    expected_background = (w * (x - background.mean(0))).numpy()  # DeepSHAP, DeepLiftShap
    for method in ("deeplift", "integrated_gradients"):
        result = attribute(toy, x, method=method, target=2)
        np.testing.assert_allclose(result.attributions, expected_zero_ref, atol=1e-5)
        assert result.sanity.passed
    for method in BACKGROUND_METHODS:
        result = attribute(toy, x, method=method, target=2, baselines=background)
        np.testing.assert_allclose(result.attributions, expected_background, atol=1e-5)
        assert result.sanity.passed


# --------------------------------------------------------------------------------------------
# sanity figures: within tolerance on the safe path, failure detected on the fast path
# --------------------------------------------------------------------------------------------

LATENT_LAYERS = [None, "stem", "encoder.1.attention", "encoder.1", "bottleneck.1"]


@pytest.mark.parametrize("method", METHODS)
def test_sanity_within_tolerance_on_safe_path(method, latent_safe, vit, cells, background):
    refs = baselines_for(method, background)
    targets = [(latent_safe, layer, 1) for layer in LATENT_LAYERS]
    targets.append((prepare(MeanTarget(vit, [0, 5, 17])), "head", 2))
    for model, layer, target in targets:
        if layer is None and method in ("conductance", "internal_influence"):
            continue
        result = attribute(model, cells, method=method, layer=layer, target=target, baselines=refs)
        s = result.sanity
        assert result.attributions.shape[0] == len(cells)
        if method == "internal_influence":
            assert s.passed is None and np.isnan(s.relative) and s.name == "not applicable"
        else:
            assert s.passed, f"{method} on {layer}: relative error {s.relative:.2e}"
            if method in ("deepshap", "deeplift", "deepliftshap"):
                assert s.relative < 1e-4  # float32 rounding only


def test_library_scaled_mean_with_library_argument(cells, background):
    torch.manual_seed(0)
    config = ScViTConfig.small(N_GENES, likelihood="corrected", library_scaling=True)
    model = prepare(MeanTarget(ScViT(config).eval(), [3, 40]))
    library = torch.tensor([800.0, 2000.0, 5000.0])
    for method in ("deepshap", "deeplift", "integrated_gradients"):
        result = attribute(
            model,
            cells,
            method=method,
            layer="encoder.0",
            target=[0, 1, 0],
            baselines=baselines_for(method, background),
            additional_forward_args=(library,),
        )
        assert result.sanity.passed, (method, result.sanity.relative)


@pytest.mark.parametrize("method", ["deepshap", "deeplift"])
def test_fast_path_failure_is_detected(method, vit, cells, background):
    fast = prepare(LatentTarget(vit), safe=False)
    refs = baselines_for(method, background)
    # shap names the module it does not know; Captum passes the gradient through silently
    warns = pytest.warns(UserWarning, match="unrecognized nn.Module: LayerNorm")
    with warns if method == "deepshap" else nullcontext():
        result = attribute(fast, cells, method=method, layer="stem", target=1, baselines=refs)
    assert result.sanity.passed is False
    assert result.sanity.relative > 0.1  # measured 0.5 to 1: the error is of the signal's size
    assert not result.safe


def test_shap_table_is_restored(latent_safe, cells, background):
    from shap.explainers._deep import deep_pytorch

    before = dict(deep_pytorch.op_handler)
    attribute(latent_safe, cells[:1], method="deepshap", layer="stem", baselines=background)
    assert deep_pytorch.op_handler == before


# --------------------------------------------------------------------------------------------
# the residual: skip and attention share the residual sum's attribution exactly
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["deeplift", "deepshap", "deepliftshap", "conductance"])
def test_skip_and_attention_sum_to_residual(method, latent_safe, cells, background):
    refs = baselines_for(method, background)
    branch = attribute(
        latent_safe, cells, method=method, layer="encoder.1.attention", target=1, baselines=refs
    )
    residual = attribute(
        latent_safe, cells, method=method, layer="encoder.1.residual", target=1, baselines=refs
    )
    skip = branch.extra["complement"]
    assert skip["layer"] == "encoder.1.skip"
    total = branch.attributions + skip["attributions"].reshape(len(cells), -1)
    scale = np.abs(residual.attributions).max()
    np.testing.assert_allclose(total, residual.attributions, atol=1e-4 * scale)


# --------------------------------------------------------------------------------------------
# scPerceiver: the same guarantees through the same interface
# --------------------------------------------------------------------------------------------

PERCEIVER_GENES = 48


@pytest.mark.parametrize(
    "switches", PERCEIVER_SWITCHES, ids=lambda s: "-".join(map(str, s.values()))
)
def test_perceiver_rules_are_exact_in_float64(switches, make_perceiver):
    # the whole network: every multiplier exact, so completeness holds to float64 rounding
    net = make_perceiver(**switches)
    x = log_counts(3, seed=1, n_genes=PERCEIVER_GENES).double()
    r = log_counts(3, seed=2, n_genes=PERCEIVER_GENES).double()
    library = torch.tensor([300.0, 800.0, 2000.0], dtype=torch.float64)
    torch.manual_seed(0)  # the random readout of completeness_gap
    latent = prepare(LatentTarget(net)).double()
    assert completeness_gap(latent, (x, r)) < 1e-9
    mean = prepare(MeanTarget(net, [0, 5, 17])).double()
    scaled = [(library, library)] if net.config.library_scaling else []  # else unused
    assert completeness_gap(mean, (x, r), *scaled) < 1e-9


@pytest.mark.parametrize("method", ["deeplift", "deepshap", "deepliftshap"])
@pytest.mark.parametrize(
    "switches",
    [
        dict(),
        dict(tokens="conv", likelihood="corrected"),
        dict(attention=False),
        dict(likelihood="legacy", library_scaling=False),
    ],
    ids=["genes", "conv-corrected", "no-attention", "legacy-softplus"],
)
def test_perceiver_sanity_within_tolerance_on_safe_path(method, switches, make_perceiver):
    net = make_perceiver(**switches)
    cells = log_counts(3, seed=1, n_genes=PERCEIVER_GENES)
    refs = baselines_for(method, log_counts(4, seed=2, n_genes=PERCEIVER_GENES))
    library = torch.tensor([300.0, 800.0, 2000.0])
    with torch.no_grad():  # genes whose mean is not clamped (legacy: clamp(relu))
        genes = net(cells, library=library).mean.mean(0).argsort(descending=True)[:3]
    latent, mean = prepare(LatentTarget(net)), prepare(MeanTarget(net, genes.tolist()))
    latent_layers = [None, "tokens", "encoder.0.attention", "encoder.0", "posterior"]
    runs = [(latent, layer, 1, None) for layer in latent_layers]
    runs += [
        (mean, layer, 2, (library,))
        for layer in (None, "decoder.tokens", "decoder.0.attention", "decoder.0")
    ]
    for model, layer, target, args in runs:
        result = attribute(
            model,
            cells,
            method=method,
            layer=layer,
            target=target,
            baselines=refs,
            additional_forward_args=args,
        )
        s = result.sanity
        assert s.passed and s.relative < 1e-4, f"{method} on {layer}: {s.relative:.2e}"
        if layer is not None and layer.endswith(".attention"):  # checked with its skip branch
            assert result.extra["complement"]["layer"] == layer.replace("attention", "skip")


def test_perceiver_layer_names_and_classifier_target(make_perceiver):
    net = make_perceiver()
    assert layer_names(LatentTarget(net)) == [
        "tokens",
        "encoder.0.skip",
        "encoder.0.attention",
        "encoder.0.residual",
        "encoder.0",
        "encoder_norm",
        "posterior",
        "decoder.tokens",
        "decoder.0.skip",
        "decoder.0.attention",
        "decoder.0.residual",
        "decoder.0",
    ]
    cells = log_counts(40, seed=4, n_genes=PERCEIVER_GENES)
    with torch.no_grad():
        z = net.encode(cells).numpy()
    mlp = fit_report_mlp(z, np.arange(40) % 3, epochs=2)
    model = prepare(ClassifierTarget(net, mlp))
    result = attribute(model, cells[:3], method="deeplift", layer="encoder.0", target=None)
    assert result.sanity.passed and result.shape == (4, 16)


# --------------------------------------------------------------------------------------------
# targets, tables, comparisons
# --------------------------------------------------------------------------------------------


def test_classifier_target_explains_predicted_class(vit, cells):
    with torch.no_grad():
        z = vit.encode(log_counts(40, seed=4)).numpy()
    mlp = fit_report_mlp(z, np.arange(40) % 3, epochs=2)
    model = prepare(ClassifierTarget(vit, mlp))
    result = attribute(model, cells, method="deeplift", layer="bottleneck.2", target=None)
    with torch.no_grad():
        predicted = model(cells).argmax(1).numpy()
    np.testing.assert_array_equal(result.target, predicted)
    assert result.sanity.passed  # the MLP's LayerNorm and LeakyReLU are safe too


def test_tables(latent_safe, cells):
    result = attribute(latent_safe, cells, method="deeplift", layer="encoder.1")
    frame = result.to_frame()
    tokens, dim = result.shape
    assert len(frame) == len(cells) * tokens * dim
    assert {"method", "layer", "cell", "unit", "attribution", "token", "dim"} <= set(frame)
    genes = attribute(latent_safe, cells, method="deeplift")
    adata = genes.to_anndata([f"g{i}" for i in range(N_GENES)])
    assert adata.shape == (len(cells), N_GENES)
    np.testing.assert_allclose(adata.X, genes.attributions)
    assert adata.uns["attribution"]["sanity"]["passed"] is True


def test_method_agreement_is_a_rank_correlation(latent_safe, cells, background):
    results = [
        attribute(
            latent_safe,
            cells,
            method=m,
            layer="encoder.2",
            baselines=baselines_for(m, background),
        )
        for m in ("deeplift", "deepliftshap", "integrated_gradients", "internal_influence")
    ]
    table = method_agreement(results)
    assert len(table) == 6
    values = table[["spearman_cells", "spearman_units"]].to_numpy()
    assert np.all((values >= -1) & (values <= 1))
    assert isinstance(table, pd.DataFrame)


def test_randomisation_changes_attributions(vit, cells):
    table = randomisation_check(
        LatentTarget(vit), cells, method="deeplift", layer="encoder.1", target=1
    )
    rows = table.set_index("randomised")
    assert rows.loc["none (rerun)", "spearman_cells"] == pytest.approx(1.0)
    assert rows.loc["all", "spearman_cells"] < 0.5


def test_scvi_encoder_matches_scvi_latent(tiny_scvi):
    model, counts = tiny_scvi
    encoder = scvi_encoder(model).eval()
    with torch.no_grad():
        ours = encoder(torch.as_tensor(counts)).numpy()
    np.testing.assert_allclose(ours, model.get_latent_representation(), atol=1e-5)
    result = attribute(encoder, counts[:4], method="deeplift", target=0)
    assert result.sanity.passed and result.safe


def test_layer_the_target_does_not_run_is_an_error(latent_safe, cells):
    with pytest.raises(ValueError, match="does not run"):
        attribute(latent_safe, cells, method="deeplift", layer="head")
