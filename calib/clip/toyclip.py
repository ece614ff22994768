"""The toy CLIP: a small open_clip ViT trained contrastively by calib on a procedural corpus.

The corpus is drawn by the toy benchmark's renderer (:func:`calib.data.toy.render_scene`) from
seeds disjoint from the benchmark's, and captioned in plain English that mentions the bird, the
background, or both.  As on the web, birds are usually photographed in their habitat: with
probability ``cooccurrence`` the background matches the bird (waterbird on water, landbird on
land).  A model trained on it classifies birds zero-shot but leans on the background: the
spurious correlation the paper studies.

The trained weights are saved as a real open_clip checkpoint (``open_clip_model.safetensors`` next
to ``open_clip_config.json``) and loaded through :func:`calib.clip.models.load_clip` like any other
(``load_clip("calib-toy-vit", "toy")``, or ``pretrained=<file>`` / ``local-dir:<folder>``).

These settings were fixed before any method was evaluated and are not tuned on method results. One
was changed since, by the realism review of docs/toy_realism.md (criteria written before measuring,
no method result read): training length, 600 -> 800 steps.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from calib.core import paths
from calib.core.files import atomic_dir, default_file_mode, locked
from calib.core.hashing import file_hash, stable_hash
from calib.core.logs import expected_random_init
from calib.data.toy import render_scene

ASSETS = Path(__file__).resolve().parent / "assets"
TOY_MODEL_NAME = "calib-toy-vit"


def register_calib_models() -> None:
    """Register calib's own architectures (the toy CLIP) with open_clip; idempotent."""
    import open_clip

    if TOY_MODEL_NAME not in open_clip.list_models():
        open_clip.add_model_config(ASSETS / f"{TOY_MODEL_NAME}.json")


log = logging.getLogger(__name__)

BIRD_WORDS = ("landbird", "waterbird")
PLACE_WORDS = {
    "forest": ("forest", "woods"),
    "field": ("field", "meadow"),
    "ocean": ("ocean", "sea"),
    "lake": ("lake", "pond"),
}
BOTH = (
    "a photo of a {b} in the {p}.",
    "a {b} in the {p}.",
    "a {b} standing by the {p}.",
    "a picture of a {b} near the {p}.",
    "a {b} and the {p} behind it.",
    "the {b} in front of a {p}.",
)
BIRD_ONLY = ("a photo of a {b}.", "a {b}.", "a picture of the {b}.", "a close-up photo of a {b}.", "this is a {b}.")
PLACE_ONLY = ("a photo of the {p}.", "a {p}.", "a picture of a {p}.", "a view of the {p}.")


@dataclass(frozen=True)
class ToyClipConfig:
    """How the toy CLIP is made.  Defaults were fixed before looking at any method's numbers."""

    seed: int = 0  # corpus and initialisation seed
    n_pairs: int = 12000  # image-caption pairs in the corpus
    cooccurrence: float = 0.85  # P(background matches the bird's habitat) in the corpus
    p_bird_only: float = 0.3  # caption mentions only the bird
    p_place_only: float = 0.15  # caption mentions only the background (the rest mention both)
    steps: int = 800  # optimiser steps (~0.1 s each on 2 CPU cores); 600 until the realism review of
    # docs/toy_realism.md, where 600 left the bird class less decodable than CLIP's on Waterbirds
    batch_size: int = 200  # pairs per step
    lr: float = 1e-3  # AdamW peak learning rate (cosine decay after warm-up)
    warmup: int = 50  # linear warm-up steps
    weight_decay: float = 0.1  # AdamW weight decay
    image_size: int = 64  # pixels (matches the toy benchmark and the model config)


# pretrained spellings accepted by calib.clip.models.load_clip for the toy CLIP
TOY_PRESETS: dict[str, ToyClipConfig] = {
    "toy": ToyClipConfig(),
    "toy-quick": ToyClipConfig(n_pairs=600, steps=20, warmup=5),  # seconds; for tests and smoke runs only
}


def caption(rng: np.random.Generator, bird: int, style: str, cfg: ToyClipConfig) -> str:
    """An English caption of a toy image of ``bird`` on a background of ``style``."""
    b = BIRD_WORDS[bird]
    p = PLACE_WORDS[style][rng.integers(2)]
    u = rng.random()
    if u < cfg.p_bird_only:
        return BIRD_ONLY[rng.integers(len(BIRD_ONLY))].format(b=b)
    if u < cfg.p_bird_only + cfg.p_place_only:
        return PLACE_ONLY[rng.integers(len(PLACE_ONLY))].format(p=p)
    return BOTH[rng.integers(len(BOTH))].format(b=b, p=p)


