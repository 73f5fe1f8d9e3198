"""Representation and attention diagnostics: closed-form answers on small synthetic models."""

from __future__ import annotations

import math

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from interpret.diagnostics import (
    amortisation_gap,
    attention_entropy,
    attention_knockout,
    attention_layers,
    cka_between,
    cka_matrix,
    decoder_gene_tokens,
    diagnostic_inputs,
    effective_rank,
    gene_token_summary,
    grad_norm_share,
    knocked_out,
    layer_probes,
    likelihood_beyond_null,
    linear_cka,
    matrix_effective_rank,
    stem_span,
    stem_spectra,
    token_similarity,
    update_norms,
)
from scvit_core.config import ScViTConfig
from scvit_core.model import ScViT

N_GENES = 64


def make_model(seed: int = 0, **overrides) -> ScViT:
    torch.manual_seed(seed)
    return ScViT(ScViTConfig.small(N_GENES, **overrides)).eval()


@pytest.fixture(scope="module")
def model() -> ScViT:
    return make_model()


@pytest.fixture(scope="module")
def data():
    """80 cells of two types (type "b" up-regulates the first half of the genes)."""
    rng = np.random.default_rng(0)
    labels = np.repeat(["a", "b"], 40)
    rate = np.where((labels == "b")[:, None] & (np.arange(N_GENES) < N_GENES // 2), 6.0, 2.0)
    counts = rng.poisson(rate).astype(np.float32)
    split = np.tile(np.array(["train"] * 15 + ["validation"] + ["test"] * 4), 4)
    counts = torch.from_numpy(counts)
    return {"x": torch.log1p(counts), "counts": counts, "labels": labels, "split": split}


def attention_input(net: ScViT, record: dict, i: int) -> torch.Tensor:
    """What encoder stage ``i``'s attention reads (evaluation mode)."""
    return net.encoder[i].norm_attn(record[f"encoder.{i}.linear"])


def values(attention, x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1]
    return F.linear(x, attention.in_proj_weight[2 * d :], attention.in_proj_bias[2 * d :])


# knock-outs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["uniform", "identity"])
def test_knockout_weights_match_hand_computation(model, data, mode):
    net = knocked_out(model, mode)
    with torch.no_grad():
        record = net.forward_intermediates(data["x"][:16])
        for i, stage in enumerate(net.encoder):
            v = values(stage.attention, attention_input(net, record, i))  # (B, T, d)
            mixed = v.mean(1, keepdim=True).expand_as(v) if mode == "uniform" else v
            expected = stage.attention.out_proj(mixed)
            torch.testing.assert_close(record[f"encoder.{i}.attention"], expected)
    # the caller's model is untouched: still fused, no hooks
    assert all(s.attention.fused for s in model.encoder)
    assert not model.encoder[0].attention.softmax._forward_hooks


def test_zero_knockout_equals_model_without_attention(model, data):
    plain = ScViT(model.config.replace(attention=False)).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "attention" not in k})
    with torch.no_grad():
        a = knocked_out(model, "zero")(data["x"])
        b = plain(data["x"])
        trained = knocked_out(model, "trained")(data["x"])
        original = model(data["x"])
    for name in ("z", "mean", "theta", "gate_logits"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name))
        torch.testing.assert_close(getattr(trained, name), getattr(original, name))


def test_attention_knockout_table(model, data):
    frame = attention_knockout(
        model,
        data["x"],
        data["counts"],
        labels=data["labels"],
        split=data["split"],
        modes=("uniform", "zero"),
        per_stage=True,
        mlp_epochs=1,
    )
    n_attention = 2 * len(model.encoder)
    assert len(frame) == 1 + 2 * (1 + n_attention)
    assert frame["n_cells"].eq(16).all() and np.isfinite(frame["nll"]).all()
    trained = frame.iloc[0]
    assert (trained["mode"], trained["stages"], trained["nll_change"]) == ("trained", "none", 0)
    decoder_only = frame[frame["stages"].str.startswith("decoder")]
    assert len(decoder_only) == 2 * len(model.encoder)
    assert (decoder_only["knn_accuracy"] == trained["knn_accuracy"]).all()
    zero_all = frame[(frame["mode"] == "zero") & (frame["stages"] == "all")]
    assert zero_all["nll"].iloc[0] != pytest.approx(trained["nll"])


