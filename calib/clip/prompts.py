"""Prompt templates and class names for zero-shot heads."""

from __future__ import annotations


def imagenet_templates() -> list[str]:
    """The 80 CLIP ImageNet prompt templates, as ``str.format`` patterns with one ``{}``."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
