"""jepa-ray and the real timm, both ways. Export: an encoder exported with `--format timm`, loaded
by `timm.create_model("local-dir:<dir>", pretrained=True)`, timm's `forward_features` / `forward`
compared with jepa-ray's tokens / pooled embedding on the same images, for several shapes. Import:
ViTs created by timm with random weights (one channel; RGB with LayerScale), saved to safetensors,
initialise a jepa-ray model (`model.init_from`) whose features are timm's on the same image.

    pip install --no-deps timm      # timm's own code; its ViT needs nothing from torchvision
    python benchmarks/check_timm.py --out benchmarks/results/timm-export.json

timm imports torchvision when it is imported. Where torchvision cannot be loaded (a CPU-only torch
beside PyPI's CUDA torchvision, or none installed), `--stub-torchvision` puts an empty stand-in in
its place for the import; a VisionTransformer's forward uses none of it. The JSON says which was
used."""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import json
import sys
import tempfile
import types
from pathlib import Path

import torch

IMPORTS = [  # timm model_args beside the shapes: image size, patch, width, depth, heads, channels
    dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, in_chans=1),
    dict(img_size=64, patch_size=16, embed_dim=48, depth=2, num_heads=3, in_chans=3, init_values=0.5),
]
CASES = [  # image size, patch, width, depth, heads, positions, LayerNorm epsilon
    (32, 8, 32, 2, 4, "learned", 1e-6),
    (32, 8, 32, 2, 4, "sincos", 1e-6),
    (64, 16, 96, 3, 3, "learned", 1e-6),
    (64, 16, 96, 3, 3, "learned", 1e-5),  # jepa-ray's default epsilon: close, not equal
]


class _AnyClass(type):
    def __getattr__(cls, name):
        return _AnyClass(name, (object,), {})


