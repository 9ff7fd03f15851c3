"""A sweep's search space: checked against the config's own limits, turned into Ray Tune's.

Every swept key is an ordinary config key (`pipeline.mask.mask_ratio`, `model.predictor_depth`,
`train.lr`, ...). Before any trial starts, each value a dimension can take — every listed value, a
range's ends and its midpoint — is put into the base config and validated by the same pydantic
models as a config file, so `mask_ratio: 1.2` or a depth of 0 fails with the key's own message.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

from pydantic import ValidationError

from jepa_ray.config import Config, SearchDim, format_validation_error, set_path
from jepa_ray.errors import ConfigError

# keys a trial must not change: where data and runs live, and the sweep's own settings
_FIXED = (
    "tune.",
    "synth.",
    "prepare.",
    "eval.",
    "train.shards",
    "train.storage",
    "train.name",
    "ray_address",
)
_MAX_GRID_CHECK = 4096
# at a SIGReg weight of at least this, SIGReg's gradient on the image encoder's weights outweighs
# the prediction's: the predictor's shape then does not change the image encoder (benchmarks/README.md,
# Sweeps: at the former statistic's weight 0.05, ~0.94 in today's units, the depths' encoders read the
# same to within 0.0003 R²; 0.25 is the former threshold 1e-3 at ~310 tokens a step)
SIGREG_OWNS_ENCODER = 0.25


def predictor_sweep_warning(cfg: Config) -> str | None:
    """A warning for a space that varies the predictor's shape while SIGReg, at every swept weight,
    is heavy enough to train the image encoder alone; None otherwise."""
    space = cfg.tune.space
    swept = sorted(k for k in space if k.startswith("model.predictor_"))
    if not swept:
        return None
    weights = space["model.sigreg"].candidates() if "model.sigreg" in space else [cfg.model.sigreg]
    if min(weights) < SIGREG_OWNS_ENCODER:
        return None
    return (
        f"tune.space sweeps {', '.join(swept)} at model.sigreg >= {min(weights):g}: on image data "
        f"SIGReg's gradient then trains the image encoder alone, and every predictor shape yields the "
        f"same encoder (the trials differ only in their predictors; docs/sweeps.md). Sweep "
        f"model.sigreg below {SIGREG_OWNS_ENCODER:g} with it, or sweep something else."
    )


def _leaf_exists(data: dict[str, Any], key: str) -> bool:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return not isinstance(node, dict)


def with_params(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A copy of a config dict (`Config.model_dump(mode="json")`) with dotted keys set."""
    data = copy.deepcopy(base)
    for key, value in params.items():
        set_path(data, key, value)
    return data


def trial_config(base: dict[str, Any], params: dict[str, Any]) -> Config:
    """The validated config of one trial."""
    try:
        return Config.model_validate(with_params(base, params))
    except ValidationError as e:
        shown = ", ".join(f"{k}={v!r}" for k, v in params.items())
        raise ConfigError(format_validation_error(e, f"trial {shown}")) from None


def _probe_values(dim: SearchDim) -> list[Any]:
    values = dim.candidates()
    if dim.uniform is not None or dim.loguniform is not None:
        values.append((values[0] + values[1]) / 2)  # an int key given a float range fails here
    return values


def check_space(cfg: Config) -> None:
    """ConfigError, naming the key and the value, for anything in `tune.space` a trial could not run."""
    tc = cfg.tune
    if not tc.space:
        raise ConfigError(
            "tune.space is empty: give at least one dimension, e.g. "
            "tune.space={pipeline.mask.mask_ratio: {values: [0.4, 0.6]}}"
        )
    base = cfg.model_dump(mode="json")
    for key, dim in tc.space.items():
        if key.startswith(_FIXED) or key in ("log_level",):
            raise ConfigError(f"tune.space.{key}: this key cannot be swept (trials share it)")
        if not _leaf_exists(base, key):
            raise ConfigError(f"tune.space.{key}: no such config key (see jepa_ray/config.py)")
        for value in _probe_values(dim):
            try:
                Config.model_validate(with_params(base, {key: value}))
            except ValidationError as e:
                reasons = "; ".join(
                    f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()
                )
                raise ConfigError(f"tune.space.{key}: value {value!r} is not allowed ({reasons})") from None
    if tc.searcher == "grid":
        ranged = [k for k, d in tc.space.items() if d.values is None]
        if ranged:
            raise ConfigError(
                f"tune.searcher=grid needs a list of values for every key; {', '.join(ranged)} "
                "is a range (use searcher random or optuna, or list values)"
            )
        combos = list(
            itertools.islice(itertools.product(*(d.values for d in tc.space.values())), _MAX_GRID_CHECK)
        )
        for combo in combos:  # values valid alone can clash (e.g. min context vs grid size)
            trial_config(base, dict(zip(tc.space, combo, strict=True)))
    ts = cfg.train
    if cfg.tune.asha.enabled and cfg.tune.asha.grace_period >= ts.steps:
        raise ConfigError(
            f"tune.asha.grace_period={cfg.tune.asha.grace_period} is not below train.steps={ts.steps}: "
            "ASHA could never stop a trial early (lower it, or set tune.asha.enabled=false)"
        )


def trials_planned(cfg: Config) -> int:
    """How many trials the sweep runs."""
    tc = cfg.tune
    if tc.searcher == "grid":
        n = 1
        for d in tc.space.values():
            n *= len(d.values)
        return n * tc.num_samples
    return tc.num_samples


def typed_values(cfg: Config, key: str, values: list[Any]) -> list[Any]:
    """`values` as the config reads them at `key` (YAML reads 1e-5 as the string '1e-05', which the
    config turns into a float): so a trial's parameters, the results table and best.yaml hold numbers."""
    base = cfg.model_dump(mode="json")
    out = []
    for value in values:
        node: Any = Config.model_validate(with_params(base, {key: value})).model_dump(mode="json")
        for part in key.split("."):
            node = node[part]
        out.append(node)
    return out


def tune_space(cfg: Config) -> dict[str, Any]:
    """Ray Tune's param_space: dotted key -> grid_search / a sampler."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, d in cfg.tune.space.items():
        if d.values is not None:
            values = typed_values(cfg, key, list(d.values))
            out[key] = tune.grid_search(values) if cfg.tune.searcher == "grid" else tune.choice(values)
        elif d.uniform is not None:
            out[key] = tune.uniform(*d.uniform)
        elif d.loguniform is not None:
            out[key] = tune.loguniform(*d.loguniform)
        else:
            lo, hi = d.randint
            out[key] = tune.randint(lo, hi + 1)  # Tune's upper bound is exclusive
    return out
