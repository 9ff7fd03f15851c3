"""The multimodal JEPA: context encoder, EMA target encoder, predictor, loss, monitors.

    context = Encoder(visible image patches + visible EHR tokens)          # (B, Tc, D)
    target  = LayerNorm(EMA-Encoder(every patch + every EHR token))       # no gradient
    pred    = Predictor(context, mask tokens at the target positions)     # (B, Tq, D)
    loss    = mean over target tokens of ||pred - target||^2 (or smooth-L1)
    loss    = (1 - lambda) * loss + lambda * (SIGReg(context image tokens) + SIGReg(context EHR tokens))
              # model.sigreg = lambda; the EHR term with model.sigreg_ehr (default)

One trunk embeds image and EHR tokens together, so each attends to the other when both are
visible; with one modality hidden (cross-modal policy) the context holds only the other. The EMA
update is a method of the module (`update_target`), so a sharded wrapper can call it where the
parameters live. Input batches are those of `jepa_ray.stream.pipeline` (after collation).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from jepa_ray.config import PRESETS, ModelConfig
from jepa_ray.model.mae import ReconstructionHeads
from jepa_ray.model.masks import mask_indices
from jepa_ray.model.tokenizers import MIXED_BATCH, EhrTokenizer, ImageTokenizer, InputDims
from jepa_ray.model.vit import Trunk, init_weights, learned, sincos_grid

POLICIES = {0: "image_intra", 1: "ehr_intra", 2: "hide_image", 3: "hide_ehr"}


def gather(tokens: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """tokens (B, T, D), idx (B, K) -> (B, K, D)."""
    return torch.gather(tokens, 1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def image_slots(
    batch: dict[str, torch.Tensor], dims: InputDims, with_image_only: bool = True
) -> torch.Tensor:
    """(B, N) bool: the image token slots of each sample's patch grid (in a mixed model, only those
    of the sample's own kind); with_image_only: none for a sample without an image."""
    b, n = batch["image"].shape[0], dims.patches
    slots = batch["has_image"] if with_image_only else torch.ones_like(batch["has_image"])
    slots = slots.unsqueeze(-1).expand(b, n)
    if dims.mixed:
        if "is_volume" not in batch:
            raise ValueError(MIXED_BATCH)
        counts = torch.tensor([math.prod(g) for g in dims.grids], device=slots.device)
        per_sample = counts[batch["is_volume"].long()]  # (B,)
        slots = slots & (torch.arange(n, device=slots.device) < per_sample.unsqueeze(-1))
    return slots


class Encoder(nn.Module):
    """Image and EHR tokenizers feeding one transformer trunk, behind a always-visible global token."""

    def __init__(
        self,
        dims: InputDims,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        checkpoint: int = 0,
        numeric: str = "linear",
        learned_positions: bool = False,
        eps: float = 1e-5,
        event_values: str = "shared",
    ) -> None:
        super().__init__()
        self.dims = dims
        self.image = ImageTokenizer(dims, width, learned_positions)
        self.ehr = EhrTokenizer(dims, width, numeric, event_values)
        self.global_token = learned(1, 1, width)
        self.trunk = Trunk(width, depth, heads, mlp_ratio, checkpoint, eps)

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        img_idx: torch.Tensor | None = None,
        img_keep: torch.Tensor | None = None,
        ehr_visible: torch.Tensor | None = None,
        layers: int = 1,
    ) -> dict[str, torch.Tensor]:
        """Encode the visible tokens only.

        img_idx/img_keep (B, K): visible patches (default: every patch of the samples that have an
        image); ehr_visible (B, L) bool (default: every valid EHR token). Returns tokens
        (B, 1 + K + E, D) = [global | patches | EHR], their keep mask, the index tensors used and the
        positions of every EHR slot (B, L, D), which the predictor's mask tokens carry;
        EHR slots that are padding (`ehr_valid` False) are never attended to. layers > 1: tokens are
        the mean of the last `layers` blocks' outputs, each layer-normed (`Trunk.layer_average`, no
        gradient).
        """
        image = batch["image"]
        b = image.shape[0]
        if img_idx is None:
            n = self.dims.patches
            img_idx = torch.arange(n, device=image.device).expand(b, n)
            img_keep = image_slots(batch, self.dims)
        tokens = self.image(image, batch.get("volume"), batch.get("is_volume"))
        patches = gather(tokens, img_idx)  # (B, K, D): only visible patches are computed on
        ehr_visible = batch["ehr_valid"] if ehr_visible is None else ehr_visible
        ehr_idx, ehr_keep = mask_indices(ehr_visible)
        # padding slots never take part, even when every slot is laid out (the target encoder)
        ehr_keep = ehr_keep & torch.gather(batch["ehr_valid"], 1, ehr_idx)
        ehr_tokens, ehr_positions = self.ehr(batch)
        ehr = gather(ehr_tokens, ehr_idx)  # (B, E, D)
        x = torch.cat([self.global_token.expand(b, -1, -1), patches, ehr], dim=1)
        keep = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=image.device), img_keep, ehr_keep], dim=1)
        return {
            "tokens": self.trunk(x, keep) if layers == 1 else self.trunk.layer_average(x, keep, layers),
            "keep": keep,
            "img_idx": img_idx,
            "img_keep": img_keep,
            "ehr_idx": ehr_idx,
            "ehr_keep": ehr_keep,
            "ehr_positions": ehr_positions,
        }


