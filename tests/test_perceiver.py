"""scPerceiver: the factorised gene attention is exact attention, every ablation builds and
trains, the same network in training and evaluation, and the API, runner pieces and scVI's
posterior-mean reading that the comparison relies on."""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import pytest
import torch

import scvit_core as sc
from scvit_core import _constants as K
from scvit_core import baselines as B
from scvit_core.api import ScPerceiverModel, ScViTModel, perceiver_epochs
from scvit_core.architectures import build_network, config_from_dict
from scvit_core.data import stratified_subsample
from scvit_core.experiments import ExperimentSpec, training_epochs
from scvit_core.likelihood import nll
from scvit_core.perceiver import PerceiverConfig, ScPerceiver

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

TINY = dict(dim=16, n_tokens=4, heads=2, encoder_blocks=1, decoder_blocks=1)

ABLATIONS = {
    "default": {},
    "no library scaling": {"library_scaling": False},
    "conv tokens": {"tokens": "conv", "patch_size": 8, "conv_channels": 4},
    "batchnorm + dropout": {"norm": "batch", "dropout": 0.5},
    "legacy likelihood": {"likelihood": "legacy"},
    "zinb": {"likelihood": "corrected"},
    "no attention": {"attention": False},
    "deterministic": {"variational": False},
    "gene-wise dispersion": {"dispersion": "gene"},
    "gene-cell dispersion": {"dispersion": "gene-cell"},
    "no input masking": {"input_masking": 0.0},
    "untied gene tables": {"tie_genes": False},
    "tied gene tables, zinb": {"tie_genes": True, "likelihood": "corrected"},
    "mlp encoder and decoder": {"encoder": "mlp", "decoder": "mlp"},
    "mlp as scVI's": {"encoder": "mlp", "decoder": "mlp", "norm": "batch", "dropout": 0.1},
    "mlp encoder, masked input": {"encoder": "mlp", "input_masking": 0.3},
    "mlp decoder, zinb, deterministic": {
        "decoder": "mlp",
        "likelihood": "corrected",
        "variational": False,
    },
}


def counts(n=12, g=48, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.poisson(torch.rand(n, g, generator=gen) * 6)


@pytest.fixture(scope="module")
def zeisel():
    adata = sc.load_dataset("zeisel2015")
    return adata[stratified_subsample(adata.obs["cell_type"], 300, seed=0)].copy()


def test_gene_attention_equals_attention_over_materialised_tokens():
    """The factorised cross-attention is softmax(q K^T / sqrt d) V over t_g = v_g E_g + F_g."""
    torch.manual_seed(0)
    net = ScPerceiver(PerceiverConfig.for_genes(48, **TINY)).eval()
    enc = net.tokenizer
    with torch.no_grad():
        enc.queries.normal_(std=1.0)  # sharp, non-uniform attention
        enc.expression.normal_(std=1.0)
    v = torch.log1p(counts())
    tokens = v[:, :, None] * enc.expression + enc.identity  # (B, G, d)
    q = enc.q(enc.query_norm(enc.queries))  # (m, d)
    k, val = enc.k(tokens), enc.v(tokens)  # (B, G, d)
    w = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)  # (B, m, G)
    expected = enc.queries + enc.out_proj(w @ val)
    with torch.no_grad():
        torch.testing.assert_close(enc(v), expected, rtol=1e-4, atol=1e-5)
        assert w.max() > 0.05  # the check is not about uniform weights