# attention entropy and update norms -----------------------------------------------------------


def test_entropy_of_uniform_attention_is_log_tokens(model, data):
    flat = make_model()
    with torch.no_grad():
        for stage in [*flat.encoder, *flat.decoder]:
            d = stage.attention.in_proj_weight.shape[1]
            stage.attention.in_proj_weight[: 2 * d] = 0  # q = k = 0: every score equal
    frame = attention_entropy(flat, data["x"], batch_size=32)
    assert len(frame) == sum(s.attention.heads for s in [*flat.encoder, *flat.decoder])
    np.testing.assert_allclose(frame["entropy"], np.log(frame["tokens"]), rtol=1e-6)
    np.testing.assert_allclose(frame["entropy_ratio"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(frame["max_weight"], 1 / frame["tokens"], rtol=1e-6)
    np.testing.assert_allclose(frame["self_weight"], 1 / frame["tokens"], rtol=1e-6)
    trained = attention_entropy(model, data["x"])
    assert (trained["entropy_ratio"] <= 1 + 1e-9).all()


def test_update_norms_match_intermediates(model, data):
    frame = update_norms(model, data["x"], batch_size=32)
    assert frame["layer"].tolist() == [
        *(f"encoder.{i}" for i in range(4)),
        *(f"decoder.{i}" for i in reversed(range(4))),
    ]
    with torch.no_grad():
        record = model.forward_intermediates(data["x"])
        skip = attention_input(model, record, 1).flatten(1)
    update = record["encoder.1.attention"].flatten(1)
    ratio = update.norm(dim=1) / skip.norm(dim=1)
    cosine = F.cosine_similarity(update, skip, dim=1)
    row = frame.set_index("layer").loc["encoder.1"]
    assert row["ratio"] == pytest.approx(float(ratio.mean()), rel=1e-5)
    assert row["cosine"] == pytest.approx(float(cosine.mean()), abs=1e-5)


# CKA ------------------------------------------------------------------------------------------


def test_linear_cka_properties_and_closed_forms():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(30, 8))
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    assert linear_cka(a, a) == pytest.approx(1.0)
    assert linear_cka(a, 3.7 * a @ q) == pytest.approx(1.0)
    b = rng.normal(size=(30, 5))
    assert linear_cka(a, b) == pytest.approx(linear_cka(a @ q * 0.1, b))
    # one feature each: the squared Pearson correlation
    u, v = rng.normal(size=30), rng.normal(size=30)
    assert linear_cka(u[:, None], v[:, None]) == pytest.approx(np.corrcoef(u, v)[0, 1] ** 2)
    # [x, 0] against [x, y] with centred, orthogonal, equal-norm x and y: 1 / sqrt(2)
    x = np.array([1.0, -1.0, 1.0, -1.0])
    y = np.array([1.0, 1.0, -1.0, -1.0])
    left, right = np.stack([x, 0 * x], 1), np.stack([x, y], 1)
    assert linear_cka(left, right) == pytest.approx(1 / math.sqrt(2))
    # features >> cells (Gram form) agrees with the feature form through a rotation
    wide = rng.normal(size=(6, 200))
    rotated = wide @ np.linalg.qr(rng.normal(size=(200, 200)))[0]
    assert linear_cka(wide, rotated) == pytest.approx(1.0)
    assert math.isnan(linear_cka(np.ones((5, 3)), a[:5]))


def test_cka_between_models(model, data):
    same = cka_between(model, model, data["x"], batch_size=32)
    assert "latent" in same["layer"].tolist() and "bottleneck.2" not in same["layer"].tolist()
    np.testing.assert_allclose(same["cka"], 1.0, atol=1e-4)
    other = cka_between(model, make_model(seed=1), data["x"], layers=["stem", "latent"])
    assert other["layer"].tolist() == ["stem", "latent"] and (other["cka"] < 0.999).all()
    matrix = cka_matrix(model, model, data["x"], layers_a=["stem", "encoder.0", "latent"])
    assert matrix.shape[0] == 3 and matrix.shape[1] == len(same)
    assert matrix.loc["latent", "latent"] == pytest.approx(1.0, abs=1e-4)


# effective rank and the stem ------------------------------------------------------------------


def test_matrix_effective_rank_closed_forms():
    rank_one = torch.outer(torch.arange(1.0, 5.0), torch.arange(1.0, 7.0))
    assert float(matrix_effective_rank(rank_one)) == pytest.approx(1.0)
    assert float(matrix_effective_rank(torch.eye(6))) == pytest.approx(6.0)
    batch = matrix_effective_rank(
        torch.stack([torch.eye(4), torch.diag(torch.tensor([1.0, 0, 0, 0]))])
    )
    np.testing.assert_allclose(batch.numpy(), [4.0, 1.0])


def test_effective_rank_table(model, data):
    frame = effective_rank(model, data["x"], batch_size=32)
    assert frame["layer"].tolist() == [
        "stem",
        *(f"encoder.{i}" for i in range(4)),
        "latent",
        *(f"decoder.{i}" for i in reversed(range(4))),
    ]
    tokens = frame.dropna(subset=["per_cell"])
    assert (tokens["per_cell"] <= tokens["per_cell_max"] + 1e-9).all()
    assert (frame["across_cells"] <= frame["across_cells_max"] + 1e-9).all()


def test_stem_span_and_token_similarity(model, data):
    frame = stem_span(model, data["x"])
    parts = frame["part"].tolist()
    assert parts[0] == "stem.layers.0.0 weight" and frame["shape"].iloc[0] == "8x8"
    assert {"stem.layers.0.0 weight x BN", "stem linearised", "tokens"} <= set(parts)
    assert (frame["effective_rank"] <= frame["max_rank"] + 1e-9).all()
    spectra = stem_spectra(model, data["x"])
    assert set(spectra["part"]) == set(parts)
    for _, spectrum in spectra.groupby("part"):
        share = spectrum["share"].to_numpy()
        assert share.sum() == pytest.approx(1.0) and (np.diff(share) <= 1e-12).all()
    similarity = token_similarity(model, data["x"])
    assert similarity.shape == (8, 8)
    np.testing.assert_allclose(np.diag(similarity), 1.0, rtol=1e-6)
    mean_abs = np.abs(similarity.to_numpy()[~np.eye(8, dtype=bool)]).mean()
    assert mean_abs <= frame.set_index("part").loc["tokens", "mean_abs_cosine"] + 1e-9


# decoder output tokens ------------------------------------------------------------------------


def test_decoder_gene_tokens_match_hand_indexing():
    # 60 genes, 8 tokens: L = 8 values per token and parameter, 4 padding positions
    legacy = ScViT(ScViTConfig.small(60, head="legacy_thirds"))
    per_token = ScViT(ScViTConfig.small(60, head="per_token"))
    g = np.arange(60)
    frame = decoder_gene_tokens(legacy)
    # thirds of the flattened (8 tokens x 24) output: part k starts at 64 k
    for k, column in enumerate(["mean_token", "theta_token", "gate_token"]):
        np.testing.assert_array_equal(frame[column], (64 * k + g) // 24)
    frame = decoder_gene_tokens(per_token)
    for column in ["mean_token", "theta_token", "gate_token"]:
        np.testing.assert_array_equal(frame[column], g // 8)
    summary = gene_token_summary(frame).set_index("quantity")
    assert summary.loc["1 token", "n_genes"] == 60
    assert summary.loc["all from block token", "share"] == 1.0
    legacy_summary = gene_token_summary(decoder_gene_tokens(legacy)).set_index("quantity")
    assert legacy_summary["n_genes"].iloc[:3].sum() == 60
    assert legacy_summary.loc["3 tokens", "n_genes"] == 60  # thirds 64 apart: 3 tokens always


# probes, null models, gradient shares ---------------------------------------------------------


def test_layer_probes_one_row_per_layer(model, data):
    frame = layer_probes(model, data["x"], data["labels"], data["split"], max_features=16)
    with torch.no_grad():
        keys = list(model.forward_intermediates(data["x"][:2]))
    keys.remove("bottleneck.2")  # the same tensor as "latent"
    assert frame["layer"].tolist() == ["input", *keys]
    assert frame["accuracy"].between(0, 1).all() and (frame["n_components"] <= 16).all()
    assert frame.set_index("layer").loc["input", "accuracy"] == 1.0  # separable by design


def test_likelihood_beyond_null_sign_convention(model, data):
    frame = likelihood_beyond_null(model, data["x"], data["counts"], data["split"]).set_index(
        "model"
    )
    assert np.isfinite(frame.to_numpy()).all()
    assert frame.loc["null_constant", "gap_closed"] == 0.0
    assert frame.loc["null_library", "gap_closed"] == pytest.approx(1.0)
    gain = frame.loc["null_constant", "nll"] - frame.loc["model", "nll"]
    assert frame.loc["model", "gain_vs_constant"] == pytest.approx(gain)
    assert frame.loc["model", "gain_vs_constant_per_gene"] == pytest.approx(gain / N_GENES)
    # an untrained decoder is worse than the constant null: a negative gain
    assert frame.loc["model", "gain_vs_constant"] < 0


def test_amortisation_gap_bounds_and_invariances(model, data):
    x, counts, split = data["x"], data["counts"], data["split"]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    frame = amortisation_gap(model, x, counts, split, steps=5, lr=0.05)
    row = frame.iloc[0]
    assert row["cells"] == (split == "test").sum()
    # the encoder's NLL is the reported one: likelihood_beyond_null's on the same test cells
    reported = likelihood_beyond_null(model, x, counts, split).set_index("model").loc["model"]
    assert row["nll_encoder"] == pytest.approx(reported["nll"], rel=1e-6)
    # an untrained decoder is far from its best latent: a real gain, never a loss
    assert 0 < row["gap"] == pytest.approx(row["nll_encoder"] - row["nll_optimal"])
    assert row["gap_relative"] == pytest.approx(row["gap"] / row["nll_encoder"])
    assert row["latent_shift"] > 0
    # cells are searched independently: other batches give the same numbers
    batched = amortisation_gap(model, x, counts, split, steps=5, lr=0.05, batch_size=5)
    pd.testing.assert_frame_equal(batched, frame, rtol=1e-4)
    # more search can only keep or lower the best NLL found (the path's best is kept)
    longer = amortisation_gap(model, x, counts, split, steps=10, lr=0.05).iloc[0]
    assert longer["nll_optimal"] <= row["nll_optimal"] + 1e-6
    # the caller's model is untouched
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="test cells"):
        amortisation_gap(model, x, counts, np.full(len(x), "train"))
    with pytest.raises(ValueError, match="steps"):
        amortisation_gap(model, x, counts, split, steps=0)


def test_scvi_autoencoder_scores_scvi_in_the_same_units(tiny_scvi):
    import scvi

    from interpret import scvi_autoencoder
    from scvit_core.baselines import scvi_reconstruction_error

    model, counts = tiny_scvi
    adata = model.adata
    net = scvi_autoencoder(model)
    assert net.config.likelihood == "corrected"  # scVI's default ZINB
    x = torch.as_tensor(counts)
    expected = scvi_reconstruction_error(model, adata, split=None, posterior="mean")
    frame = amortisation_gap(net, x, x, None, steps=5)
    assert frame.loc[0, "nll_encoder"] == pytest.approx(expected["reconstruction_loss"], rel=1e-5)
    assert frame.loc[0, "gap"] > 0
    nb = scvi.model.SCVI(adata, n_latent=4, n_hidden=16, gene_likelihood="nb")
    assert scvi_autoencoder(nb).config.likelihood == "nb"
    with pytest.raises(NotImplementedError, match="dispersion"):
        scvi_autoencoder(scvi.model.SCVI(adata, dispersion="gene-cell"))


class ConstantDecoder(torch.nn.Module):
    """A decoder that ignores its latent: every cell's mean is its library x fixed proportions."""

    def __init__(self, n_genes: int) -> None:
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace(likelihood="nb", n_latent=3)
        self.logits = torch.nn.Parameter(torch.linspace(-1.0, 1.0, n_genes))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :3]

    def decode(self, z: torch.Tensor, *, library: torch.Tensor | None = None):
        mean = torch.softmax(self.logits, 0).expand(len(z), -1) * library[:, None]
        return mean, torch.full_like(mean, 2.0), None


def test_amortisation_gap_is_zero_for_a_decoder_that_ignores_its_latent(data):
    frame = amortisation_gap(ConstantDecoder(N_GENES), data["x"], data["counts"], None, steps=5)
    assert frame.loc[0, "cells"] == len(data["x"])
    assert frame.loc[0, "gap"] == 0.0 and frame.loc[0, "latent_shift"] == 0.0


def test_grad_norm_share_aggregates_blocks(model):
    groups = list(dict.fromkeys(n.rpartition(".")[0] for n, _ in model.named_parameters()))
    rows = [
        {"step": step, "epoch": 0, "group": g, "grad_norm": float(i + 1 + step)}
        for step in (0, 5)
        for i, g in enumerate(groups)
    ]
    frame = pd.DataFrame(rows)
    blocks = grad_norm_share(frame)
    assert np.allclose(blocks.groupby("step")["share"].sum(), 1.0)
    step0 = blocks[blocks["step"] == 0].set_index("block")
    norms = frame[frame["step"] == 0].set_index("group")["grad_norm"]
    expected = math.hypot(norms["encoder.0.attention"], norms["encoder.0.attention.out_proj"])
    assert step0.loc["encoder.0.attention", "grad_norm"] == pytest.approx(expected)
    # the decoder's module list runs the last stage's mirror first
    assert step0.loc["decoder.3.attention", "grad_norm"] == pytest.approx(
        math.hypot(norms["decoder.0.attention"], norms["decoder.0.attention.out_proj"])
    )
    assert step0.index[0] == "stem" and step0.index[-1] == "head"
    stages = grad_norm_share(frame, level="stage")
    assert set(stages["block"]) == {
        "stem",
        *(f"encoder.{i}" for i in range(4)),
        "bottleneck",
        "decoder.dense",
        *(f"decoder.{i}" for i in range(4)),
        "head",
    }
    kinds = set(grad_norm_share(frame, level="component")["block"])
    assert kinds == {"stem", "linear", "norm", "attention", "dense", "head"}


def test_diagnostic_inputs_follow_the_model():
    from scvit_core.api import ScViTModel

    rng = np.random.default_rng(0)
    counts = rng.poisson(2.0, size=(40, N_GENES)).astype(np.float32)
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(np.repeat(["a", "b"], 20)),
            "split": np.tile(["train", "test"], 20),
        },
        index=[f"c{i}" for i in range(40)],
    )
    adata = ad.AnnData(sp.csr_matrix(counts), obs=obs)
    adata.var_names = [f"g{j}" for j in range(N_GENES)]
    net = ScViTModel(adata, ScViTConfig.small(N_GENES), input_transform="log1p")
    inputs = diagnostic_inputs(net, max_cells=20)
    assert inputs.inputs.shape == (20, N_GENES)
    rows = [int(name[1:]) for name in inputs.obs_names]
    torch.testing.assert_close(inputs.counts, torch.from_numpy(counts[rows]))
    torch.testing.assert_close(inputs.inputs, torch.log1p(inputs.counts))
    torch.testing.assert_close(inputs.library, inputs.counts.sum(1))
    assert (inputs.labels == obs["cell_type"].to_numpy()[rows]).all()
    assert sorted(set(inputs.split)) == ["test", "train"]