class Predictor(nn.Module):
    """Context tokens + mask tokens at the target positions -> predicted target latents.

    All targets of a sample are predicted in one pass (image blocks and EHR tokens together); the
    mask tokens carry only positions (patch place, EHR slot identity and time), never content.
    With `reconstruct` (model.objective=mae) it is the MAE's light decoder: `heads` map its outputs
    to pixels, values and categories (`jepa_ray.model.mae`).
    """

    def __init__(
        self,
        dims: InputDims,
        enc_width: int,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        reconstruct: bool = False,
    ):
        super().__init__()
        self.embed = nn.Linear(enc_width, width)
        self.mask_token = learned(width)
        # every grid's positions padded to the image slots: row k of the stack is image kind k's
        n = dims.patches
        grids = [F.pad(sincos_grid(g, width), (0, 0, 0, n - math.prod(g))) for g in dims.grids]
        self.register_buffer("img_pos", torch.stack(grids), persistent=False)  # (kinds, N, D)
        self.img_modality = learned(width)
        if dims.mixed:
            self.img_modality3 = learned(width)  # CT's mask tokens
        self.ehr_pos = nn.Linear(enc_width, width)
        self.trunk = Trunk(width, depth, heads, mlp_ratio)
        self.proj = nn.Linear(width, enc_width)
        self.heads = None
        if reconstruct:
            self.heads = ReconstructionHeads(dims, enc_width)

    def forward(
        self,
        context: torch.Tensor,
        context_keep: torch.Tensor,
        img_idx: torch.Tensor,
        img_keep: torch.Tensor,
        ehr_positions: torch.Tensor,
        ehr_keep: torch.Tensor,
        img_kind: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """context (B, Tc, De); img_idx/img_keep (B, Qi) patch targets; ehr_positions (B, Qe, De) with
        ehr_keep (B, Qe) EHR targets; img_kind (B,) each sample's image kind in a mixed model
        (`is_volume`: its patch grid). Returns predictions (B, Qi, De) and (B, Qe, De)."""
        kind = img_idx.new_zeros(img_idx.shape[0]) if img_kind is None else img_kind.long()
        modality = self.img_modality
        if img_kind is not None:
            modality = torch.stack([self.img_modality, self.img_modality3])[kind][:, None]  # (B, 1, D)
        qi = self.mask_token + self.img_pos[kind[:, None], img_idx] + modality
        qe = self.mask_token + self.ehr_pos(ehr_positions)
        x = torch.cat([self.embed(context), qi, qe], dim=1)
        keep = torch.cat([context_keep, img_keep, ehr_keep], dim=1)
        out = self.proj(self.trunk(x, keep)[:, context.shape[1] :])
        return out[:, : qi.shape[1]], out[:, qi.shape[1] :]


@torch.no_grad()
def ema_(target: list[torch.Tensor], context: list[torch.Tensor], momentum: float) -> None:
    """In place: target <- momentum * target + (1 - momentum) * context (context cast to target's dtype)."""
    for t, c in zip(target, context, strict=True):
        t.mul_(momentum).add_(c.detach().to(t.dtype), alpha=1 - momentum)


SIGREG_SLICES = 64  # random directions per step
SIGREG_T = torch.linspace(-4.0, 4.0, 33)  # where the characteristic functions are compared


def sigreg(
    x: torch.Tensor, slices: int = SIGREG_SLICES, generator: torch.Generator | None = None
) -> torch.Tensor:
    """SIGReg (Balestriero & LeCun 2025): how far rows of x (N, D) are from a standard normal in D
    dimensions, seen through `slices` random unit directions. For each 1-D projection, the distance
    integral of |mean_n exp(i t x_n) - exp(-t^2/2)|^2 exp(-t^2/2) dt (trapezoid rule on SIGREG_T);
    the mean over directions. The Epps-Pulley test statistic is N times this; the distance is what
    the loss weighs, because like the prediction loss (a mean over targets) it does not grow with
    the tokens a rank sees: a weight's balance against the prediction is the same on a 2-CPU run
    and on a GPU rank with 20x the tokens. About 1.06 / N for a standard normal sample (the
    sampling noise of a mean of N); the same at any N for a collapsed, shrunk or shifted one (0.1 to
    0.5 for those of its tests). Differentiable."""
    x = x.float()
    d = torch.randn(x.shape[1], slices, generator=generator, device=generator.device if generator else None)
    d = (d / d.norm(dim=0, keepdim=True)).to(x.device)
    t = SIGREG_T.to(x.device)
    phi = torch.exp(-0.5 * t * t)  # the standard normal's characteristic function, also the window
    xt = (x @ d).unsqueeze(-1) * t  # (N, slices, T)
    err = (xt.cos().mean(0) - phi).square() + xt.sin().mean(0).square()  # (slices, T)
    return torch.trapezoid(err * phi, t, dim=-1).mean()


def momentum_at(step: int, total: int, ema: tuple[float, float]) -> float:
    """EMA momentum, linear from ema[0] at step 0 to ema[1] at `total`."""
    return ema[0] + (ema[1] - ema[0]) * min(step / max(total, 1), 1.0)


class Student(nn.Module):
    """The trained part of the JEPA: context encoder + predictor. Its forward is the loss, given the
    target latents, so that a distributed wrapper (DeepSpeed) can own exactly these parameters while
    the EMA target encoder stays outside it. With a reconstructing predictor (model.objective=mae)
    the loss is against the hidden content itself and takes no latents."""

    def __init__(
        self, context: Encoder, predictor: Predictor, loss: str, sigreg: float = 0.0, sigreg_ehr: bool = False
    ) -> None:
        super().__init__()
        self.context = context
        self.predictor = predictor
        self.loss = loss
        self.sigreg = 0.0 if predictor.heads is not None else sigreg  # never on a reconstruction
        self.sigreg_ehr = sigreg_ehr
        # the seed of SIGReg's random directions for the next training forward (the training loop
        # sets one per micro-batch of the data sequence, so a resumed or resized run draws the
        # directions an uninterrupted one would); None: the global generator
        self.noise_seed: int | None = None

    def forward(
        self, batch: dict[str, torch.Tensor], z_img: torch.Tensor | None, z_ehr: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """The loss of a batch: against target latents z_img (B, N, D) and z_ehr (B, L, D) (JEPA), or
        against the hidden pixels and EHR content (MAE: z_img and z_ehr are None)."""
        ctx = self.context(batch, batch["img_ctx_idx"], batch["img_ctx_keep"], batch["ehr_ctx"])
        b, m, k = batch["img_tgt_idx"].shape
        img_idx, img_keep = batch["img_tgt_idx"].reshape(b, m * k), batch["img_tgt_keep"].reshape(b, m * k)
        ehr_idx, ehr_keep = mask_indices(batch["ehr_tgt"])
        ehr_positions = gather(ctx["ehr_positions"], ehr_idx)
        pred_img, pred_ehr = self.predictor(
            ctx["tokens"], ctx["keep"], img_idx, img_keep, ehr_positions, ehr_keep, batch.get("is_volume")
        )
        heads = self.predictor.heads
        if heads is not None:
            img_err = heads.image_error(pred_img, batch, img_idx, self._distance)
            ehr_err = heads.ehr_error(pred_ehr, batch, ehr_idx, self._distance)
        else:
            img_err = self._distance(pred_img, gather(z_img, img_idx).to(pred_img.dtype))
            ehr_err = self._distance(pred_ehr, gather(z_ehr, ehr_idx).to(pred_ehr.dtype))
        per_token = torch.cat([img_err.float(), ehr_err.float()], dim=1)  # (B, Qi + Qe)
        keep = torch.cat([img_keep, ehr_keep], dim=1).to(per_token.dtype)
        count = keep.sum()
        loss = (per_token * keep).sum() / count.clamp(min=1)
        out = {"loss": loss, "targets": count.detach()}
        if self.sigreg:
            # the visible image-patch tokens of every sample, and (sigreg_ehr) the visible EHR tokens,
            # each set a distance of its own; in eval mode the directions are fixed, so a validation
            # loss is a deterministic function of the model and the batch
            seed = self.noise_seed if self.training else 0
            fixed = None if seed is None else torch.Generator().manual_seed(seed)
            n_img = ctx["img_keep"].shape[1]
            sets = [ctx["tokens"][:, 1 : 1 + n_img][ctx["img_keep"]]]
            if self.sigreg_ehr:
                sets.append(ctx["tokens"][:, 1 + n_img :][ctx["ehr_keep"]])
            # a batch with no such tokens (no images, and no EHR tokens where they count) trains on
            # the prediction alone
            terms = [sigreg(x, generator=fixed) for x in sets if len(x) > 1]
            if terms:
                reg = torch.stack(terms).sum()
                out["loss"] = (1 - self.sigreg) * loss + self.sigreg * reg
                out["prediction_loss"], out["sigreg"] = loss.detach(), reg.detach()
        per_sample = ((per_token * keep).sum(1) / keep.sum(1).clamp(min=1)).detach()
        for code, name in POLICIES.items():
            chosen = batch["policy"] == code
            if chosen.any():
                out[f"loss_{name}"] = per_sample[chosen].mean()
        return out

    def _distance(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.loss == "smooth_l1":
            return F.smooth_l1_loss(pred, target, reduction="none").mean(-1)
        return (pred - target).pow(2).mean(-1)


def target_ema(cfg: ModelConfig) -> tuple[float, float]:
    """The target encoder's EMA momentum schedule: the configured one, or (0, 0) for an MAE, whose
    target encoder is a copy of its context encoder after every step.

    On a short run the linear rise to 1 leaves the final target behind: it is a weighted average of
    the context encoder's past weights, weight ~ x exp(-(1 - m0) S x^2 / 2) at x = the fraction of
    the S-step run still to go, peaking at x = 1 / sqrt((1 - m0) S): at S = 600 and m0 = 0.996,
    x = 0.65, the context encoder of about step 210."""
    return (0.0, 0.0) if cfg.objective == "mae" else cfg.ema


class JEPA(nn.Module):
    """The student (context encoder + predictor, trained) and the EMA target encoder.

    `forward(batch)` is the loss; `update_target(m)` the EMA step; `encode` the downstream API.
    With `model.objective=mae` the same modules form the reconstruction baseline: the predictor
    decodes pixels and EHR content, and the target encoder follows the context encoder exactly.
    """

    def __init__(self, dims: InputDims | dict, cfg: ModelConfig | None = None) -> None:
        super().__init__()
        dims = dims if isinstance(dims, InputDims) else InputDims.from_dict(dims)
        cfg = cfg or ModelConfig()
        width, depth, heads = PRESETS[cfg.preset]
        width, depth, heads = cfg.width or width, cfg.depth or depth, cfg.heads or heads
        p_width = cfg.predictor_width or max(width // 2, 8)
        p_depth = cfg.predictor_depth or max(depth // 3, 2)
        p_heads = cfg.predictor_heads or heads
        while p_width % p_heads:
            p_heads -= 1
        self.dims, self.cfg, self.width = dims, cfg, width
        context = Encoder(
            dims,
            width,
            depth,
            heads,
            cfg.mlp_ratio,
            cfg.activation_checkpointing,
            cfg.numeric_embedding,
            cfg.learned_positions,
            cfg.norm_eps,
            cfg.event_values,
        )
        # the predictor (and an MAE's decoder heads) is drawn from a generator of its own, seeded by
        # one draw from the global one: the encoder a seed starts from is then the same whatever the
        # predictor's depth, width or job, so a sweep over them (or JEPA vs MAE) compares one start
        predictor_seed = int(torch.randint(0, 2**62, (), device="cpu"))  # also under a meta device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(predictor_seed)
            predictor = Predictor(
                dims, width, p_width, p_depth, p_heads, cfg.mlp_ratio, reconstruct=cfg.objective == "mae"
            )
            init_weights(predictor)
        init_weights(context)
        self.student = Student(context, predictor, cfg.loss, cfg.sigreg, cfg.sigreg_ehr)
        self.target = copy.deepcopy(context)
        for p in self.target.parameters():
            p.requires_grad_(False)

    @property
    def context(self) -> Encoder:
        return self.student.context

    @property
    def predictor(self) -> Predictor:
        return self.student.predictor

    @property
    def reconstructs(self) -> bool:
        """True for the reconstruction baseline (model.objective=mae)."""
        return self.predictor.heads is not None

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """target <- momentum * target + (1 - momentum) * context, parameter by parameter (an MAE's
        target is a plain copy: momentum 0)."""
        momentum = 0.0 if self.reconstructs else momentum
        ema_(list(self.target.parameters()), list(self.context.parameters()), momentum)

    @torch.no_grad()
    def targets(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Layer-normed target-encoder latents of every patch (B, N, D) and EHR slot (B, L, D);
        (None, None) for an MAE, whose targets are the batch's own content."""
        if self.reconstructs:
            return None, None
        self.target.eval()
        out = self.target(
            batch, ehr_visible=torch.ones_like(batch["ehr_valid"]), layers=self.cfg.target_layers
        )
        z = F.layer_norm(out["tokens"].float(), (self.width,))
        n = self.dims.patches
        return z[:, 1 : 1 + n], z[:, 1 + n :]

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The JEPA loss of a batch, and its parts: per policy, target counts."""
        return self.student(batch, *self.targets(batch))

    @torch.no_grad()
    def encode(
        self, batch: dict[str, torch.Tensor], modality: str = "both", encoder: str = "target"
    ) -> dict[str, torch.Tensor]:
        """Embeddings for downstream use: tokens (B, T, D), keep (B, T), pooled (B, D), and
        ehr_idx (B, E): the layout slot of each EHR token (tokens are [global | patches | EHR]).

        modality: "image", "ehr" or "both" (what the encoder sees); encoder: "target" (the EMA
        encoder, which the reference evaluates) or "context". pooled = mean of the visible patch
        and EHR tokens (not the global token); zeros for a sample with nothing visible.
        """
        if modality not in ("image", "ehr", "both"):
            raise ValueError(f"modality must be image, ehr or both, not {modality!r}")
        if encoder not in ("target", "context"):
            raise ValueError(f"encoder must be target or context, not {encoder!r}")
        enc = self.target if encoder == "target" else self.context
        b, n = batch["image"].shape[0], self.dims.patches
        img_idx = torch.arange(n, device=batch["image"].device).expand(b, n)
        img_keep = image_slots(batch, self.dims) & (modality != "ehr")
        ehr_visible = batch["ehr_valid"] & (modality != "image")
        out = enc(batch, img_idx, img_keep, ehr_visible)
        tokens, keep = out["tokens"], out["keep"].clone()
        keep[:, 0] = False
        weights = keep.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1)
        return {
            "tokens": tokens,
            "keep": out["keep"],
            "pooled": pooled,
            "global": tokens[:, 0],
            "ehr_idx": out["ehr_idx"],
        }


def embedding_stats(z: torch.Tensor) -> dict[str, float]:
    """Collapse monitors of a batch of embeddings (B, D): mean per-dimension std and RankMe.

    RankMe (Garrido et al., 2023) = exp(entropy of the normalised singular values): ~D for
    well-spread embeddings, ~1 when they collapse to a line.
    """
    z = z.float()
    std = z.std(0).mean().item() if z.shape[0] > 1 else 0.0
    s = torch.linalg.svdvals(z - z.mean(0))
    p = s / s.sum().clamp(min=1e-12) + 1e-12
    rankme = math.exp(float(-(p * p.log()).sum()))
    return {"std": std, "rankme": rankme}
