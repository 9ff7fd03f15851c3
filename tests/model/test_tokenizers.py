"""The EHR tokenizer's numeric-value embeddings: distinct values, missing values, continuity, shapes."""

from __future__ import annotations

import pytest
import torch

from jepa_ray.model.tokenizers import (
    NUMERIC_EMBEDDINGS,
    PIECEWISE_EDGES,
    EhrTokenizer,
    InputDims,
    piecewise_linear,
)

DIMS = InputDims(
    image_size=32, patch_size=8, vocab_size=10, n_num=3, cat_sizes=(2, 3), max_static_codes=2, max_events=4
)
WIDTH = 16


def _batch(values: torch.Tensor, present: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """B samples of DIMS's layout: numeric slots hold `values` (B, n_num), events value 0.5 at day 3."""
    b, length = values.shape[0], DIMS.ehr_tokens
    value = torch.zeros(b, length)
    value[:, : DIMS.n_num] = values
    ev = slice(length - DIMS.max_events, None)
    value[:, ev] = 0.5
    code = torch.zeros(b, length, dtype=torch.long)
    code[:, DIMS.n_num + len(DIMS.cat_sizes) :] = 3
    if present is None:
        present = torch.ones(b, DIMS.n_num, dtype=torch.bool)
    value_present = torch.ones(b, length, dtype=torch.bool)
    value_present[:, : DIMS.n_num] = present
    return {
        "ehr_code": code,
        "ehr_value": value,
        "ehr_value_present": value_present,
        "ehr_time": torch.full((b, length), 3.0),
        "ehr_valid": torch.ones(b, length, dtype=torch.bool),
    }


def _tokenizer(numeric: str) -> EhrTokenizer:
    torch.manual_seed(0)
    return EhrTokenizer(DIMS, WIDTH, numeric)


@pytest.mark.parametrize("numeric", NUMERIC_EMBEDDINGS)
def test_shapes_and_positions_carry_no_value(numeric):
    tok = _tokenizer(numeric)
    x, pos = tok(_batch(torch.tensor([[0.1, -1.0, 2.0], [3.0, 0.0, -0.4]])))
    assert x.shape == pos.shape == (2, DIMS.ehr_tokens, WIDTH)
    assert torch.isfinite(x).all()
    assert torch.equal(pos[0], pos[1])  # same layout and event times: the positions are the same


@pytest.mark.parametrize("numeric", NUMERIC_EMBEDDINGS)
def test_distinct_values_give_distinct_tokens_of_that_slot_only(numeric):
    tok = _tokenizer(numeric)
    x, _ = tok(_batch(torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.7, 0.0]])))
    assert not torch.allclose(x[0, 1], x[1, 1])
    others = [i for i in range(DIMS.ehr_tokens) if i != 1]
    assert torch.equal(x[0, others], x[1, others])


@pytest.mark.parametrize("numeric", NUMERIC_EMBEDDINGS)
def test_a_missing_value_uses_the_missing_vector_whatever_the_value(numeric):
    tok = _tokenizer(numeric)
    absent = torch.tensor([[True, False, True], [True, False, True]])
    x, pos = tok(_batch(torch.tensor([[0.0, 5.0, 0.0], [0.0, -2.0, 0.0]]), present=absent))
    assert torch.allclose(x[:, 1], pos[:, 1] + tok.missing)


def test_per_feature_embeddings_differ_for_the_same_value():
    for numeric in ("periodic", "piecewise"):
        tok = _tokenizer(numeric)
        x, pos = tok(_batch(torch.tensor([[0.8, 0.8, 0.8]])))
        content = x[0, :3] - pos[0, :3]
        assert not torch.allclose(content[0], content[1]), numeric


def test_piecewise_encoding_is_continuous_and_monotone_across_bin_edges():
    edges = torch.tensor(PIECEWISE_EDGES)
    x = torch.linspace(-4.0, 4.0, 4001)
    enc = piecewise_linear(x, edges)  # (n, T)
    assert enc.shape == (len(x), len(PIECEWISE_EDGES) - 1)
    assert (enc.diff(dim=0) >= -1e-6).all()  # every component non-decreasing in x
    assert enc.diff(dim=0).abs().max() < 0.02  # no jump anywhere, edges included (step 0.002)
    at = piecewise_linear(edges[1:-1], edges)
    below = piecewise_linear(edges[1:-1] - 1e-4, edges)
    assert torch.allclose(at, below, atol=1e-3)
    inner = piecewise_linear(torch.tensor([0.1]), edges)[0]
    assert (inner[1:-1] >= 0).all() and (inner[1:-1] <= 1).all()
    # distinct values in one bin, and beyond the outer edges, stay distinct
    far = piecewise_linear(torch.tensor([-6.0, -5.0, 5.0, 6.0]), edges)
    assert len({tuple(r.tolist()) for r in far}) == 4


def test_unknown_numeric_embedding_is_refused_naming_it():
    with pytest.raises(ValueError, match="spline"):
        EhrTokenizer(DIMS, WIDTH, "spline")


