"""Float detectors: the layer chain + scoring function reproduce the detector's score, PCA's
statistics are what they claim, the autoencoder is deterministic, the alarm rule is causal."""

from __future__ import annotations

import numpy as np
import pytest
from edgeline.quantize import detectors as dt


def _correlated(n: int = 400, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=n)
    b = rng.normal(size=n)
    noise = 0.05 * rng.normal(size=(n, 5))
    # Two latent factors drive five columns with different units and offsets.
    x = np.column_stack([a, 2 * a + 1, b, 10 * b - a, 0.1 * a + 0.1 * b]) + noise
    return x * np.array([1, 3, 0.01, 50, 7]) + np.array([0, 100, -5, 2, 30])


def test_pca_layers_reproduce_the_score_and_whiten() -> None:
    x = _correlated()
    det = dt.PCADetector(0.95).fit(x)
    assert det.n_components == 2  # two latent factors explain > 95 %
    layers = det.layers()
    assert len(layers) == 1 and layers[0].activation == "none"
    assert layers[0].weights.shape == (2 + 5, 5) and layers[0].W is layers[0].weights
    z = det.scaler.transform(x)
    y = dt.forward(layers, z)
    np.testing.assert_allclose(det.score_from_output(z, y), det.score(x))
    # Whitened projections of the training rows have unit variance; T^2 averages ~k.
    np.testing.assert_allclose(np.var(y[:, :2], axis=0, ddof=1), 1.0, rtol=1e-9)
    t2, q = det.statistics(z, y)
    assert t2.mean() == pytest.approx(2 * 399 / 400, rel=1e-9)
    assert q.mean() == pytest.approx(det.eigenvalues[2:].sum() * 399 / 400, rel=1e-9)
    # A row that breaks the correlation structure scores far above the training rows.
    bad = x[:1].copy()
    bad[0, 1] += 30 * x[:, 1].std()
    assert det.score(bad)[0] > 10 * det.score(x).max()


def test_pca_keeps_at_least_one_and_at_most_d_minus_one_component() -> None:
    x = _correlated()
    assert dt.PCADetector(1e-6).fit(x).n_components == 1
    assert dt.PCADetector(1.0).fit(x).n_components == 4
    with pytest.raises(ValueError, match="explained_variance"):
        dt.PCADetector(0.0)


def test_standardizer_keeps_constant_columns_finite() -> None:
    x = np.column_stack([np.arange(10.0), np.full(10, 3.0)])
    s = dt.Standardizer.fit(x)
    assert s.scale[1] == 1.0
    np.testing.assert_allclose(s.transform(np.array([[4.5, 5.0]])), [[0.0, 2.0]])
    with pytest.raises(ValueError, match="NaN or infinity"):
        dt.Standardizer.fit(np.array([[1.0], [np.nan]]))
    with pytest.raises(ValueError, match="expected 2 columns"):
        s.transform(np.zeros((1, 3)))


def test_autoencoder_is_deterministic_and_learns() -> None:
    x = _correlated(n=300)
    a = dt.AutoencoderDetector((6, 2), epochs=60, seed=4).fit(x)
    b = dt.AutoencoderDetector((6, 2), epochs=60, seed=4).fit(x)
    la, lb = a.layers(), b.layers()
    assert [layer.weights.shape for layer in la] == [(6, 5), (2, 6), (6, 2), (5, 6)]
    assert [layer.activation for layer in la] == ["relu", "relu", "relu", "none"]
    for p, q in zip(la, lb, strict=True):
        np.testing.assert_array_equal(p.weights, q.weights)
        np.testing.assert_array_equal(p.bias, q.bias)
    z = a.scaler.transform(x)
    np.testing.assert_allclose(a.score_from_output(z, dt.forward(la, z)), a.score(x))
    # Reconstructing standardized data from a 2-unit bottleneck beats predicting zeros (loss 1).
    assert a.train_loss < 0.5
    assert a.score(x).mean() == pytest.approx(1.0, rel=1e-9)


def test_dense_layer_checks_shapes() -> None:
    with pytest.raises(ValueError, match="layer shapes disagree"):
        dt.DenseLayer(np.zeros((2, 3)), np.zeros(3))
    with pytest.raises(ValueError, match="unknown activation"):
        dt.DenseLayer(np.zeros((2, 3)), np.zeros(2), "tanh")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="layer 0 takes 3 inputs, got 2"):
        dt.forward([dt.DenseLayer(np.zeros((2, 3)), np.zeros(2))], np.zeros((1, 2)))


def test_hold_by_hand() -> None:
    raw = np.array([0, 1, 0, 0, 0, 1, 1, 0, 0, 0], dtype=bool)
    assert dt.hold_alarms(raw, 2).astype(int).tolist() == [0, 1, 1, 1, 0, 1, 1, 1, 1, 0]
    assert dt.hold_alarms(raw, 0).tolist() == raw.tolist()


def test_alarm_rule_threshold_and_causality() -> None:
    rng = np.random.default_rng(1)
    train = rng.exponential(size=400)
    rule = dt.AlarmRule(smooth=5, quantile=0.99, factor=2.0, hold=3)
    thr = rule.threshold(train)
    assert thr == pytest.approx(2.0 * np.quantile(dt.AlarmRule(smooth=5).smoothed(train), 0.99))
    stream = np.concatenate([train, rng.exponential(size=100), np.full(50, 100.0)])
    alarms = rule.alarms(stream, thr)
    assert alarms[-40:].all()
    # Changing the future never changes a past alarm.
    altered = stream.copy()
    altered[450:] = 0.0
    np.testing.assert_array_equal(rule.alarms(altered, thr)[:450], alarms[:450])


def test_int8_calibration_rows_give_headroom() -> None:
    z = np.random.default_rng(0).normal(size=(50, 3))
    rows = dt.int8_calibration_rows(z, 4.0)
    assert rows.shape == (100, 3)
    assert np.abs(rows).max() == pytest.approx(4 * np.abs(z).max())