@pytest.mark.parametrize(
    "overrides",
    [
        dict(attention=False),
        dict(conv_stem=False, head="per_token"),
        dict(extra_convs=1, likelihood="corrected", library_scaling=True),
    ],
    ids=["no-attention", "gene-blocks", "extra-convs-library"],
)
def test_diagnostics_run_on_ablations(data, overrides):
    net = make_model(**overrides)
    x, counts = data["x"], data["counts"]
    stages = attention_layers(net)
    assert len(stages) == (0 if not net.config.attention else 2 * len(net.encoder))
    heads = sum(s.attention.heads for s in [*net.encoder, *net.decoder] if s.attention)
    assert len(attention_entropy(net, x)) == heads
    assert len(update_norms(net, x)) == len(stages)
    knockout = attention_knockout(net, x, counts, split=data["split"], modes=("zero",))
    assert np.isfinite(knockout["nll"]).all()
    assert len(effective_rank(net, x)) == 2 + 2 * len(net.encoder)
    span = stem_span(net, x)
    assert span["part"].iloc[-1] == "tokens"
    linearised = net.config.conv_stem and net.config.extra_convs == 0
    assert ("stem linearised" in span["part"].tolist()) == linearised
    expected = 4 + 2 * net.config.extra_convs + linearised
    assert len(span) == (expected if net.config.conv_stem else 1)
    assert len(decoder_gene_tokens(net)) == N_GENES


