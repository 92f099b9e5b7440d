"""Calibration metrics against torchmetrics and hand-written float64 numpy oracles; streaming
bins against one-shot; temperature scaling against scipy and a known temperature; the PNG."""

import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar
from torchmetrics.functional.classification import binary_calibration_error, multiclass_calibration_error

from ls_jax import calibration as C
from ls_jax.logit_stats import BlockSizes

IGNORE = -100


def random_problem(n, k, seed=0, scale=2.0):
    """float64 logits [n, k], probabilities [n, k], labels [n] drawn from the probabilities."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, k)) * scale
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = np.array([rng.choice(k, p=row) for row in p])
    return z, p, y


def softmax64(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ------------------------------------------------------------------------- numpy oracles


def oracle_width_bins(conf, correct, n_bins):
    """Per-bin (count, mean conf, accuracy) by explicit comparisons with the float32 edges
    k / n: lo <= c < hi, and c == 1.0 in an extra last bin."""
    edges = [np.float32(k / n_bins) for k in range(n_bins + 1)]
    members = [[] for _ in range(n_bins + 1)]
    for i, c in enumerate(np.asarray(conf, np.float32)):
        if c == 1.0:
            members[n_bins].append(i)
            continue
        for b in range(n_bins):
            if edges[b] <= c < edges[b + 1]:
                members[b].append(i)
    return [np.asarray(m, int) for m in members]


def oracle_errors(conf, correct, groups):
    """(ece, rms, mce) in float64 of index groups."""
    conf, correct = np.asarray(conf, np.float64), np.asarray(correct, np.float64)
    n = sum(len(g) for g in groups)
    gaps = [(len(g), abs(conf[g].mean() - correct[g].mean())) for g in groups if len(g)]
    ece = sum(c * g for c, g in gaps) / n
    rms = np.sqrt(sum(c * g * g for c, g in gaps) / n)
    return ece, rms, max(g for _, g in gaps)


def oracle_mass_groups(conf, n_bins):
    return np.array_split(np.argsort(np.asarray(conf, np.float32), kind="stable"), n_bins)


def top_label64(p, y):
    return p.max(1), p.argmax(1) == y


NORMS_AT = {"l1": 0, "l2": 1, "max": 2}  # index into oracle_errors' (ece, rms, mce)


def assert_close(actual, expected, tol=2e-6):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=tol, atol=tol)


# -------------------------------------------------------------- top-label vs torchmetrics


@pytest.mark.parametrize("n_bins", [10, 15])
@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
def test_top_label_errors_match_torchmetrics(n_bins, norm):
    z, p, y = random_problem(400, 7, seed=n_bins)
    expected = multiclass_calibration_error(
        torch.tensor(p, dtype=torch.float32), torch.tensor(y), 7, n_bins=n_bins, norm=norm
    )
    p32, z32 = p.astype(np.float32), z.astype(np.float32)
    assert_close(C.calibration_error(p32, y, n_bins=n_bins, norm=norm), float(expected))
    assert_close(C.calibration_error(z32, y, n_bins=n_bins, norm=norm, from_logits=True), float(expected), 1e-5)
    conf, hit = top_label64(p, y)
    assert_close(
        C.calibration_error(p32, y, n_bins=n_bins, norm=norm),
        oracle_errors(conf, hit, oracle_width_bins(conf, hit, n_bins))[NORMS_AT[norm]],
    )


def test_edge_confidences_follow_torchmetrics_bins():
    """Every edge k/10 (0 and 1 included) opens the bin above it; 1.0 has its own bin.
    (n_bins = 10: torch.linspace's float32 edges equal the correctly rounded k / 10.)"""
    n_bins = 10
    rng = np.random.default_rng(3)
    conf = np.concatenate([C.bin_edges(n_bins), C.bin_edges(n_bins), rng.uniform(size=30)]).astype(np.float32)
    hit = rng.uniform(size=conf.size) < 0.6
    bins = C.bin_statistics(conf, hit, n_bins=n_bins)
    assert bins.count.shape == (n_bins + 1,)
    groups = oracle_width_bins(conf, hit, n_bins)
    np.testing.assert_array_equal(bins.count, [len(g) for g in groups])
    for k in range(n_bins + 1):  # edge k lies in bin k (each edge appears twice)
        assert bins.count[k] >= 2
    e = C.errors_from_bins(bins)
    for norm, key in [("l1", "ece"), ("l2", "rms"), ("max", "mce")]:
        expected = binary_calibration_error(
            torch.tensor(conf), torch.tensor(hit.astype(np.int64)), n_bins=n_bins, norm=norm
        )
        assert_close(e[key], float(expected))
        assert_close(e[key], oracle_errors(conf, hit, groups)[NORMS_AT[norm]])


def test_edges_zero_and_one_with_default_bins():
    conf = np.array([0.0, 0.0, 1.0, 1.0, 1.0, 0.5], np.float32)
    hit = np.array([0, 1, 1, 1, 0, 1], bool)
    bins = C.bin_statistics(conf, hit)  # 15 bins
    assert bins.count[0] == 2 and bins.count[15] == 3 and bins.count[7] == 1 and bins.count.sum() == 6
    expected = binary_calibration_error(torch.tensor(conf), torch.tensor(hit.astype(np.int64)), n_bins=15)
    assert_close(C.errors_from_bins(bins)["ece"], float(expected))


# ------------------------------------------------------ equal-mass, classwise, Brier, NLL


@pytest.mark.parametrize("n,n_bins", [(400, 15), (37, 10), (5, 8)])
def test_equal_mass_matches_numpy_oracle(n, n_bins):
    _, p, y = random_problem(n, 5, seed=n)
    conf, hit = top_label64(p, y)
    ece, rms, mce = oracle_errors(conf, hit, oracle_mass_groups(conf, n_bins))
    p32 = p.astype(np.float32)
    assert_close(C.calibration_error(p32, y, n_bins=n_bins, binning="mass"), ece)
    assert_close(C.calibration_error(p32, y, n_bins=n_bins, binning="mass", norm="l2"), rms)
    assert_close(C.calibration_error(p32, y, n_bins=n_bins, binning="mass", norm="max"), mce)
    counts = C.bin_statistics(conf, hit, n_bins=n_bins, binning="mass").count
    np.testing.assert_array_equal(counts[:n_bins], [len(g) for g in oracle_mass_groups(conf, n_bins)])


def test_classwise_brier_nll_accuracy_match_oracles():
    z, p, y = random_problem(300, 6, seed=11)
    p32, z32 = p.astype(np.float32), z.astype(np.float32)
    classwise = np.mean([oracle_errors(p[:, k], y == k, oracle_width_bins(p[:, k], y == k, 15))[0] for k in range(6)])
    torch_classwise = np.mean(
        [
            float(binary_calibration_error(torch.tensor(p32[:, k]), torch.tensor((y == k).astype(np.int64)), n_bins=15))
            for k in range(6)
        ]
    )
    brier = np.mean(((p - np.eye(6)[y]) ** 2).sum(1))
    nll = -np.mean(np.log(p[np.arange(300), y]))
    acc = np.mean(p.argmax(1) == y)
    for scores, logits in [(p32, False), (z32, True)]:
        assert_close(C.classwise_calibration_error(scores, y, from_logits=logits), classwise, 1e-5)
        assert_close(C.classwise_calibration_error(scores, y, from_logits=logits), torch_classwise, 1e-5)
        assert_close(C.brier_score(scores, y, from_logits=logits), brier, 1e-5)
        assert_close(C.negative_log_likelihood(scores, y, from_logits=logits), nll, 1e-5)
        assert_close(C.accuracy(scores, y, from_logits=logits), acc)
    report = C.calibration_report(p32, y)
    assert report.count == 300
    assert_close(report.classwise_ece, classwise, 1e-5)
    assert_close(report.brier, brier, 1e-5)
    assert_close(report.nll, nll, 1e-5)
    assert_close(report.accuracy, acc)
    assert_close(report.mean_confidence, p.max(1).mean(), 1e-5)
    d = report.to_dict()
    assert sum(d["bins"]["count"]) == 300 and len(d["bins"]["accuracy"]) == 16


# --------------------------------------------------------------------------- edge cases


def test_empty_bins_all_correct_single_sample():
    # all samples in one bin: ECE = |mean conf - accuracy| of that bin, other bins empty
    conf = np.array([0.68, 0.69, 0.70, 0.71], np.float32)  # all in [10/15, 11/15)
    hit = np.array([1, 0, 1, 1], bool)
    e = C.errors_from_bins(C.bin_statistics(conf, hit))
    assert_close(e["ece"], abs(conf.astype(np.float64).mean() - 0.75))
    assert_close(e["mce"], abs(conf.astype(np.float64).mean() - 0.75))
    # all correct with one-hot probabilities: perfectly calibrated
    p = np.eye(4, dtype=np.float32)[[0, 2, 1, 3, 3]]
    y = np.array([0, 2, 1, 3, 3])
    for norm in ("l1", "l2", "max"):
        assert float(C.calibration_error(p, y, norm=norm)) == 0.0
    assert float(C.brier_score(p, y)) == 0.0 and float(C.accuracy(p, y)) == 1.0
    # single sample
    p1 = np.array([[0.2, 0.8]], np.float32)
    assert_close(C.calibration_error(p1, np.array([0])), 0.8)
    assert_close(C.calibration_error(p1, np.array([1]), binning="mass"), 0.2)
    assert_close(C.brier_score(p1, np.array([0])), 0.8**2 * 2)


def test_no_valid_sample_gives_zero_not_nan():
    _, p, y = random_problem(10, 3)
    none = np.zeros(10, bool)
    values = [C.calibration_error(p, y, where=none, norm=nm) for nm in ("l1", "l2", "max")]
    values += [
        C.calibration_error(p, y, where=none, binning="mass"),
        C.brier_score(p, y, where=none),
        C.negative_log_likelihood(p, y, where=none),
        C.accuracy(p, y, where=none),
    ]
    assert all(float(v) == 0.0 for v in values)


def test_empty_input_gives_zero():
    p, y = np.zeros((0, 3), np.float32), np.zeros((0,), np.int32)
    report = C.calibration_report(p, y)
    assert report.count == 0
    assert [report.ece, report.ece_equal_mass, report.brier, report.nll, report.classwise_ece] == [0.0] * 5


def test_metrics_work_inside_an_outer_jit():
    _, p, y = random_problem(60, 4, seed=12)
    p = p.astype(np.float32)

    @jax.jit
    def all_metrics(p, y):
        return (
            C.calibration_error(p, y, norm="l2"),
            C.calibration_error(p, y, binning="mass"),
            C.classwise_calibration_error(p, y),
            C.brier_score(p, y),
            C.fit_temperature(jnp.log(p), y),
        )

    eager = (
        C.calibration_error(p, y, norm="l2"),
        C.calibration_error(p, y, binning="mass"),
        C.classwise_calibration_error(p, y),
        C.brier_score(p, y),
        C.fit_temperature(np.log(p), y),
    )
    for a, b in zip(all_metrics(p, y), eager):
        assert_close(a, float(b), 1e-6)


def test_where_equals_subsetting():
    z, p, y = random_problem(200, 5, seed=4)
    keep = np.random.default_rng(0).uniform(size=200) < 0.6
    for binning in ("width", "mass"):
        assert_close(
            C.calibration_error(p, y, where=keep, binning=binning),
            float(C.calibration_error(p[keep], y[keep], binning=binning)),
        )
    assert_close(
        C.negative_log_likelihood(z, y, from_logits=True, where=keep),
        float(C.negative_log_likelihood(z[keep], y[keep], from_logits=True)),
        1e-6,
    )


def test_bad_input():
    p = np.full((3, 4), 0.25, np.float32)
    with pytest.raises(ValueError, match="labels must lie in"):
        C.calibration_error(p, np.array([0, 4, 1]))
    with pytest.raises(ValueError, match="need scores"):
        C.brier_score(p, np.array([0, 1]))
    with pytest.raises(ValueError, match="integer"):
        C.accuracy(p, np.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="norm"):
        C.calibration_error(p, np.array([0, 1, 2]), norm="l3")
    with pytest.raises(ValueError, match="binning"):
        C.bin_statistics(p[:, 0], np.ones(3, bool), binning="quantile")
    with pytest.raises(ValueError, match="n_bins"):
        C.bin_edges(0)


# ------------------------------------------------------------------------------ streaming


def test_streamed_bins_equal_one_shot():
    _, p, y = random_problem(300, 4, seed=5)
    conf, hit = top_label64(p, y)
    conf = conf.astype(np.float32)
    whole = C.bin_statistics(conf, hit)
    parts = [C.bin_statistics(conf[a:b], hit[a:b]) for a, b in [(0, 77), (77, 78), (78, 300)]]
    merged = parts[0].merge(parts[1]).merge(parts[2])
    np.testing.assert_array_equal(merged.count, whole.count)
    np.testing.assert_array_equal(merged.correct_sum, whole.correct_sum)
    assert_close(merged.confidence_sum, np.asarray(whole.confidence_sum), 1e-6)
    assert_close(C.errors_from_bins(merged)["ece"], float(C.calibration_error(p.astype(np.float32), y)), 1e-6)


@pytest.mark.parametrize("impl,softcap", [("xla", None), ("reference", 5.0), ("xla", 5.0)])
def test_token_calibration_matches_dense_logits(impl, softcap):
    """Blockwise token bins (V = 70 in blocks of 16) against float64 dense logits, streamed by rows."""
    k = jax.random.split(jax.random.key(7), 3)
    h = jax.random.normal(k[0], (3, 11, 16))
    w = jax.random.normal(k[1], (70, 16)) * 0.6
    y = jax.random.randint(k[2], (3, 11), 0, 70).at[:, :4].set(IGNORE).at[2, 9:].set(IGNORE)
    z = np.asarray(h, np.float64) @ np.asarray(w, np.float64).T
    if softcap is not None:
        z = softcap * np.tanh(z / softcap)
    y_np = np.asarray(y)
    valid = y_np != IGNORE
    pv = softmax64(z)[valid]
    conf, hit = pv.max(1), pv.argmax(1) == y_np[valid]
    nll = -np.log(pv[np.arange(len(pv)), y_np[valid]]).mean()
    brier = ((pv - np.eye(70)[y_np[valid]]) ** 2).sum(1).mean()

    opts = dict(impl=impl, blocks=BlockSizes(block_v=16), logit_softcap=softcap)
    whole = C.token_calibration(h, w, y, **opts)
    streamed = C.token_calibration(h[:1], w, y[:1], **opts)
    for r in (1, 2):
        streamed = streamed.merge(C.token_calibration(h[r : r + 1], w, y[r : r + 1], **opts))
    for bins in (whole, streamed):
        report = C.CalibrationReport.from_bins(bins)
        assert report.count == valid.sum()
        np.testing.assert_array_equal(bins.count, [len(g) for g in oracle_width_bins(conf, hit, 15)])
        ece, rms, mce = oracle_errors(conf, hit, oracle_width_bins(conf, hit, 15))
        assert_close(report.ece, ece, 1e-5)
        assert_close(report.rms_calibration_error, rms, 1e-5)
        assert_close(report.max_calibration_error, mce, 1e-5)
        assert_close(report.accuracy, hit.mean())
        assert_close(report.nll, nll, 1e-5)
        assert_close(report.brier, brier, 1e-5)
    assert C.CalibrationReport.from_bins(C.token_calibration(h, w, y, with_brier=False, **opts)).brier is None


# -------------------------------------------------------------------- temperature scaling


def test_temperature_scaling_recovers_known_temperature():
    rng = np.random.default_rng(8)
    t_true = 2.5
    z = rng.normal(size=(20000, 10)) * 4.0
    p = softmax64(z / t_true)
    y = (p.cumsum(1) > rng.uniform(size=(20000, 1))).argmax(1)
    t = float(C.fit_temperature(z.astype(np.float32), y))
    assert abs(t - t_true) / t_true < 0.03

    def nll64(log_t):
        zt = z / np.exp(log_t)
        return np.mean(np.log(np.exp(zt - zt.max(1, keepdims=True)).sum(1)) + zt.max(1) - zt[np.arange(len(y)), y])

    best = np.exp(
        minimize_scalar(nll64, bounds=(np.log(0.1), np.log(10.0)), method="bounded", options={"xatol": 1e-9}).x
    )
    assert abs(t - best) / best < 1e-3
    before = C.negative_log_likelihood(z, y, from_logits=True)
    after = C.negative_log_likelihood(C.apply_temperature(z, t), y, from_logits=True)
    assert float(after) < float(before)
    assert float(C.calibration_error(C.apply_temperature(z, t), y, from_logits=True)) < 0.02


def test_temperature_respects_where_and_bounds():
    rng = np.random.default_rng(9)
    z = rng.normal(size=(3000, 5)) * 3.0
    y = (softmax64(z / 0.5).cumsum(1) > rng.uniform(size=(3000, 1))).argmax(1)
    keep = rng.uniform(size=3000) < 0.5
    assert_close(C.fit_temperature(z, y, where=keep), float(C.fit_temperature(z[keep], y[keep])), 1e-5)
    # a perfectly separated set wants T -> 0: the fit stops at the lower bound
    sep = np.eye(5)[y]
    assert_close(C.fit_temperature(sep, y, bounds=(0.1, 10.0)), 0.1, 1e-4)
    # also with the default bounds, where the float32 NLL is flat (exactly 0) well above T = 0.01
    assert_close(C.fit_temperature(sep, y), 0.01, 1e-4)


# --------------------------------------------------------------------- reliability diagram


def test_reliability_diagram_writes_png(tmp_path):
    _, p, y = random_problem(500, 4, seed=10)
    p = np.concatenate([p, np.eye(4)[y[:20]]]).astype(np.float32)  # 20 samples at confidence 1.0
    y = np.concatenate([y, y[:20]])
    report = C.calibration_report(p, y)
    assert report.bins.count[-1] == 20
    path = C.reliability_diagram(report.bins, tmp_path / "rel.png", title="random")
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (500, 600)
    assert 5_000 < len(data) < 500_000
