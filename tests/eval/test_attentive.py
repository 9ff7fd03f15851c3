"""The attentive probe on tokens whose answer is planted: a signal in the token mean, one that only
a position carries (the mean over positions cancels it), a binary label; determinism; bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from jepa_ray.eval import attentive, probes
from jepa_ray.eval.attentive import AttentiveSettings, fit_attentive


def positional(n: int, tokens: int = 8, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Tokens (n, T, D) = a fixed code per position + noise; the target y (n,) is added along one
    direction at position 0 and subtracted, spread evenly, at the others: the mean over positions
    does not depend on y at all."""
    rng = np.random.default_rng(seed)
    pos = rng.standard_normal((tokens, dim))
    u = rng.standard_normal(dim)
    u /= np.linalg.norm(u)
    y = rng.standard_normal(n)
    x = pos + 0.3 * rng.standard_normal((n, tokens, dim))
    x[:, 0] += 2.0 * y[:, None] * u
    x[:, 1:] -= (2.0 * y[:, None] * u / (tokens - 1))[:, None]
    return x.astype(np.float32), y


def test_the_pooler_is_multi_head_attention_with_one_query():
    torch.manual_seed(0)
    dim, heads = 32, 4
    pooler = attentive.AttentivePooler(dim, 3, heads, layernorm=False)
    ref = torch.nn.MultiheadAttention(dim, heads, batch_first=True)
    with torch.no_grad():
        pooler.query.normal_()  # a query far from the uniform start
        qkv = (pooler.q_proj.weight, pooler.k_proj.weight, pooler.v_proj.weight)
        ref.in_proj_weight.copy_(torch.cat(qkv))
        ref.in_proj_bias.copy_(torch.cat([pooler.q_proj.bias, torch.randn(dim), pooler.v_proj.bias]))
        ref.out_proj.load_state_dict(pooler.out_proj.state_dict())
        x = torch.randn(5, 7, dim)
        keep = torch.rand(5, 7) > 0.4
        keep[:, 0] = True
        q = pooler.query.view(1, 1, dim).expand(5, -1, -1)
        expected = pooler.head(ref(q, x, x, key_padding_mask=~keep)[0][:, 0])  # (5, 3)
        assert torch.allclose(pooler(x, keep), expected, atol=1e-5)


def test_recovers_latent_factors_carried_by_the_token_mean_out_of_fold():
    rng = np.random.default_rng(1)
    n = 300
    x = rng.standard_normal((n, 8, 16)).astype(np.float32)
    z = x.mean(1) @ rng.standard_normal((16, 2))  # (n, 2): two factors
    z = z / z.std(0) + 0.2 * rng.standard_normal((n, 2))
    subjects = np.repeat(np.arange(n // 2), 2)  # two samples per subject
    r2 = attentive.cv_attentive_r2(x, z, subjects, folds=3)
    assert len(r2) == 2 and min(r2) > 0.8, r2  # the ceiling is 1 / 1.04 = 0.96


def test_reads_a_position_that_mean_pooling_cannot():
    x, y = positional(600)
    z = np.stack([y, -y], 1)  # (n, 2)
    fit, test = slice(0, 400), slice(400, None)
    res = attentive.attentive_r2(x[fit], z[fit], {"test": (x[test], z[test])})["test"]
    ridge = probes.latent_r2(x[fit].mean(1), z[fit], {"test": (x[test].mean(1), z[test])})["test"]
    assert min(res["r2"]) > 0.8 and res["n"] == 200 and 1 <= res["epochs"] <= 100
    assert max(ridge["r2"]) < 0.2


def test_binary_label_at_one_position():
    x, y = positional(600, seed=2)
    label = (y > 0).astype(int)
    probe = fit_attentive(x[:400], label[:400], task="binary")
    logits = probe.predict(x[400:])
    assert logits.shape == (200,) and roc_auc_score(label[400:], logits) > 0.9
    mean_pooled = probes.logistic_probe(x[:400].mean(1), label[:400])
    assert roc_auc_score(label[400:], mean_pooled(x[400:].mean(1))) < 0.65


def test_dropped_tokens_are_ignored_and_the_seed_fixes_the_result():
    x, y = positional(200, seed=3)
    keep = np.ones(x.shape[:2], bool)
    keep[::2, 5:] = False  # every other sample keeps 5 tokens of 8
    settings = AttentiveSettings(epochs=20, seed=7)
    state = torch.random.get_rng_state()
    a = fit_attentive(x, y, keep, settings=settings)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    b = fit_attentive(x, y, keep, settings=settings)
    np.testing.assert_array_equal(a.predict(x, keep), b.predict(x, keep))
    other = fit_attentive(x, y, keep, settings=AttentiveSettings(epochs=20, seed=8))
    assert not np.array_equal(a.predict(x, keep), other.predict(x, keep))
    # what a dropped token holds changes nothing, neither in fitting nor in prediction
    garbage = x.copy()
    garbage[~keep] = 1e3
    c = fit_attentive(garbage, y, keep, settings=settings)
    np.testing.assert_allclose(c.predict(garbage, keep), a.predict(x, keep), rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise_and_name_the_problem():
    x, y = positional(40)
    with pytest.raises(ValueError, match=r"tokens must be \(N, T, D\), got shape \(40, 128\)"):
        fit_attentive(x.reshape(40, -1), y)
    with pytest.raises(ValueError, match=r"y must be .* N = 40 .*got shape \(39,\)"):
        fit_attentive(x, y[:39])
    with pytest.raises(ValueError, match=r"keep must be \(N, T\) = \(40, 8\), got shape \(40, 7\)"):
        fit_attentive(x, y, np.ones((40, 7), bool))
    keep = np.ones((40, 8), bool)
    keep[3] = False
    with pytest.raises(ValueError, match=r"1 sample\(s\) with no kept token \(first: row 3\)"):
        fit_attentive(x, y, keep)
    with pytest.raises(ValueError, match="3 attention heads do not divide the token width 16"):
        fit_attentive(x, y, settings=AttentiveSettings(heads=3))
    with pytest.raises(ValueError, match="binary label must be one column of 0/1"):
        fit_attentive(x, y, task="binary")
    with pytest.raises(ValueError, match="needs both classes"):
        fit_attentive(x, np.zeros(40), task="binary")
    with pytest.raises(ValueError, match="NaN or infinite targets"):
        fit_attentive(x, np.where(np.arange(40) == 5, np.nan, y))
    with pytest.raises(ValueError, match="groups has 10 entries, tokens have 40"):
        fit_attentive(x, y, groups=np.arange(10))
    with pytest.raises(ValueError, match="tokens have 40 samples, z 40 and groups 39"):
        attentive.cv_attentive_r2(x, y, np.arange(39))
    probe = fit_attentive(x, y, settings=AttentiveSettings(epochs=2))
    with pytest.raises(ValueError, match="tokens have width 8, the probe was fit on 16"):
        probe.predict(x[..., :8])