class _StubModule(types.ModuleType):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.__path__ = []  # a package: its submodules import too

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _AnyClass(name, (torch.nn.Module,), {})


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] != "torchvision":
            return None
        return importlib.machinery.ModuleSpec(name, self, is_package=True)

    def create_module(self, spec):
        return _StubModule(spec.name)

    def exec_module(self, module):
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stub-torchvision", action="store_true", help="an empty torchvision for timm's import")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = ap.parse_args()
    if args.stub_torchvision:
        sys.meta_path.insert(0, _StubFinder())
    import timm

    from jepa_ray.config import ModelConfig
    from jepa_ray.model.interop import export_timm
    from jepa_ray.model.io import save_jepa
    from jepa_ray.model.jepa import JEPA
    from jepa_ray.model.tokenizers import InputDims

    result = {
        "timm": timm.__version__,
        "torch": torch.__version__,
        "torchvision_stubbed": args.stub_torchvision,
    }
    result["cases"] = []
    print(f"timm {timm.__version__}{' (torchvision stubbed)' if args.stub_torchvision else ''}")
    print(
        f"{'image':>5} {'width':>5} {'depth':>5} {'positions':>9} {'eps':>6}  max|tokens diff|  max|pooled diff|"
    )
    with tempfile.TemporaryDirectory(prefix="jepa-timm-") as tmp:
        for size, patch, width, depth, heads, positions, eps in CASES:
            dims = InputDims(
                image_size=size, patch_size=patch, vocab_size=10, n_num=0, cat_sizes=(), max_static_codes=0,
                max_events=4,
            )  # fmt: skip
            torch.manual_seed(0)
            cfg = ModelConfig(width=width, depth=depth, heads=heads, positions=positions, norm_eps=eps)
            jepa = JEPA(dims, cfg).eval()
            with torch.no_grad():
                for p in jepa.target.parameters():
                    p.add_(0.05 * torch.randn_like(p))  # a target unlike its initialisation
            name = f"{tmp}/{size}-{width}-{positions}-{eps:g}"
            pipeline = {"image_size": size, "patch_size": patch, "normalize": [0.5, 0.25]}
            weights = save_jepa(jepa, f"{name}.safetensors", pipeline)
            export_timm(str(weights), name)
            model = timm.create_model(f"local-dir:{name}", pretrained=True).eval()
            n = dims.ehr_tokens
            image = torch.randn(4, 1, size, size, generator=torch.Generator().manual_seed(1))
            batch = {
                "image": image,
                "has_image": torch.ones(4, dtype=torch.bool),
                "ehr_valid": torch.zeros(4, n, dtype=torch.bool),
                "ehr_code": torch.zeros(4, n, dtype=torch.long),
                "ehr_value": torch.zeros(4, n),
                "ehr_value_present": torch.zeros(4, n),
                "ehr_time": torch.zeros(4, n),
            }
            with torch.no_grad():
                ours = jepa.encode(batch, "image")
                tokens, pooled = model.forward_features(image), model(image)
            row = {
                "image_size": size,
                "patch_size": patch,
                "width": width,
                "depth": depth,
                "positions": positions,
                "norm_eps": eps,
                "max_abs_diff_tokens": float((tokens - ours["tokens"][:, : 1 + dims.patches]).abs().max()),
                "max_abs_diff_pooled": float((pooled - ours["pooled"]).abs().max()),
            }
            result["cases"].append(row)
            print(
                f"{size:>5} {width:>5} {depth:>5} {positions:>9} {eps:>6g}  "
                f"{row['max_abs_diff_tokens']:>15.2e}  {row['max_abs_diff_pooled']:>16.2e}"
            )
    result["imports"] = []
    from safetensors.torch import save_file

    from jepa_ray.model.interop import IMAGENET, init_from

    print("timm ViT -> model.init_from: max|tokens diff|")
    with tempfile.TemporaryDirectory(prefix="jepa-timm-") as tmp:
        for i, args_ in enumerate(IMPORTS):
            torch.manual_seed(i)
            vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, **args_).eval()
            with torch.no_grad():
                vit.pos_embed.normal_(0, 0.5)  # positions and class token far from their initial values
                vit.cls_token.normal_(0, 0.5)
            path = f"{tmp}/vit-{i}.safetensors"
            save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, path)
            size, patch = args_["img_size"], args_["patch_size"]
            dims = InputDims(
                image_size=size, patch_size=patch, vocab_size=10, n_num=0, cat_sizes=(), max_static_codes=0,
                max_events=4,
            )  # fmt: skip
            cfg = ModelConfig(
                width=args_["embed_dim"], depth=args_["depth"], heads=args_["num_heads"], norm_eps=1e-6,
                positions="learned",
            )  # fmt: skip
            jepa = JEPA(dims, cfg).eval()
            normalize = (0.5, 0.25)
            report = init_from(jepa, path, normalize)
            gray = torch.rand(4, 1, size, size, generator=torch.Generator().manual_seed(2))
            if args_["in_chans"] == 3:  # timm sees the gray image as RGB, normalised its own way
                mean, std = (torch.tensor(v)[None, :, None, None] for v in IMAGENET)
                theirs_in = (gray.repeat(1, 3, 1, 1) - mean) / std
            else:
                theirs_in = (gray - normalize[0]) / normalize[1]
            n = dims.ehr_tokens
            batch = {
                "image": (gray - normalize[0]) / normalize[1],
                "has_image": torch.ones(4, dtype=torch.bool),
                "ehr_valid": torch.zeros(4, n, dtype=torch.bool),
                "ehr_code": torch.zeros(4, n, dtype=torch.long),
                "ehr_value": torch.zeros(4, n),
                "ehr_value_present": torch.zeros(4, n),
                "ehr_time": torch.zeros(4, n),
            }
            with torch.no_grad():
                ours = jepa.encode(batch, "image")["tokens"][:, : 1 + dims.patches]
                theirs = vit.forward_features(theirs_in)
            row = {
                **args_,
                "layout": report.layout,
                "unused": report.unused,
                "max_abs_diff_tokens": float((ours - theirs).abs().max()),
            }
            result["imports"].append(row)
            print(f"  {args_}: {row['max_abs_diff_tokens']:.2e} (not used: {report.unused or 'none'})")

    exact = [c for c in result["cases"] if c["norm_eps"] == 1e-6]
    worst = max(max(c["max_abs_diff_tokens"], c["max_abs_diff_pooled"]) for c in exact)
    result["worst_abs_diff_at_timm_epsilon"] = worst
    result["worst_abs_diff_import"] = max(r["max_abs_diff_tokens"] for r in result["imports"])
    print(f"export: worst difference where the epsilons match (1e-6): {worst:.2e}")
    print(f"import: worst difference: {result['worst_abs_diff_import']:.2e}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
