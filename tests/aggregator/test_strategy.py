from __future__ import annotations

import numpy as np

from aggregator.strategy import FedAvg, Reply, weighted_mean


def test_weighted_mean_and_fedavg() -> None:
    rng = np.random.default_rng(0)
    g = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32)}
    reps = [Reply(f"d{i}", n, {k: rng.normal(size=v.shape).astype(np.float32) for k, v in g.items()}) for i, n in enumerate((1, 3, 6))]
    m = weighted_mean(reps)
    for k in g:
        want = (1 * reps[0].delta[k] + 3 * reps[1].delta[k] + 6 * reps[2].delta[k]) / 10
        np.testing.assert_allclose(m[k], want, rtol=1e-5, atol=1e-7)
    new = FedAvg(server_lr=0.5).aggregate(g, reps)
    for k in g:
        np.testing.assert_allclose(new[k], g[k] + 0.5 * m[k], rtol=1e-5, atol=1e-7)


def test_configure_round_samples_deterministically() -> None:
    s = FedAvg(clients_per_round=2, seed=1)
    online = [f"d{i}" for i in range(6)]
    assert s.configure_round(1, online) == s.configure_round(1, list(reversed(online)))
    assert len(s.configure_round(1, online)) == 2
    assert FedAvg().configure_round(1, online) == sorted(online)


def _mean_of(g: dict, scale: float) -> dict:
    return {k: np.full_like(v, scale) for k, v in g.items()}


def test_fedavgm_accumulates_momentum() -> None:
    from aggregator.strategy import FedAvgM

    g = {"a": np.zeros(3, np.float32)}
    s = FedAvgM(server_lr=1.0, momentum=0.5)
    g1 = s.aggregate_mean(g, _mean_of(g, 1.0))  # v = 1
    g2 = s.aggregate_mean(g1, _mean_of(g, 1.0))  # v = 0.5 + 1
    np.testing.assert_allclose(g1["a"], 1.0)
    np.testing.assert_allclose(g2["a"], 2.5)


def test_fedadam_follows_reddi_et_al() -> None:
    from aggregator.strategy import FedAdam

    g = {"a": np.zeros(2, np.float32)}
    s = FedAdam(server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    d = {"a": np.array([0.5, -0.02], np.float32)}
    out = s.aggregate_mean(g, d)
    m = 0.1 * d["a"].astype(np.float64)
    v = 0.01 * d["a"].astype(np.float64) ** 2
    np.testing.assert_allclose(out["a"], 0.1 * m / (np.sqrt(v) + 1e-3), rtol=1e-5)
    # Adaptive: the step's size hardly depends on the update's scale (unlike FedAvg's).
    assert abs(out["a"][0]) / abs(out["a"][1]) < 2


def test_optimizer_state_survives_a_restart() -> None:
    from aggregator.strategy import FedAdam, make_strategy

    g = {"a": np.zeros(2, np.float32), "b": np.ones(3, np.float32)}
    d = {"a": np.array([0.3, -0.1], np.float32), "b": np.array([0.1, 0.2, 0.3], np.float32)}
    s1 = FedAdam(server_lr=0.05)
    s1.aggregate_mean(g, d)
    s2 = make_strategy("fedadam", server_lr=0.05, clients_per_round=0, seed=0)
    s2.load_state_arrays(s1.state_arrays())
    a, b = s1.aggregate_mean(g, d), s2.aggregate_mean(g, d)
    for k in g:
        np.testing.assert_array_equal(a[k], b[k])