# scPerceiver: the same diagnostics through the same interface ---------------------------------

PERCEIVER_SITES = ["encoder.cross", "encoder.0", "decoder.0", "decoder.readout"]
PERCEIVER_CASES = [
    dict(tokens=tokens, attention=attention)
    for tokens in ("genes", "conv")
    for attention in (True, False)
]


@pytest.fixture(scope="module")
def perceiver_data():
    """40 cells of the 48 genes of :func:`conftest.small_perceiver`, with a split."""
    rng = np.random.default_rng(0)
    counts = torch.as_tensor(rng.poisson(rng.gamma(0.5, 4.0, size=(40, 48))), dtype=torch.float32)
    split = np.tile(np.array(["train"] * 6 + ["validation"] + ["test"] * 3), 4)
    return {"x": torch.log1p(counts), "counts": counts, "library": counts.sum(1), "split": split}


@pytest.mark.parametrize("case", PERCEIVER_CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_perceiver_attention_diagnostics(case, make_perceiver, perceiver_data):
    net = make_perceiver(**case)
    x, library = perceiver_data["x"], perceiver_data["library"]
    assert attention_layers(net) == PERCEIVER_SITES
    frame = attention_entropy(net, x, library=library)
    heads = {"encoder.cross": 2 if case["tokens"] == "conv" else 1, "decoder.readout": 1}
    expected = [s for s in PERCEIVER_SITES for _ in range(heads.get(s, net.config.heads))]
    assert frame["layer"].tolist() == expected
    rows = frame.groupby("layer", sort=False).first()
    keys = 4 if case["tokens"] == "conv" else 48  # conv channels, or genes
    assert rows.loc["encoder.cross", ["tokens", "queries"]].tolist() == [keys, 4]
    assert rows.loc["decoder.readout", ["tokens", "queries"]].tolist() == [4, 48]  # dim=1
    assert (frame["entropy_ratio"] < 0.95).all()  # sharp: far from uniform
    cross = frame["layer"].isin(["encoder.cross", "decoder.readout"])
    assert frame.loc[cross, "self_weight"].isna().all()
    assert frame.loc[~cross, "self_weight"].between(0, 1).all()

    norms = update_norms(net, x, library=library)
    assert norms["layer"].tolist() == ["encoder.0", "decoder.0"]  # the residual sites
    with torch.no_grad():
        record = net.forward_intermediates(x, library=library)
    update, skip = record["encoder.0.attention"].flatten(1), record["tokens"].flatten(1)
    ratio = float((update.norm(dim=1) / skip.norm(dim=1)).mean())
    assert norms.set_index("layer").loc["encoder.0", "ratio"] == pytest.approx(ratio, rel=1e-5)

    ranks = effective_rank(net, x, library=library)
    assert ranks["layer"].tolist() == [
        "tokens",
        "encoder.0",
        "latent",
        "decoder.tokens",
        "decoder.0",
    ]
    tokens = ranks.dropna(subset=["per_cell"])
    assert len(tokens) == 4 and (tokens["per_cell"] <= tokens["per_cell_max"] + 1e-9).all()

    # a uniform knock-out of any one site changes the decoded mean (the latent: encoder only)
    with torch.no_grad():
        trained = knocked_out(net, "trained")(x, library=library)
        for site in PERCEIVER_SITES:
            out = knocked_out(net, "uniform", stages=[site])(x, library=library)
            assert not torch.allclose(out.mean, trained.mean, rtol=1e-3), site
            moved = not torch.allclose(out.z, trained.z, atol=1e-5)
            assert moved == site.startswith("encoder"), site


def test_perceiver_knockouts_follow_each_sites_softmax(make_perceiver, perceiver_data):
    net = make_perceiver()
    x, library = perceiver_data["x"][:8], perceiver_data["library"][:8]
    # uniform weights of the readout are 1/m over the tokens (its softmax's dim=1)
    knocked = knocked_out(net, "uniform", stages=["decoder.readout"])
    with torch.no_grad():
        record = knocked.forward_intermediates(x, library=library)
        readout = knocked.readout
        v = readout.v(readout.norm(record["decoder.0"]))  # (B, m, d)
        raw = (v @ readout.readout[0].T).mean(1) + readout.bias[0]  # (B, G)
        expected = (torch.softmax(raw, -1) * library[:, None]).clamp(1e-6, 1e6)
    torch.testing.assert_close(record["mean"], expected)
    # identity weights are defined for self-attention only, a zero update where there is a sum
    with pytest.raises(ValueError, match="self-attention"):
        knocked_out(net, "identity", stages=["encoder.cross"])
    with pytest.raises(ValueError, match="residual"):
        knocked_out(net, "zero", stages=["decoder.readout"])
    identity = knocked_out(net, "identity")  # all self-attention sites, none of the others
    assert [bool(s.softmax._forward_hooks) for s in identity.attention_sites()] == [
        False,
        True,
        True,
        False,
    ]
    frame = attention_knockout(
        net,
        perceiver_data["x"],
        perceiver_data["counts"],
        split=perceiver_data["split"],
        per_stage=True,
    )
    stages = frame.groupby("mode", sort=False)["stages"].apply(list).to_dict()
    assert stages == {
        "trained": ["none"],
        "uniform": ["all", *PERCEIVER_SITES],
        "identity": ["all", "encoder.0", "decoder.0"],
        "zero": ["all", "encoder.0", "decoder.0"],
    }
    assert np.isfinite(frame["nll"]).all() and frame["n_cells"].eq(12).all()


@pytest.mark.parametrize("decoder", ["attention", "mlp"])
def test_perceiver_amortisation_gap(make_perceiver, perceiver_data, decoder):
    net = make_perceiver(decoder=decoder)
    frame = amortisation_gap(
        net, perceiver_data["x"], perceiver_data["counts"], perceiver_data["split"], steps=10
    )
    assert frame.loc[0, "cells"] == 12 and frame.loc[0, "gap"] > 0


class PerceiverStandIn:
    """What :func:`interpret.diagnose` reads of an API model, for a bare scPerceiver network:
    ``model``, ``adata``, ``config``, ``train_config.input_transform`` and the constructor
    ``type(model)(adata, config, seed=, input_transform=)`` (the untrained network)."""

    def __init__(self, adata, config, *, seed: int = 0, input_transform: str = "log1p"):
        from types import SimpleNamespace

        from scvit_core.perceiver import ScPerceiver

        self.adata, self.config = adata, config
        self.train_config = SimpleNamespace(input_transform=input_transform)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = ScPerceiver(config)


@pytest.mark.parametrize("attention", [True, False], ids=["attention", "no-attention"])
def test_diagnose_a_trained_perceiver(attention, tiny_counts, tmp_path):
    from interpret import Diagnosis, diagnose
    from scvit_core.data import add_split
    from scvit_core.likelihood import nll
    from scvit_core.perceiver import PerceiverConfig

    adata = tiny_counts.copy()
    add_split(adata, labels_key="celltype", fractions=(0.6, 0.1, 0.3))
    config = PerceiverConfig.for_genes(
        adata.n_vars, dim=16, n_tokens=4, heads=2, encoder_blocks=1, decoder_blocks=1,
        n_latent=8, attention=attention,
    )  # fmt: skip
    model = PerceiverStandIn(adata, config, seed=0)
    counts = torch.as_tensor(adata.X.toarray(), dtype=torch.float32)
    net = model.model.train()
    optimiser = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for _ in range(5):
        out = net(torch.log1p(counts), library=counts.sum(1))
        loss = (nll(out, counts, likelihood=config.likelihood) + out.kl).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    report = diagnose(model, label_key="celltype", attribution_cells=2, progress=False)
    expected = {"effective_rank", "probes", "beyond_null"}
    if attention:
        expected |= {"entropy", "update_norms", "branches", "sanity", "knockout"}
    assert set(report.tables) == expected  # no stem, token-similarity or gene-token tables
    assert report.description["network"] == "ScPerceiver"
    assert report.description["tokens"] == "genes" and "conv_stem" not in report.description
    probes = report["probes"]
    assert set(probes["state"]) == {"trained", "untrained"}
    assert "latent" in probes["layer"].tolist()
    if attention:
        assert report["branches"]["stage"].tolist() == ["encoder.0", "decoder.0"]
        assert report["sanity"]["passed"].all()
        assert report["entropy"]["layer"].iloc[0] == "encoder.cross"
    assert np.isfinite(list(report.headline().values())).all()
    loaded = Diagnosis.load(report.save(tmp_path / "report"))
    assert set(loaded.tables) == expected