def test_hidden_genes_are_mask_tokens_in_the_factorised_attention():
    """Input masking: a hidden gene's token is ``F_g + M`` (the mask token), not ``0 E_g + F_g``."""
    torch.manual_seed(0)
    net = ScPerceiver(PerceiverConfig.for_genes(48, **TINY, input_masking=0.3)).eval()
    enc = net.tokenizer
    with torch.no_grad():
        enc.mask_token.normal_(std=1.0)
    v = torch.log1p(counts()) + 1.0  # no true zeros: a hidden gene differs from a zero count
    hidden = torch.rand(v.shape, generator=torch.Generator().manual_seed(1)) < 0.3
    tokens = (v * ~hidden)[:, :, None] * enc.expression + enc.identity
    tokens = tokens + hidden[:, :, None] * enc.mask_token
    q = enc.q(enc.query_norm(enc.queries))
    w = torch.softmax(q @ enc.k(tokens).transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
    expected = enc.queries + enc.out_proj(w @ enc.v(tokens))
    with torch.no_grad():
        torch.testing.assert_close(enc(v, hidden), expected, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(enc(v, hidden), enc(v * ~hidden), atol=1e-3)


def test_readout_equals_per_gene_attention():
    torch.manual_seed(1)
    net = ScPerceiver(PerceiverConfig.for_genes(48, **TINY)).eval()
    ro = net.readout
    tokens = torch.randn(5, 4, 16)
    x = ro.norm(tokens)
    q = ro.q(ro.gene_queries)  # (G, d)
    w = torch.softmax(torch.einsum("gd,bjd->bgj", q, ro.k(x)) / 4.0, dim=-1)  # over tokens
    per_gene = torch.einsum("bgj,bjd->bgd", w, ro.v(x))  # (B, G, d)
    expected = (per_gene * ro.readout[0]).sum(-1) + ro.bias[0]
    with torch.no_grad():
        torch.testing.assert_close(ro(tokens)[0], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_every_ablation_builds_trains_and_round_trips(name):
    config = PerceiverConfig.for_genes(48, **TINY, **ABLATIONS[name])
    assert config_from_dict(config.to_dict()) == config
    torch.manual_seed(0)
    net = build_network(config.to_dict())
    x = counts()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        out = net(torch.log1p(x), library=x.sum(1))
        assert out.mean.shape == (12, 48) and out.z.shape == (12, config.n_latent)
        assert (out.kl is None) == (not config.variational)
        loss = nll(out, x, likelihood=config.likelihood).mean()
        if out.kl is not None:
            loss = loss + out.kl.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


def test_library_scaled_mean_sums_to_the_library():
    net = ScPerceiver(PerceiverConfig.for_genes(48, **TINY)).eval()
    x = counts()
    with torch.no_grad():
        out = net(torch.log1p(x), library=x.sum(1))
    torch.testing.assert_close(out.mean.sum(1), x.sum(1), rtol=1e-4, atol=1e-3)


def test_same_network_in_training_and_evaluation():
    """LayerNorm and no dropout: the network is one function in both modes (training adds only
    the posterior sample and the input masking of its objective)."""
    net = ScPerceiver(PerceiverConfig.for_genes(48, **TINY, input_masking=0.0))
    x = torch.log1p(counts())
    train = net.train()(x, library=x.sum(1), sample=False).mean
    evaluation = net.eval()(x, library=x.sum(1)).mean
    torch.testing.assert_close(train, evaluation)
    batch = ScPerceiver(PerceiverConfig.for_genes(48, **TINY, norm="batch", dropout=0.5))
    a = batch.train()(x, library=x.sum(1), sample=False).mean
    b = batch.eval()(x, library=x.sum(1)).mean
    assert not torch.allclose(a, b)  # the ablation brings the mode dependence back


def test_input_masking_hides_genes_in_training_only():
    net = ScPerceiver(PerceiverConfig.for_genes(48, **TINY, input_masking=0.5))
    x = torch.log1p(counts())
    seen = []
    net.tokenizer.register_forward_pre_hook(lambda m, args: seen.append(args))
    with torch.no_grad():
        net.train()(x, library=x.sum(1), sample=False)
        net.eval()(x, library=x.sum(1))
    (values, hidden), (eval_values, eval_hidden) = seen
    assert 0.35 < hidden.float().mean() < 0.65 and hidden.shape == x.shape
    torch.testing.assert_close(values, x)  # the tokenizer hides them, by the mask token
    torch.testing.assert_close(eval_values, x)
    assert eval_hidden is None  # evaluation reads every gene
    assert "tokenizer.mask_token" not in ScPerceiver(PerceiverConfig.for_genes(48)).state_dict()


def test_dispersion_is_per_gene_or_per_gene_and_cell():
    x = torch.log1p(counts())
    thetas = {}
    for dispersion in ("gene", "gene-cell"):
        torch.manual_seed(0)
        net = ScPerceiver(PerceiverConfig.for_genes(48, **TINY, dispersion=dispersion)).eval()
        with torch.no_grad():
            thetas[dispersion] = net(x, library=x.sum(1)).theta  # (cells, genes)
    assert torch.equal(thetas["gene"], thetas["gene"][:1].expand_as(thetas["gene"]))
    assert (thetas["gene-cell"].std(0) > 1e-4).all()


def test_tied_gene_tables_share_the_encoders_identity_embedding():
    tied = ScPerceiver(PerceiverConfig.for_genes(48, **TINY, tie_genes=True))
    untied = ScPerceiver(PerceiverConfig.for_genes(48, **TINY, tie_genes=False))
    assert tied.readout.gene_queries is tied.tokenizer.identity
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert count(untied) - count(tied) > 48 * 16  # the decoder's own gene tables are gone
    readout = tied.readout.readout_vectors(0)
    torch.testing.assert_close(readout, tied.tokenizer.identity @ tied.readout.readout_maps[0])


def test_mlp_encoder_and_decoder_replace_the_attention_sides():
    """``encoder="mlp"`` / ``decoder="mlp"``: scVI's network shape, nothing of the Perceiver on
    that side (no tokens, blocks or attention sites), the same count model and outputs."""
    x = torch.log1p(counts())
    both = ScPerceiver(PerceiverConfig.for_genes(48, **TINY, encoder="mlp", decoder="mlp"))
    names = {name.split(".")[0] for name, _ in both.named_parameters()}
    assert names == {"mlp_encoder", "readout", "log_theta"}
    assert both.attention_sites() == [] and both.token_layers() == []
    assert [type(m).__name__ for m in both.mlp_encoder] == ["Linear", "LayerNorm", "ReLU", "Linear"]
    assert both.mlp_encoder[0].in_features == 48 and both.mlp_encoder[0].out_features == 128
    assert both.readout.mlp[-1].out_features == 2 * 48  # mean logits and theta offsets
    assert list(both.layer_paths()) == ["encoder.hidden", "posterior", "decoder.hidden"]
    with torch.no_grad():
        out = both.eval()(x, library=x.sum(1))
        record = both.forward_intermediates(x, library=x.sum(1))
    torch.testing.assert_close(out.mean.sum(1), x.sum(1), rtol=1e-4, atol=1e-3)
    assert (out.theta.std(0) > 1e-4).all()  # theta per gene and cell, as the default
    assert set(record) == {"latent", "mean", "theta"}
    hybrid = ScPerceiver(PerceiverConfig.for_genes(48, **TINY, encoder="mlp"))
    assert [s.name for s in hybrid.attention_sites()] == ["decoder.0", "decoder.readout"]
    assert hybrid.token_layers() == ["decoder.tokens", "decoder.0"]
    other = ScPerceiver(PerceiverConfig.for_genes(48, **TINY, decoder="mlp"))
    assert [s.name for s in other.attention_sites()] == ["encoder.cross", "encoder.0"]
    scvi = ScPerceiver(
        PerceiverConfig.for_genes(48, encoder="mlp", decoder="mlp", norm="batch", dropout=0.1)
    )
    kinds = [type(m).__name__ for m in scvi.mlp_encoder]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Dropout", "Linear"]
    assert scvi.mlp_encoder[3].p == 0.1 and scvi.mlp_encoder[1].momentum == 0.01
    kinds = [type(m).__name__ for m in scvi.readout.mlp]  # scVI's decoder: no dropout
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear"]


@pytest.mark.parametrize(
    "switches, message",
    [
        ({"encoder": "dense"}, "encoder must be one of"),
        ({"decoder": "transformer"}, "decoder must be one of"),
        ({"encoder": "mlp", "tokens": "conv"}, "needs the attention encoder"),
        ({"decoder": "mlp", "tie_genes": True}, "tie_genes"),
        ({"mlp_hidden": 0}, "mlp_hidden must be positive"),
    ],
)
def test_network_switches_are_validated(switches, message):
    with pytest.raises(ValueError, match=message):
        PerceiverConfig.for_genes(48, **switches)


def test_posterior_mean_in_evaluation_and_samples_when_asked():
    net = ScPerceiver(PerceiverConfig.for_genes(48, **TINY)).eval()
    x = torch.log1p(counts())
    with torch.no_grad():
        first, second = net(x, library=x.sum(1)), net(x, library=x.sum(1))
        torch.testing.assert_close(first.z, second.z)
        torch.testing.assert_close(first.z, net.encode(x))
        sampled = net(x, library=x.sum(1), sample=True)
    assert not torch.allclose(sampled.z, first.z)


def test_uniform_weights_without_attention_do_not_depend_on_the_cell():
    net = ScPerceiver(PerceiverConfig.for_genes(48, **TINY, attention=False)).eval()
    weights = []
    net.tokenizer.mixing.softmax.register_forward_hook(lambda m, i, o: weights.append(o))
    x = torch.log1p(counts())
    with torch.no_grad():
        net(x, library=x.sum(1))
        other = net.tokenizer(x.flip(0)).flip(0)  # each cell's tokens, in another batch
    assert weights[0].shape == (1, net.config.n_tokens, 48)  # one set, broadcast to every cell
    torch.testing.assert_close(weights[0].sum(-1), torch.ones(1, net.config.n_tokens))
    torch.testing.assert_close(net.tokenizer(x), other)


@pytest.mark.parametrize("decoder", ["attention", "mlp"])
def test_init_gene_parameters_starts_at_the_library_null(zeisel, decoder):
    config = PerceiverConfig.for_genes(zeisel.n_vars, **TINY, decoder=decoder)
    net = ScPerceiver(config).eval()
    null = B.fit_null_nb(zeisel, library_scaled=True)
    net.init_gene_parameters(torch.as_tensor(null.gene_param), torch.as_tensor(null.theta), 1e4)
    with torch.no_grad():  # only the biases left: the decoder is the null
        if decoder == "mlp":
            net.readout.mlp[-1].weight.zero_()
            net.readout.mlp[-1].bias.zero_()
        else:
            net.readout.readout.zero_()
        x = torch.tensor(zeisel.X[:20].toarray(), dtype=torch.float32)
        out = net(torch.log1p(x), library=x.sum(1))
    expected = torch.as_tensor(null.mean(x.sum(1).numpy()), dtype=torch.float32)
    torch.testing.assert_close(out.mean, expected.clamp_min(1e-6), rtol=1e-3, atol=1e-5)
    theta = torch.as_tensor(null.theta, dtype=torch.float32).clamp(1e-3, 1e3)
    torch.testing.assert_close(out.theta[0], theta, rtol=1e-3, atol=1e-4)


def test_api_trains_saves_and_loads_as_its_own_class(zeisel, tmp_path):
    model = ScPerceiverModel(zeisel, **TINY)
    assert model.train_config.input_transform == "log1p" and model.is_variational
    model.train(epochs=1, enable_progress_bar=False, output_dir=tmp_path / "run")
    assert len(model.history) == 1 and np.isfinite(model.history["val_loss"]).all()
    mean = model.get_reconstruction_error(split="test")["reconstruction_loss"]
    sample = model.get_reconstruction_error(split="test", sample=True, seed=1)
    again = model.get_reconstruction_error(split="test", sample=True, seed=1)
    assert sample == again and sample["reconstruction_loss"] != mean
    model.save(tmp_path / "model")
    loaded = ScViTModel.load(tmp_path / "model", zeisel)  # any API class loads any model
    assert type(loaded) is ScPerceiverModel and loaded.config == model.config
    assert loaded.get_reconstruction_error(split="test")["reconstruction_loss"] == mean
    z = loaded.get_latent_representation(split="test")
    assert z.shape == ((zeisel.obs[K.SPLIT] == "test").sum(), 64)


def test_kl_weight_warms_up_linearly(zeisel):
    from types import SimpleNamespace

    module = ScPerceiverModel(zeisel, **TINY).module
    module.train_config = module.train_config.replace(kl_warmup=0.5, kl_weight=2.0)
    for step, expected in ((0, 0.0), (25, 1.0), (50, 2.0), (99, 2.0)):
        module._trainer = SimpleNamespace(estimated_stepping_batches=100, global_step=step)
        assert module.kl_weight() == pytest.approx(expected)
    module.train_config = module.train_config.replace(kl_warmup=0.0)
    assert module.kl_weight() == 2.0


def test_a_scvit_config_is_refused_by_the_perceiver_api(zeisel):
    with pytest.raises(TypeError, match="ScViTModel"):
        ScPerceiverModel(zeisel, sc.ScViTConfig.small(zeisel.n_vars))


def test_default_budgets():
    assert perceiver_epochs(1189) == 61 and perceiver_epochs(800) == 90
    assert perceiver_epochs(700) == 100 and perceiver_epochs(100) == 100  # at most 100 passes
    assert perceiver_epochs(2400) == 60 and perceiver_epochs(20_000) == 60  # 60 epochs between
    assert perceiver_epochs(100_000) == 12 and perceiver_epochs(10**6) == 10
    cpu = ExperimentSpec.make("perceiver", profile="cpu")
    assert training_epochs(cpu, 1189) == perceiver_epochs(1189)
    assert (
        training_epochs(ExperimentSpec.make("scvi", profile="cpu", epochs="default"), 1189) == 400
    )
    assert training_epochs(ExperimentSpec.make("scvi", profile="cpu"), 1189) == 10
    assert training_epochs(ExperimentSpec.make("perceiver", profile="ci"), 480) == 2
    with pytest.raises(ValueError, match="epochs"):
        ExperimentSpec.make("scvi", epochs="long")


def test_scvi_posterior_mean_reading(zeisel):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = B.train_scvi(zeisel, n_latent=8, max_epochs=2, seed=0, accelerator="cpu")
    model = result.model
    mean = B.scvi_reconstruction_error(model, zeisel, posterior="mean", return_mean=False)
    again = B.scvi_reconstruction_error(model, zeisel, posterior="mean", seed=5)
    sample = B.scvi_reconstruction_error(model, zeisel, posterior="sample")
    values = mean["reconstruction_loss"]
    assert values.shape == ((zeisel.obs[K.SPLIT] == "test").sum(),)
    assert again["reconstruction_loss"] == pytest.approx(values.mean(), rel=1e-9)  # no sampling
    assert sample["reconstruction_loss"] != pytest.approx(values.mean(), rel=1e-6)
    # by hand: decode the posterior mean of each test cell with scVI's own modules
    data = model._validate_anndata(B._counts_adata(zeisel, "test", None))
    rows = []
    with torch.inference_mode():
        for tensors in model._make_data_loader(adata=data):
            inf = model.module.inference(**model.module._get_inference_input(tensors))
            z = model.module.z_encoder(torch.log1p(tensors["X"]))[0].loc
            gen = model.module._get_generative_input(tensors, {**inf, "z": z})
            px = model.module.generative(**gen)["px"]
            rows.append(-px.log_prob(tensors["X"]).sum(-1))
    np.testing.assert_allclose(values, torch.cat(rows).double().numpy(), rtol=1e-5)