def make_corpus(
    cfg: ToyClipConfig, styles: tuple[str, ...] = (), caption_noise: float = 0.0, stream: int = 0
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Images ``[n, H, W, 3]`` uint8, captions, and ``[n, 2]`` (bird, place) of the training corpus.

    The pretraining-source study (:mod:`calib.studies.pretraining`) draws other corpora with the same renderer and
    captions: ``styles`` restricts the backgrounds (empty: all four), ``caption_noise`` is the probability that
    a caption describes another, random scene (alt text that does not match its image), and ``stream`` > 0
    draws different images.  The defaults give the toy CLIP's own corpus.
    """
    key = [cfg.seed, 1_000_003] + ([stream] if stream else [])
    rng = np.random.default_rng(key)  # disjoint from the benchmark's streams
    birds = rng.integers(0, 2, cfg.n_pairs)
    habitat = rng.random(cfg.n_pairs) < cfg.cooccurrence
    places = np.where(habitat, birds, 1 - birds)
    images = np.empty((cfg.n_pairs, cfg.image_size, cfg.image_size, 3), np.uint8)
    captions = []
    noise_rng = np.random.default_rng(key + [7])  # its own stream: the images do not depend on the noise
    every_style = [s for s in PLACE_WORDS if not styles or s in styles]
    for i in range(cfg.n_pairs):
        img_rng = np.random.default_rng(key[:2] + [i] + key[2:])
        images[i], style = render_scene(img_rng, int(birds[i]), int(places[i]), cfg.image_size, styles)
        text = caption(img_rng, int(birds[i]), style, cfg)
        if caption_noise and noise_rng.random() < caption_noise:
            text = caption(
                noise_rng, int(noise_rng.integers(2)), every_style[noise_rng.integers(len(every_style))], cfg
            )
        captions.append(text)
    return images, captions, np.stack([birds, places], 1)


def checkpoint_dir(cfg: ToyClipConfig = ToyClipConfig(), cache_dir: Path | None = None) -> Path:
    """Folder of the toy CLIP trained with ``cfg`` (its name hashes the config)."""
    return Path(cache_dir or paths.cache_dir()) / "models" / f"{TOY_MODEL_NAME}-{stable_hash(asdict(cfg), 12)}"


def _to_tensor(images: np.ndarray, mean: tuple, std: tuple) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def train_toy_clip(cfg: ToyClipConfig, out_dir: Path, corpus: tuple[np.ndarray, list[str]] | None = None) -> dict:
    """Train the toy CLIP with open_clip's model and contrastive loss; write the checkpoint to ``out_dir``.

    ``corpus``: ``(images [n, H, W, 3] uint8, captions)`` to train on instead of ``make_corpus(cfg)`` (the
    pretraining-source study); ``cfg`` still sets the training (steps, batch, optimiser) and the seed, and
    ``cfg.n_pairs`` must equal ``n``.  Returns a log dict (loss curve, seconds).  Deterministic for a given
    seed and thread count.
    """
    import open_clip
    from open_clip.loss import ClipLoss
    from safetensors.torch import save_file

    from calib.core.logs import progress as tqdm

    register_calib_models()
    t0 = time.time()
    images, captions = corpus if corpus is not None else make_corpus(cfg)[:2]
    if len(images) != cfg.n_pairs or len(captions) != cfg.n_pairs:
        raise ValueError(f"corpus of {len(images)} images / {len(captions)} captions for n_pairs={cfg.n_pairs}")
    t_corpus = time.time() - t0
    torch.manual_seed(cfg.seed)
    with expected_random_init():  # random weights are the point: training starts from them
        model = open_clip.create_model(TOY_MODEL_NAME, pretrained=None, device="cpu")
    tokenizer = open_clip.get_tokenizer(TOY_MODEL_NAME)
    mean, std = (
        model.visual.image_mean or open_clip.OPENAI_DATASET_MEAN,
        model.visual.image_std or open_clip.OPENAI_DATASET_STD,
    )
    x_all = _to_tensor(images, mean, std)
    t_all = tokenizer(captions)
    loss_fn = ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98), fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps))
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    losses = []
    perm = torch.randperm(cfg.n_pairs, generator=gen)
    cursor = 0
    for _ in tqdm(range(cfg.steps), desc="toy CLIP", unit="step", mininterval=5):
        if cursor + cfg.batch_size > cfg.n_pairs:
            perm, cursor = torch.randperm(cfg.n_pairs, generator=gen), 0
        idx = perm[cursor : cursor + cfg.batch_size]
        cursor += cfg.batch_size
        x = x_all[idx]
        flip = torch.rand(len(idx), generator=gen) < 0.5  # mirror images: birds face both ways anyway
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        # The corpus has few distinct captions: encode each once per step (same loss, less compute).
        uniq, inverse = torch.unique(t_all[idx], dim=0, return_inverse=True)
        img_f = model.encode_image(x, normalize=True)
        txt_f = model.encode_text(uniq, normalize=True)[inverse]
        loss = loss_fn(img_f, txt_f, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    os.chmod(weights, default_file_mode())  # safetensors makes it private; it is as shareable as the rest
    model_cfg = json.loads((ASSETS / f"{TOY_MODEL_NAME}.json").read_text())
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": list(mean), "std": list(std)}}
    (out_dir / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    info = {
        "config": asdict(cfg),
        "corpus_seconds": t_corpus,
        "seconds": time.time() - t0,
        "loss_first": losses[0],
        "loss_last": float(np.mean(losses[-20:])),
        "losses": losses[::10],
    }
    (out_dir / "train_log.json").write_text(json.dumps(info, indent=2))
    log.info(
        "toy CLIP trained in %.0f s (corpus %.0f s); loss %.3f -> %.3f",
        info["seconds"],
        t_corpus,
        info["loss_first"],
        info["loss_last"],
    )
    return info


WEIGHTS_FILE = "open_clip_model.safetensors"
CONFIG_FILE = "open_clip_config.json"
MANIFEST_FILE = "manifest.json"  # sha256 and size of the weights and config, written when the folder is made


def _write_manifest(folder: Path) -> None:
    files = {
        name: {"sha256": file_hash(folder / name, 64), "bytes": (folder / name).stat().st_size}
        for name in (WEIGHTS_FILE, CONFIG_FILE)
    }
    (folder / MANIFEST_FILE).write_text(json.dumps(files, indent=2))


def checkpoint_problem(folder: Path) -> str | None:
    """What is wrong with a toy-CLIP checkpoint folder calib made, or None when it is sound.

    A folder with a manifest must match it byte for byte.  One made before manifests existed is checked for what
    a truncated or damaged file breaks: the config parses, the safetensors file parses to the end and its tensors
    are finite.
    """
    weights, config = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    for f in (weights, config):
        if not f.is_file():
            return f"{f} is missing"
    manifest = folder / MANIFEST_FILE
    try:
        if manifest.is_file():
            for name, want in json.loads(manifest.read_text()).items():
                f = folder / name
                if f.stat().st_size != want["bytes"] or file_hash(f, 64) != want["sha256"]:
                    return f"{f} does not match {manifest} (truncated or damaged)"
            return None
        json.loads(config.read_text())
        from safetensors.torch import load_file

        tensors = load_file(str(weights))
    except Exception as err:  # json, safetensors and OS errors alike mean the same: not a usable checkpoint
        return f"{folder} cannot be read ({type(err).__name__}: {str(err).strip()[:200]})"
    if not tensors:
        return f"{weights} holds no tensors"
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        return f"{weights} holds NaN or infinity (in {bad[:3]})"
    return None


def ensure_checkpoint(folder: Path, train: Callable[[Path], object], what: str) -> Path:
    """``folder``'s ``open_clip_model.safetensors``, made by ``train(tmp_folder)`` when it is missing or fails
    :func:`checkpoint_problem` (then a warning names it).

    Training runs under a lock on ``folder``: a second process asking for the same checkpoint meanwhile waits,
    then uses the first one's.  The folder is built under a temporary name and renamed when complete.
    """
    weights = folder / WEIGHTS_FILE
    if folder.exists() and checkpoint_problem(folder) is None:
        return weights
    with locked(folder, remove=True):
        problem = checkpoint_problem(folder) if folder.exists() else None
        if folder.exists() and problem is None:
            log.info("%s was trained by another process meanwhile: using it", folder)
            return weights
        if problem is not None:
            log.warning("%s checkpoint is damaged: %s; training it again", what, problem)
        log.info("training %s (one time, cached at %s)", what, folder)
        with atomic_dir(folder) as tmp:
            train(tmp)
            _write_manifest(tmp)
    return weights


def ensure_toy_clip(cfg: ToyClipConfig = ToyClipConfig(), cache_dir: Path | None = None) -> Path:
    """Path of the toy CLIP's ``open_clip_model.safetensors``, training it first if it is not cached (or if the
    cached one is damaged: see :func:`ensure_checkpoint`)."""
    return ensure_checkpoint(checkpoint_dir(cfg, cache_dir), lambda tmp: train_toy_clip(cfg, tmp), "the toy CLIP")
