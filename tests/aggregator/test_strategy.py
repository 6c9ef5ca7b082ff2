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
