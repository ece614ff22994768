"""Prompt templates for zero-shot heads, and the embedded prompt files of the prompt-based methods."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


def imagenet_templates() -> list[str]:
    """The 80 CLIP ImageNet prompt templates, as ``str.format`` patterns with one ``{}``."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]


@dataclass
class PromptBank:
    """A dataset's prompt file (:mod:`calib.data.prompt_files`) and the CLIP text embedding of each of its prompts:
    what the prompt-based methods (Orth-Cali, RoboShot, TIE*, FairerCLIP) read.

    ``texts [k]`` and ``vectors [k, d]`` (float32, *unnormalised* ``encode_text`` outputs: RoboShot's concept
    differences are taken before normalising, the others normalise each prompt first).
    """

    spec: dict[str, Any]
    texts: list[str]
    vectors: np.ndarray
    _index: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2 or len(self.vectors) != len(self.texts):
            raise ValueError(f"{len(self.texts)} prompts but text embeddings of shape {self.vectors.shape}")
        self._index = {t: i for i, t in enumerate(self.texts)}

    def section(self, name: str) -> dict[str, Any]:
        """The prompt file's section for method family ``name`` (``orth_cali``, ``roboshot``, ...)."""
        if name not in self.spec:
            raise ValueError(f"the prompt file of {self.spec.get('dataset', '?')!r} has no {name!r} section")
        return self.spec[name]

    def embed(self, texts: list[str], normalized: bool = False) -> np.ndarray:
        """Embeddings ``[len(texts), d]`` (float64) of prompts of this bank, each row unit-norm if ``normalized``."""
        missing = [t for t in texts if t not in self._index]
        if missing:
            raise KeyError(f"prompts not embedded in this bank: {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        out = self.vectors[[self._index[t] for t in texts]].astype(np.float64)
        return out / np.linalg.norm(out, axis=1, keepdims=True) if normalized else out

    def ensemble(self, groups: list[list[str]]) -> np.ndarray:
        """One unit prototype per group of prompts ``[len(groups), d]``: the normalised mean of the normalised
        embeddings (CLIP's prompt ensembling; a group of one prompt is that prompt's unit embedding)."""
        protos = np.stack([self.embed(g, normalized=True).mean(0) for g in groups])
        return protos / np.linalg.norm(protos, axis=1, keepdims=True)


@torch.no_grad()
def embed_texts(
    model: Any, tokenizer: Any, texts: list[str], device: str | torch.device, batch_size: int = 256
) -> np.ndarray:
    """``model.encode_text`` of each text, unnormalised float32 ``[len(texts), d]``."""
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[start : start + batch_size]).to(device)
        out.append(model.encode_text(tokens).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)