def test_an_export_without_numeric_embedding_loads_as_linear(tmp_path):
    import json

    from jepa_ray.config import ModelConfig
    from jepa_ray.model.io import load_jepa, save_jepa
    from jepa_ray.model.jepa import JEPA

    torch.manual_seed(0)
    old = JEPA(DIMS, ModelConfig(preset="tiny", width=32, depth=1, heads=2, numeric_embedding="linear"))
    path = save_jepa(old, tmp_path / "old.safetensors", pipeline={})
    meta = json.loads(path.with_suffix(".json").read_text())
    del meta["model"]["numeric_embedding"]  # as written before the field existed
    for other in ("periodic", "piecewise"):  # whatever the default is
        meta["model"]["numeric_embedding"] = other
        path.with_suffix(".json").write_text(json.dumps(meta))
        loaded = load_jepa(path)
        assert loaded.target.ehr.numeric_embedding == "linear"
        batch = _batch(torch.tensor([[0.3, -1.0, 2.0]]))
        assert torch.allclose(loaded.target.ehr(batch)[0], old.target.ehr(batch)[0])
    del meta["model"]["numeric_embedding"]
    path.with_suffix(".json").write_text(json.dumps(meta))
    assert torch.allclose(load_jepa(path).context.ehr(batch)[0], old.context.ehr(batch)[0])


def test_an_event_value_moves_its_token_along_its_own_codes_direction():
    """per_code: a mean over a sample's event tokens tells which of two codes carried the high
    value; shared: it does not (two samples with the same codes, the values swapped between them,
    have the same mean). What per_code adds to an event's token is exactly its value times its
    code's direction, and nothing to the statics' tokens or to the positions."""
    torch.manual_seed(0)
    per_code, shared = (
        EhrTokenizer(DIMS, WIDTH, "periodic", "per_code"),
        EhrTokenizer(DIMS, WIDTH, "periodic"),
    )
    shared.load_state_dict({k: v for k, v in per_code.state_dict().items() if k != "code_values"})
    ev = slice(DIMS.ehr_tokens - DIMS.max_events, None)
    # two samples with the same codes (3 and 4) and values, swapped between the codes
    b = _batch(torch.zeros(2, DIMS.n_num))
    b["ehr_code"][:, ev] = torch.tensor([[3, 3, 4, 4], [3, 3, 4, 4]])
    b["ehr_value"][:, ev] = torch.tensor([[2.0, 2.0, 0.0, 0.0], [0.0, 0.0, 2.0, 2.0]])
    for tok, apart in ((per_code, True), (shared, False)):
        x, _ = tok(b)
        mean = x[:, ev].mean(1)
        assert torch.allclose(mean[0], mean[1], atol=1e-6) != apart
    x, pos = per_code(b)
    y, _ = shared(b)
    expected = 2.0 * per_code.code_values[3]  # sample 0's first event: value 2 of code 3
    assert torch.allclose(x[0, ev][0] - y[0, ev][0], expected, atol=1e-6)
    assert torch.equal(x[:, :4], y[:, :4])  # the statics' tokens are the same
    assert torch.equal(pos, shared(b)[1])  # positions carry no value


def test_an_event_without_a_value_or_a_padding_slot_gets_no_code_value():
    tok = EhrTokenizer(DIMS, WIDTH, "periodic", "per_code")
    b = _batch(torch.zeros(1, DIMS.n_num))
    ev = slice(DIMS.ehr_tokens - DIMS.max_events, None)
    b["ehr_value_present"][:, ev] = False
    b["ehr_value"][:, ev] = 0.0
    b["ehr_code"][0, -1] = 0  # padding
    x, _ = tok(b)
    plain = EhrTokenizer(DIMS, WIDTH, "periodic")
    plain.load_state_dict({k: v for k, v in tok.state_dict().items() if k != "code_values"})
    assert torch.equal(x, plain(b)[0])


def test_unknown_event_values_are_refused_naming_them():
    with pytest.raises(ValueError, match="by_unit"):
        EhrTokenizer(DIMS, WIDTH, "periodic", "by_unit")


def test_an_export_without_event_values_loads_as_shared(tmp_path):
    import json

    from jepa_ray.config import ModelConfig
    from jepa_ray.model.io import load_jepa, save_jepa
    from jepa_ray.model.jepa import JEPA

    torch.manual_seed(0)
    old = JEPA(DIMS, ModelConfig(preset="tiny", width=32, depth=1, heads=2, event_values="shared"))
    assert ModelConfig().event_values == "per_code"  # what a config that does not say gives
    path = save_jepa(old, tmp_path / "old.safetensors", pipeline={})
    meta = json.loads(path.with_suffix(".json").read_text())
    del meta["model"]["event_values"]  # as written before the field existed
    path.with_suffix(".json").write_text(json.dumps(meta))
    loaded = load_jepa(path)
    assert loaded.target.ehr.event_values == "shared" and not hasattr(loaded.target.ehr, "code_values")
    b = _batch(torch.tensor([[0.3, -1.0, 2.0]]))
    assert torch.allclose(loaded.target.ehr(b)[0], old.target.ehr(b)[0])
    # evaluate's random-init baseline of that export has its shape and its start: the run's own
    # initial weights, drawn from the same seed
    from jepa_ray.eval.embed import EncoderSource

    start = EncoderSource("random_init", None, meta, seed=0).build()
    assert start.target.ehr.event_values == "shared"
    for name, w in old.state_dict().items():
        torch.testing.assert_close(start.state_dict()[name], w, msg=name)
    new = JEPA(DIMS, ModelConfig(preset="tiny", width=32, depth=1, heads=2))
    path = save_jepa(new, tmp_path / "new.safetensors", pipeline={})
    again = load_jepa(path)
    assert again.target.ehr.event_values == "per_code"
    assert torch.equal(again.target.ehr.code_values, new.target.ehr.code_values)
