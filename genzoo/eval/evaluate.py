"""Evaluate a model: one seeded sample stream, judge features, and the registered metrics.

Every model evaluated on the same data sees the same sample stream: the same seed per batch and
the same requested conditions (class ``i mod K`` for sample ``i``; test captions for text models),
so differences between rows are differences between models. Real-image features are computed once
per (judge, data, count) and cached on disk (:func:`genzoo.eval.judges.cache_dir`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import Tensor

from genzoo.errors import GenzooError
from genzoo.eval import metrics as M
from genzoo.precision import autocast
from genzoo.registry import component


@dataclass(frozen=True)
class EvalSettings:
    """What fixes the sample stream: count, seed, batch size, the real split compared against, and the
    precision the model generates in (``bf16``: under autocast; the judge always runs in fp32)."""

    samples: int = 1000
    seed: int = 0
    batch_size: int = 250
    split: str = "test"
    precision: str = "fp32"


class EvalContext:
    """Everything a metric may need, each computed on first use and shared by all metrics of one run."""

    def __init__(self, model: Any, source: Any, judge: Any, settings: EvalSettings, *, device: torch.device) -> None:
        self.model, self.source, self.judge, self.settings, self.device = model, source, judge, settings, device
        self.sample_seconds = 0.0

    def generating(self) -> AbstractContextManager:
        """The context every call that makes images runs in (the settings' precision)."""
        return autocast(self.device, self.settings.precision)

    # ----------------------------------------------------------------- real
    @cached_property
    def real(self) -> dict[str, Any]:
        tensors = self.source.split(self.settings.split).tensors()
        n = min(self.settings.samples, len(tensors["image"]))
        return {k: v[:n] for k, v in tensors.items()}

    @cached_property
    def real_features(self) -> Tensor:
        split = self.source.split(self.settings.split)
        key = hashlib.sha256(
            json.dumps([self.judge.key, split.fingerprint(), len(self.real["image"])]).encode()
        ).hexdigest()[:16]
        path = _cache_root() / "features" / f"{key}.safetensors"
        if path.exists():
            return load_file(str(path))["features"]
        feats = self.judge.features(self.real["image"]).float().cpu()
        _save_atomic({"features": feats.contiguous()}, path)
        return feats

    # ----------------------------------------------------------------- fake
    @cached_property
    def requested(self) -> dict[str, Any] | None:
        """The condition asked of sample i: class i mod K for a class-conditional model; the caption of
        the split's image i mod N (and its attributes, to judge by) for a caption model; else None."""
        kind = getattr(getattr(self.model, "condition", None), "value", "none")
        if kind == "class":
            return {"y": torch.arange(self.settings.samples) % self.model.num_classes}
        if kind == "caption":
            tensors = self.source.split(self.settings.split).tensors()
            idx = torch.arange(self.settings.samples) % len(tensors["caption"])
            out = {"caption": [tensors["caption"][i] for i in idx.tolist()]}
            if "attributes" in tensors:
                out["attributes"] = tensors["attributes"][idx]
            return out
        return None

    @cached_property
    def samples(self) -> Tensor:
        s, out = self.settings, []
        start = time.perf_counter()
        for i, lo in enumerate(range(0, s.samples, s.batch_size)):
            n = min(s.batch_size, s.samples - lo)
            g = torch.Generator(device=self.device).manual_seed(s.seed * 1_000_003 + i)
            cond = None
            if self.requested is not None:  # attributes are for the judge, not the model
                cond = {
                    k: v[lo : lo + n].to(self.device) if isinstance(v, Tensor) else v[lo : lo + n]
                    for k, v in self.requested.items()
                    if k != "attributes"
                }
            with self.generating():
                out.append(self.model.sample(n, cond, generator=g).float().clamp(-1, 1).cpu())
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.sample_seconds = time.perf_counter() - start
        return torch.cat(out)

    @cached_property
    def fake_features(self) -> Tensor:
        return self.judge.features(self.samples).float().cpu()

    @cached_property
    def fake_predictions(self) -> dict[str, Tensor]:
        return {k: v.cpu() for k, v in self.judge.predict(self.samples).items()}


def _cache_root() -> Path:
    from genzoo.eval.judges import cache_dir

    return cache_dir()


def _save_atomic(tensors: dict[str, Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


# --------------------------------------------------------------------------- metrics as components

MetricFn = Callable[[EvalContext], dict[str, float]]


class NoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KNNConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: int = Field(5, ge=1, description="nearest neighbour defining each point's ball (Kynkäänniemi: 3; Naeem: 5)")


class KIDConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    subsets: int = Field(100, ge=1, description="random subsets averaged (Bińkowski et al. 2018)")
    subset_size: int = Field(1000, ge=2, description="points per subset (clipped to the sample count)")


class NLLConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    images: int = Field(128, ge=1, description="test images the bound is averaged over (the full chain is costly)")


@component("metric", "fd", config=NoConfig)
def metric_fd(cfg: NoConfig) -> MetricFn:
    """Fréchet distance in judge features (Heusel et al. 2017)."""
    return lambda ev: {"fd": M.fd(ev.real_features, ev.fake_features)}


@component("metric", "kid", config=KIDConfig)
def metric_kid(cfg: KIDConfig) -> MetricFn:
    """Kernel inception distance, unbiased, in judge features (Bińkowski et al. 2018)."""

    def run(ev: EvalContext) -> dict[str, float]:
        g = torch.Generator().manual_seed(ev.settings.seed)
        mean, std = M.kid(
            ev.real_features, ev.fake_features, subsets=cfg.subsets, subset_size=cfg.subset_size, generator=g
        )
        return {"kid": mean, "kid_std": std}

    return run


def _knn_metric(measure: Callable[..., tuple[float, float]], names: tuple[str, str], k: int) -> MetricFn:
    """A metric of two figures from the k-NN balls of real and fake judge features."""
    return lambda ev: dict(zip(names, measure(ev.real_features, ev.fake_features, k=k)))


@component("metric", "precision-recall", config=KNNConfig)
def metric_precision_recall(cfg: KNNConfig) -> MetricFn:
    """Improved precision and recall (Kynkäänniemi et al. 2019)."""
    return _knn_metric(M.precision_recall, ("precision", "recall"), cfg.k)


@component("metric", "density-coverage", config=KNNConfig)
def metric_density_coverage(cfg: KNNConfig) -> MetricFn:
    """Density and coverage (Naeem et al. 2020)."""
    return _knn_metric(M.density_coverage, ("density", "coverage"), cfg.k)


@component("metric", "class-coverage", config=NoConfig)
def metric_class_coverage(cfg: NoConfig) -> MetricFn:
    """Share of classes the judge finds among samples (mode collapse)."""

    def run(ev: EvalContext) -> dict[str, float]:
        num = ev.source.spec.num_classes
        if not num or "label" not in ev.fake_predictions:
            return {}
        c = M.class_coverage(ev.fake_predictions["label"], num)
        return {"class_coverage": c["coverage"], "class_entropy": c["entropy_ratio"], "max_class_share": c["max_share"]}

    return run


def attribute_hits(pred: Mapping[str, Tensor], want: Tensor, names: Sequence[str]) -> tuple[list[str], Tensor]:
    """The attributes among ``names`` that the judge predicts, and (N, k) bools, does sample i show attribute j;
    ``want`` (N, len(names)) holds the asked-for values in ``names``' order (shapes: shape, colour, size, position)."""
    read = [(j, a) for j, a in enumerate(names) if a in pred]
    return [a for _, a in read], torch.stack([pred[a] == want[:, j] for j, a in read], 1)


@component("metric", "attribute-accuracy", config=NoConfig)
def metric_attribute_accuracy(cfg: NoConfig) -> MetricFn:
    """Does a sample show the class/attributes it was asked for."""

    def run(ev: EvalContext) -> dict[str, float]:
        if ev.requested is None:
            return {}
        pred = ev.fake_predictions
        if "attributes" in ev.requested:  # a caption model: every attribute the caption names
            read, hits = attribute_hits(pred, ev.requested["attributes"], list(ev.source.spec.attributes))
            out = {f"{a}_accuracy": float(h.double().mean()) for a, h in zip(read, hits.T)}
            out["caption_accuracy"] = float(hits.all(1).double().mean())
            return out
        if "y" not in ev.requested:
            return {}
        y = ev.requested["y"]
        out = {"label_accuracy": float((pred["label"] == y).double().mean())}
        attrs = ev.source.spec.attributes
        if "shape" in attrs and "colour" in attrs and "shape" in pred:  # shapes: label = shape * |colours| + colour
            k = len(attrs["colour"])
            out["shape_accuracy"] = float((pred["shape"] == y // k).double().mean())
            out["colour_accuracy"] = float((pred["colour"] == y % k).double().mean())
        return out

    return run


@component("metric", "nll", config=NLLConfig)
def metric_nll(cfg: NLLConfig) -> MetricFn:
    """Negative log-likelihood bound in bits/dim, where the model has one (VAE: ELBO and IWAE bound; diffusion:
    the full variational bound, ``vlb_bpd``, with its prior and decoder terms)."""

    def run(ev: EvalContext) -> dict[str, float]:
        fn = getattr(ev.model, "nll_bpd", None)
        if fn is None:
            return {}
        tensors = ev.source.split(ev.settings.split).tensors()
        x = tensors["image"][: cfg.images]
        conditional = getattr(getattr(ev.model, "condition", None), "value", "none") != "none"
        g = torch.Generator(device=ev.device).manual_seed(ev.settings.seed)
        parts: dict[str, list[Tensor]] = {}
        for lo in range(0, len(x), ev.settings.batch_size):
            hi = min(lo + ev.settings.batch_size, len(x))
            # a conditional model's bound is of p(x | y): its batch carries the labels or captions
            batch = {k: v[lo:hi].to(ev.device) if isinstance(v, Tensor) else v[lo:hi] for k, v in tensors.items()}
            out = (
                fn(x[lo:hi].to(ev.device), batch, generator=g)
                if conditional
                else fn(x[lo:hi].to(ev.device), generator=g)
            )
            for k, v in out.items():
                parts.setdefault(k, []).append(v.float().cpu())
        return {k: float(torch.cat(v).mean()) for k, v in parts.items()}

    return run


@component("metric", "reconstruction", config=NoConfig)
def metric_reconstruction(cfg: NoConfig) -> MetricFn:
    """Test-set reconstruction MSE of models that encode (AE, VAE, VQ-VAE)."""

    def run(ev: EvalContext) -> dict[str, float]:
        fn = getattr(ev.model, "reconstruct", None)
        if fn is None:
            return {}
        x = ev.real["image"]
        rec = torch.cat([fn(x[i : i + 256].to(ev.device)).float().cpu() for i in range(0, len(x), 256)])
        return {"recon_mse": float(torch.mean((rec - x) ** 2))}

    return run


@component("metric", "codebook", config=NoConfig)
def metric_codebook(cfg: NoConfig) -> MetricFn:
    """Codebook perplexity and share of codes used on the test set (VQ models)."""

    def run(ev: EvalContext) -> dict[str, float]:
        fn = getattr(ev.model, "codebook_usage", None)
        if fn is None:
            return {}
        u = fn(ev.real["image"].to(ev.device))
        return {"code_perplexity": u["perplexity"], "codes_used": u["used_fraction"]}

    return run


@component("metric", "zero-shot", config=NoConfig)
def metric_zero_shot(cfg: NoConfig) -> MetricFn:
    """Zero-shot attribute accuracy of a CLIP on shapes (every attribute combination's caption)."""

    def run(ev: EvalContext) -> dict[str, float]:
        fn = getattr(ev.model, "zero_shot", None)
        if fn is None or "attributes" not in ev.real or ev.source.spec.name != "shapes":
            return {}
        return fn(ev.real["image"], ev.real["attributes"])

    return run


@component("metric", "upsampler", config=NoConfig)
def metric_upsampler(cfg: NoConfig) -> MetricFn:
    """A cascade's upsampler against bilinear upsampling, on the split's images brought down to the base size: FD
    in judge features and MSE to the full-size originals, for both. An upsampler that reads the condition gets each
    image's own (its class or caption)."""

    def run(ev: EvalContext) -> dict[str, float]:
        if getattr(ev.model, "upsampler", None) is None:
            return {}
        real, bs = ev.real["image"], ev.settings.batch_size
        low = torch.nn.functional.interpolate(real, size=ev.model.base_size, mode="area")
        g = torch.Generator(device=ev.device).manual_seed(ev.settings.seed)
        reads = getattr(ev.model, "upsampler_condition", False)  # a diffusion cascade whose condition is set

        def condition(i: int) -> dict[str, Any]:  # upsample's keyword, only for an upsampler that reads one
            if not reads:
                return {}
            key, user_key = ("label", "y") if ev.model.condition.value == "class" else ("caption", "caption")
            part = ev.real[key][i : i + bs]
            return {"condition": {user_key: part.to(ev.device) if isinstance(part, Tensor) else list(part)}}

        with ev.generating():
            up = torch.cat(
                [
                    ev.model.upsample(low[i : i + bs].to(ev.device), generator=g, **condition(i))
                    .float()
                    .clamp(-1, 1)
                    .cpu()
                    for i in range(0, len(low), bs)
                ]
            )
        bilinear = torch.nn.functional.interpolate(
            low, size=real.shape[-1], mode="bilinear", align_corners=False
        ).clamp(-1, 1)
        out = {}
        for name, x in (("upsampler", up), ("bilinear", bilinear)):
            out[f"{name}_fd"] = M.fd(ev.real_features, ev.judge.features(x).float().cpu())
            out[f"{name}_mse"] = float(torch.mean((x - real) ** 2))
        return out

    return run


class PairsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    images: int = Field(500, ge=1, description="split images (and their captions) used, at most --samples")


@component("metric", "embedding-prior", config=PairsConfig)
def metric_embedding_prior(cfg: PairsConfig) -> MetricFn:
    """DALL·E 2: cosine of prior-drawn to true CLIP image embeddings, and of the text-embedding baseline.

    The mean cosine of the z_i the prior draws for a caption to the CLIP embedding of that caption's image, beside
    the baseline of taking the caption's z_t as the image embedding."""

    def run(ev: EvalContext) -> dict[str, float]:
        fn = getattr(ev.model, "prior_cosine", None)
        if fn is None or "caption" not in ev.real:
            return {}
        n = min(cfg.images, len(ev.real["image"]))
        g = torch.Generator(device=ev.device).manual_seed(ev.settings.seed)
        with ev.generating():
            return fn(ev.real["image"][:n], list(ev.real["caption"][:n]), generator=g)

    return run


@component("metric", "variations", config=PairsConfig)
def metric_variations(cfg: PairsConfig) -> MetricFn:
    """DALL·E 2: do variations of a test image keep its attributes (judged).

    unCLIP Sec. 3.1: one variation per split image, judged; the share whose attribute (and all four,
    ``variation_all``) matches the original's."""

    def run(ev: EvalContext) -> dict[str, float]:
        fn = getattr(ev.model, "variations", None)
        if fn is None or "attributes" not in ev.real:
            return {}
        n = min(cfg.images, len(ev.real["image"]))
        g = torch.Generator(device=ev.device).manual_seed(ev.settings.seed)
        bs = ev.settings.batch_size
        with ev.generating():
            x = torch.cat(
                [
                    fn(ev.real["image"][i : min(i + bs, n)].to(ev.device), generator=g).float().clamp(-1, 1).cpu()
                    for i in range(0, n, bs)
                ]
            )
        pred, want = ev.judge.predict(x), ev.real["attributes"][:n]
        names = [a for a in ev.source.spec.attributes if a in pred]
        if not names:
            return {}
        hits = torch.stack(
            [pred[a].cpu() == want[:, j] for j, a in enumerate(ev.source.spec.attributes) if a in pred], 1
        )
        out = {f"variation_{a}": float(h.double().mean()) for a, h in zip(names, hits.T)}
        out["variation_all"] = float(hits.all(1).double().mean())
        return out

    return run


def prior_tokens_per_sample(model: Any) -> int:
    """Tokens the prior draws per sample when its sampler is a token sampler (DALL·E's image tokens,
    the AR prior's embedding tokens); 1 otherwise."""
    prior, sampler = model.components.get("prior"), model.components.get("prior_sampler")
    if sampler is None or sampler.kind.value != "token":
        return getattr(prior, "tokens_per_sample", None) or 1
    return getattr(prior, "tokens_per_sample", None) or math.prod(prior.shape)


@component("metric", "throughput", config=NoConfig)
def metric_throughput(cfg: NoConfig) -> MetricFn:
    """Sampling images/s and network evaluations per sample."""

    def run(ev: EvalContext) -> dict[str, float]:
        _ = ev.samples
        out = {"images_per_s": ev.settings.samples / max(ev.sample_seconds, 1e-9)}
        nfe, prior = 0, ev.model.components.get("prior")
        for role, s in ev.model.components.items():  # sampler, prior_sampler and each upsampler's in a cascade
            if s is None or not role.endswith("sampler"):
                continue
            if role == "prior_sampler":  # per token for a token prior; each best-of draw counts
                nfe += s.nfe() * prior_tokens_per_sample(ev.model) * getattr(prior, "best_of", 1)
            else:
                nfe += s.nfe()
        out["nfe"] = float(nfe or 1)
        return out

    return run


@component("metric", "inception", config=NoConfig)
def metric_torch_fidelity(cfg: NoConfig) -> MetricFn:
    """Inception FID and IS through torch-fidelity (weights downloaded once)."""

    def run(ev: EvalContext) -> dict[str, float]:
        try:
            import torch_fidelity  # noqa: F401
        except ImportError:
            raise GenzooError(
                "metric 'inception': install torch-fidelity (pip install torch-fidelity) and let it download the "
                "Inception weights once (it needs the network); the judge-based 'fd' needs neither"
            ) from None
        real = ((ev.real["image"] + 1) * 127.5).round().to(torch.uint8)
        fake = ((ev.samples + 1) * 127.5).round().to(torch.uint8)
        if real.shape[1] == 1:
            real, fake = real.repeat(1, 3, 1, 1), fake.repeat(1, 3, 1, 1)
        try:
            res = torch_fidelity.calculate_metrics(
                input1=_U8(fake), input2=_U8(real), fid=True, isc=True, verbose=False
            )
        except Exception as e:  # the weight download is the usual failure offline
            raise GenzooError(
                f"metric 'inception': torch-fidelity could not compute FID/IS ({type(e).__name__}: {e}); "
                "it needs its Inception weights, downloaded once with network access"
            ) from None
        return {
            "inception_fid": float(res["frechet_inception_distance"]),
            "inception_score": float(res["inception_score_mean"]),
        }

    return run


class _U8(torch.utils.data.Dataset):
    def __init__(self, x: Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Tensor:
        return self.x[i]


class ClipScoreConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field("ViT-B-32", description="open_clip architecture")
    pretrained: str = Field("laion2b_s34b_b79k", description="open_clip pretrained tag (downloaded once)")


@component("metric", "clip-score", config=ClipScoreConfig)
def metric_clip_score(cfg: ClipScoreConfig) -> MetricFn:
    """CLIP score through open_clip (pretrained weights downloaded once)."""

    def run(ev: EvalContext) -> dict[str, float]:
        import open_clip

        if ev.requested is None and "caption" not in ev.real:
            return {}
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(cfg.model, pretrained=cfg.pretrained)
        except Exception as e:
            raise GenzooError(
                f"metric 'clip-score': open_clip could not load {cfg.model}/{cfg.pretrained} ({type(e).__name__}); "
                "it downloads the weights once with network access, or pass a local file as pretrained"
            ) from None
        tok = open_clip.get_tokenizer(cfg.model)
        names = ev.source.spec.class_names
        if ev.requested is not None and "caption" in ev.requested:
            texts = ev.requested["caption"]
        elif ev.requested is not None and names:
            texts = [names[int(y)] for y in ev.requested["y"]]
        else:
            texts = ev.real["caption"]
        size = model.visual.image_size if isinstance(model.visual.image_size, int) else model.visual.image_size[0]
        img = torch.nn.functional.interpolate((ev.samples + 1) / 2, size=(size, size), mode="bicubic").clamp(0, 1)
        mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
        with torch.no_grad():
            ie = model.encode_image((img.expand(-1, 3, -1, -1) - mean) / std)
            te = model.encode_text(tok(list(texts[: len(ie)])))
        cos = torch.nn.functional.cosine_similarity(ie, te)
        return {"clip_score": float(100 * cos.clamp(min=0).mean())}

    return run


DEFAULT_METRICS = (
    "fd",
    "kid",
    "precision-recall",
    "density-coverage",
    "class-coverage",
    "attribute-accuracy",
    "reconstruction",
    "codebook",
    "throughput",
)


def evaluate(
    model: Any,
    source: Any,
    *,
    metrics: Mapping[str, MetricFn],
    judge: Any,
    settings: EvalSettings,
    device: torch.device,
) -> dict[str, float]:
    """Run ``metrics`` on one shared :class:`EvalContext`; returns the merged figures."""
    ev = EvalContext(model, source, judge, settings, device=device)
    out: dict[str, float] = {}
    for fn in metrics.values():
        out.update(fn(ev))
    return out
