"""Frozen embeddings of the evaluation splits: Ray Data batch inference, cached as parquet.

    open_split(data, split) -> build_dataset(train=False)      # the training pipeline, no augmentation
      -> union of the splits to embed, rows tagged by split    # one execution for all the encoders
      -> map_batches(Embedder, concurrency=eval.actors)        # an actor pool, each holding them all
      -> <out>/embeddings/<encoder>/<split>.parquet            # streamed to disk batch by batch

Per sample (one row): the key and safe metadata, pooled embeddings of the target encoder seeing the
image only, the EHR only and both; its image tokens average-pooled to a coarse grid and its EHR
tokens (for the fusion heads); the raw EHR arrays (for the classical baseline); and four vectors
for cross-modal retrieval, pooled over fixed query slots:

    q_img2ehr  predictor(context encoder on the image alone) at the static EHR slots
    g_ehr      layer-normed target encoder on the EHR alone, at the same slots
    q_ehr2img  predictor(context encoder on the EHR alone) at every patch position
    g_img      layer-normed target encoder on the image alone, every patch

The query slots carry no content of the hidden modality: static-feature slots and patch positions
are the same for every sample (event slots would carry event times, so they are used only when a
data set has no static features).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jepa_ray.config import Config, PipelineConfig, ReadEncoder
from jepa_ray.console import ray_data_progress
from jepa_ray.errors import ConfigError

log = logging.getLogger("jepa_ray.eval")

POOLED = ("emb_image", "emb_ehr", "emb_joint", "q_img2ehr", "g_ehr", "q_ehr2img", "g_img")
EHR_ARRAYS = ("ehr_code", "ehr_value", "ehr_value_present", "ehr_valid")
SPLIT = "_split"  # the column routing each embedded row to its split's file (not written)


@dataclass(frozen=True)
class EncoderSource:
    """Which weights an `Embedder` holds: an exported file, or a seeded random init of a shape."""

    name: str  # "pretrained" or "random_init": the cache folder and the report's label
    weights: str | None  # exported .safetensors (its .json beside), or None for a random init
    info: dict[str, Any]  # the export's JSON: dims, model config, pipeline settings
    seed: int = 0

    def fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps(self.info, sort_keys=True).encode())
        if self.weights is not None:
            with open(self.weights, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        else:
            h.update(f"random:{self.seed}".encode())
        return h.hexdigest()[:16]

    def build(self):
        """The JEPA in eval mode (plain PyTorch)."""
        import torch

        from jepa_ray.model.io import export_model_config, load_jepa
        from jepa_ray.model.jepa import JEPA

        if self.weights is not None:
            return load_jepa(self.weights)
        torch.manual_seed(self.seed)
        return JEPA(self.info["dims"], export_model_config(self.info["model"])).eval()


def eval_pipeline(cfg: Config, info: dict[str, Any]) -> PipelineConfig:
    """The pipeline settings the encoder was trained with (image size, patches, EHR lengths)."""
    return PipelineConfig.model_validate(cfg.pipeline.model_dump() | info["pipeline"])


class Embedder:
    """Ray Data actor: an encoder, transformed numpy batches in, embedding columns out. Given a
    list of encoders it holds them all and names each one's columns `<i>/<column>` (i: its place
    in the list): the batch is read and transformed once for all of them."""

    def __init__(
        self,
        source: EncoderSource | list[EncoderSource],
        regions: int,
        use_gpu: bool,
        encoder: ReadEncoder = "target",
    ) -> None:
        import torch

        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.several = isinstance(source, list)
        self.models = [s.build().to(self.device) for s in (source if self.several else [source])]
        self.regions = regions
        self.encoder = encoder  # which of each export's encoders is read (eval.encoder)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from jepa_ray.stream.pipeline import collate

        b = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in collate(batch).items()}
        out = {}
        with torch.no_grad():
            for i, model in enumerate(self.models):
                cols = embed_batch(model, b, self.regions, self.encoder)
                out |= {f"{i}/{k}" if self.several else k: v.cpu().numpy() for k, v in cols.items()}
        out["key"], out["meta"] = batch["key"], batch["meta"]
        for passed in (SPLIT, "shard"):  # routing columns, when the dataset carries them
            if passed in batch:
                out[passed] = batch[passed]
        for name in EHR_ARRAYS:
            out[name] = batch[name]
        return out


def embed_batch(model, b: dict[str, Any], regions: int, encoder: ReadEncoder = "target") -> dict[str, Any]:
    """Every embedding column of one collated batch (torch, no grad); `encoder`: the model's target
    or context encoder gives the embeddings (the retrieval predictions always use the context
    encoder and predictor, as in training)."""
    import torch
    import torch.nn.functional as F

    from jepa_ray.model.jepa import gather, image_slots

    dims, width = model.dims, model.width
    n, bsz = dims.patches, b["image"].shape[0]
    image, ehr, joint = (model.encode(b, m, encoder) for m in ("image", "ehr", "both"))
    patches = image["tokens"][:, 1 : 1 + n]  # (B, N, D)
    img_tokens = _regions(patches, dims, regions, b.get("is_volume"))
    ehr_tokens = _ehr_slots(model, b, ehr)  # (B, L, D), zeros at padding
    ehr_keep = b["ehr_valid"] & b["has_ehr"].unsqueeze(-1)

    # retrieval: fixed query slots, predictions from the context encoder + predictor
    n_static = dims.n_num + len(dims.cat_sizes)
    slots = torch.zeros_like(ehr_keep)
    slots[:, :n_static] = True
    slots = slots & ehr_keep if n_static else ehr_keep
    all_patches = torch.arange(n, device=b["image"].device).expand(bsz, n)
    grid = image_slots(b, dims, with_image_only=False)  # each sample's own patch grid
    none = torch.zeros(bsz, 0, dtype=torch.long, device=b["image"].device)
    no_keep = none.bool()
    kind = b.get("is_volume")

    ctx = model.context(b, all_patches, image_slots(b, dims), torch.zeros_like(ehr_keep))
    q_idx = torch.arange(slots.shape[1], device=slots.device).expand_as(slots)
    _, pred_ehr = model.predictor(
        ctx["tokens"], ctx["keep"], none, no_keep, gather(ctx["ehr_positions"], q_idx), slots, kind
    )
    ctx = model.context(b, all_patches, torch.zeros(bsz, n, dtype=torch.bool, device=slots.device), ehr_keep)
    pred_img, _ = model.predictor(
        ctx["tokens"], ctx["keep"], all_patches, grid, ctx["ehr_positions"][:, :0], no_keep, kind
    )
    g_ehr = F.layer_norm(ehr_tokens, (width,))
    g_img = F.layer_norm(patches, (width,))
    return {
        "has_image": b["has_image"],
        "has_ehr": b["has_ehr"],
        "emb_image": image["pooled"],
        "emb_ehr": ehr["pooled"],
        "emb_joint": joint["pooled"],
        "img_tokens": img_tokens.half(),
        "ehr_tokens": ehr_tokens.half(),
        "ehr_keep": ehr_keep,
        "q_img2ehr": _masked_mean(pred_ehr, slots),
        "g_ehr": _masked_mean(g_ehr, slots),
        "q_ehr2img": _masked_mean(pred_img, grid),
        "g_img": _masked_mean(g_img, grid),
    }


def _regions(patches, dims, regions: int, is_volume):
    """Patch tokens (B, N, D) -> (B, r*r, D): the image averaged over r x r in-plane regions (a
    volume's through its slices), r = min(regions, the smallest in-plane grid side). In a mixed
    model each sample is pooled on its own kind's grid, so both kinds give the same r x r."""
    import torch
    import torch.nn.functional as F

    bsz, _, width = patches.shape
    r = min(regions, *(side for g in dims.grids for side in g[-2:]))
    out = patches.new_zeros(bsz, r * r, width)
    kind = is_volume.long() if dims.mixed else torch.zeros(bsz, dtype=torch.long, device=patches.device)
    for k, g in enumerate(dims.grids):
        rows = kind == k
        x = patches[rows, : math.prod(g)].transpose(1, 2).reshape(-1, width, *g)
        pooled = F.adaptive_avg_pool3d(x, (1, r, r)) if len(g) == 3 else F.adaptive_avg_pool2d(x, r)
        out[rows] = pooled.flatten(2).transpose(1, 2)
    return out


def _ehr_slots(model, b: dict[str, Any], out: dict[str, Any]):
    """The encoder's EHR outputs scattered back to their layout slots: (B, L, D), zeros elsewhere."""
    import torch

    n = model.dims.patches
    tokens = out["tokens"][:, 1 + n :] * out["keep"][:, 1 + n :].unsqueeze(-1)  # (B, E, D), gathered order
    slots = torch.zeros(*b["ehr_valid"].shape, tokens.shape[-1], dtype=tokens.dtype, device=tokens.device)
    idx = out["ehr_idx"].unsqueeze(-1).expand_as(tokens)
    return slots.scatter_add(1, idx, tokens)


def _masked_mean(x, keep):
    w = keep.unsqueeze(-1).to(x.dtype)
    return (x * w).sum(1) / w.sum(1).clamp(min=1)


def extract(
    source: EncoderSource, data: str, splits: list[str], cfg: Config, out: Path, *, verbose: bool = False
) -> dict[str, Path]:
    """Embed the splits with a Ray Data actor pool (`extract_many` with one encoder). Returns
    split -> parquet path (splits the data lacks are left out, logged)."""
    return extract_many([source], data, splits, cfg, out, verbose=verbose)[source.name]


def extract_many(
    sources: list[EncoderSource],
    data: str,
    splits: list[str],
    cfg: Config,
    out: Path,
    *,
    verbose: bool = False,
) -> dict[str, dict[str, Path]]:
    """Embed the splits with every encoder; reuse each cache made from the same encoder, data and
    settings. Returns encoder name -> split -> parquet path (splits the data lacks are left out,
    logged). Encoders trained with the same pipeline settings share one execution: the splits still
    to embed are unioned (each row tagged with its split), read and transformed once, and one actor
    pool holding those encoders embeds every batch with each of them.
    `verbose`: Ray Data's progress bars on the console (off: one log line per split)."""
    groups: dict[str, list[EncoderSource]] = {}
    for source in sources:
        groups.setdefault(eval_pipeline(cfg, source.info).model_dump_json(), []).append(source)
    paths: dict[str, dict[str, Path]] = {s.name: {} for s in sources}
    for group in groups.values():
        _extract_group(group, data, splits, cfg, out, paths, verbose)
    return paths


def _extract_group(
    sources: list[EncoderSource], data: str, splits: list[str], cfg: Config, out: Path,
    paths: dict[str, dict[str, Path]], verbose: bool,
) -> None:  # fmt: skip
    """`extract_many` for encoders of one pipeline: fills `paths`."""
    import ray

    from jepa_ray.errors import ShardError
    from jepa_ray.stream.pipeline import build_dataset, new_ledger, open_split

    pcfg = eval_pipeline(cfg, sources[0].info)
    opened: dict[str, Any] = {}
    for split in splits:
        try:
            opened[split] = open_split(data, split, cfg.train.storage)
        except ShardError as e:
            log.warning("%s", e)
    if not opened:
        return
    read = read_encoder(cfg.eval.encoder, next(iter(opened.values())).manifest)
    pending: dict[int, dict[str, dict]] = {}  # source index -> split -> its cache key
    for i, source in enumerate(sources):
        fingerprint = source.fingerprint()  # hashes the weights file: once, not per split
        folder = out / "embeddings" / source.name
        folder.mkdir(parents=True, exist_ok=True)
        for split, shards in opened.items():
            check_dims(source, shards.spec.model_dims(pcfg), data)
            path = folder / f"{split}.parquet"
            key = {
                "encoder": fingerprint,
                "data": data,
                "shards": sorted(shards.expected.items()),
                "pipeline": pcfg.model_dump(mode="json"),
                "regions": cfg.eval.regions,
                "read": read,
            }
            if _cached(path, key):
                log.info("%s/%s: cached embeddings %s", source.name, split, path)
                paths[source.name][split] = path
            else:
                pending.setdefault(i, {})[split] = key
    if not pending:
        return
    todo = sorted(pending)  # the encoders with something to embed; the Embedder's column prefixes
    wanted = list(dict.fromkeys(split for i in todo for split in pending[i]))
    targets = {
        (k, split): out / "embeddings" / sources[i].name / f"{split}.parquet"
        for k, i in enumerate(todo)
        for split in pending[i]
    }
    ledger = new_ledger(pcfg.max_bad_samples)
    try:
        tagged = [
            build_dataset(opened[split], pcfg, train=False, ledger=ledger).map_batches(
                _tag, fn_kwargs={"split": split}, batch_size=None, batch_format="numpy", zero_copy_batch=True
            )
            for split in wanted
        ]
        # progress bars off: one log line per split instead (below)
        several = [sources[i] for i in todo]
        ds = embedded(tagged, several if len(several) > 1 else several[0], cfg, read, verbose)
        rows = _write_parquet(
            ds.iter_batches(batch_format="numpy", batch_size=None), targets, len(several) > 1
        )
    finally:
        ray.kill(ledger)
    for (k, split), target in targets.items():
        source = sources[todo[k]]
        target.with_suffix(".json").write_text(json.dumps(pending[todo[k]][split]))
        log.info("%s/%s: %d samples embedded -> %s", source.name, split, rows[k, split], target)
        paths[source.name][split] = target


def read_encoder(setting: str, manifest: dict) -> ReadEncoder:
    """`eval.encoder` for this data: `auto` reads the context encoder where the shards hold no image
    or volume (an EHR-only evaluation: with few labels it reads better there) and the EMA target
    otherwise (better on images); `target` and `context` are taken as they are."""
    if setting not in ("auto", "target", "context"):
        raise ConfigError(f"eval.encoder: auto, target or context, not {setting!r}")
    if setting == "auto":
        counts = manifest.get("counts", {})
        setting = "target" if counts.get("image", 0) or counts.get("volume", 0) else "context"
    return "target" if setting == "target" else "context"


def _cached(path: Path, key: dict) -> bool:
    """Whether `path` holds embeddings made under `key` (its stamp beside it says so)."""
    stamp = path.with_suffix(".json")
    return path.exists() and stamp.exists() and json.loads(stamp.read_text()) == json.loads(json.dumps(key))


def embedded(
    datasets: list,
    source: EncoderSource | list[EncoderSource],
    cfg: Config,
    encoder: ReadEncoder,
    verbose: bool = False,
):
    """The datasets (transformed batches) unioned and embedded by an actor pool of `source`, or
    of several encoders at once (`Embedder`; `eval.actors` actors, `eval.batch_size`, one GPU each
    with `eval.use_gpu`): one execution. `encoder`: which of each export's encoders is read
    (`read_encoder`)."""
    import ray.data

    ds = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
    ds = ds.map_batches(
        Embedder,
        fn_constructor_kwargs={
            "source": source,
            "regions": cfg.eval.regions,
            "use_gpu": cfg.eval.use_gpu,
            "encoder": encoder,
        },
        batch_size=cfg.eval.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.eval.actors),
        num_gpus=1 if cfg.eval.use_gpu else 0,
    )
    ray_data_progress(ds.context, verbose)
    return ds


def _tag(batch: dict[str, np.ndarray], split: str) -> dict[str, np.ndarray]:
    """The split each row comes from, carried through the embedding (one execution for all)."""
    n = len(batch["key"])
    return {**batch, SPLIT: np.full(n, split, dtype=object)}


def check_dims(source: EncoderSource, data_dims: dict[str, Any], data: str) -> None:
    """The encoder must have been trained on shards with the same EHR vocabulary and features."""
    model_dims = {"channels": 1, "volume_size": None, "tubelet": None, "mixed": False, **source.info["dims"]}
    for k in (
        "vocab_size",
        "n_num",
        "cat_sizes",
        "image_size",
        "patch_size",
        "max_events",
        "max_static_codes",
        "channels",
        "volume_size",
        "tubelet",
        "mixed",
    ):
        if list(np.atleast_1d(model_dims[k])) != list(np.atleast_1d(data_dims[k])):
            raise ConfigError(
                f"{data}: its {k} is {data_dims[k]} but the encoder was trained with {model_dims[k]}; "
                "evaluate on shards prepared with the same vocabulary and settings as the pretraining data"
            )


def _write_parquet(
    batches: Iterator[dict[str, np.ndarray]], paths: dict[tuple[int, str], Path], several: bool = False
) -> dict[tuple[int, str], int]:
    """Stream numpy batches into one parquet file per (encoder, split) of `paths` (fixed-size list
    columns), each row routed by its split column; with `several` encoders, encoder k's columns
    are those named `k/<column>` (beside the shared key, metadata and EHR arrays). The row counts.
    A file that got no row is an error naming it."""
    writers: dict[tuple[int, str], pq.ParquetWriter] = {}
    rows = dict.fromkeys(paths, 0)
    try:
        for batch in batches:
            where = batch.pop(SPLIT)
            shared = {k: v for k, v in batch.items() if "/" not in k}
            for split in np.unique(where):
                keep = where == split
                for target in (t for t in paths if t[1] == split):
                    cols = shared | _columns_of(batch, target[0]) if several else batch
                    table = pa.table({k: _column(v[keep]) for k, v in cols.items()})
                    if target not in writers:
                        writers[target] = pq.ParquetWriter(
                            paths[target].with_suffix(".parquet.tmp"), table.schema
                        )
                    writers[target].write_table(table)
                    rows[target] += table.num_rows
    finally:
        for w in writers.values():
            w.close()
    empty = [str(paths[t]) for t, n in rows.items() if n == 0]
    if empty:
        raise ConfigError(f"{', '.join(empty)}: no sample to embed")
    for path in paths.values():
        path.with_suffix(".parquet.tmp").replace(path)
    return rows


def _columns_of(batch: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
    """Encoder k's embedding columns of a several-encoder batch, under their own names."""
    prefix = f"{k}/"
    return {name[len(prefix) :]: v for name, v in batch.items() if name.startswith(prefix)}


def _column(v: np.ndarray) -> pa.Array:
    if v.dtype == object:
        return pa.array([str(x) for x in v])
    if v.ndim == 1:
        return pa.array(v)
    flat = pa.array(np.ascontiguousarray(v).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, int(np.prod(v.shape[1:])))


def read_embeddings(path: Path) -> dict[str, np.ndarray]:
    """A cached split as numpy: (n,) scalars and strings, (n, ...) arrays flattened per sample."""
    table = pq.read_table(path)
    out: dict[str, np.ndarray] = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(col.type):
            out[name] = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
        else:
            out[name] = col.to_numpy(zero_copy_only=False)
    return out
