"""Each dataset's prompt file: the words that prompt-based label-free methods read.

One JSON file per dataset under ``calib/data/prompts/`` (``toy-quick`` reads ``toy.json``).  A file holds one
section per method family, each with its ``source`` (the authors' code the strings come from, or "calib" for lists
written in their style where the authors have none):

- ``orth_cali``: ``class_prompts [C]``, ``spurious_prompts [k]``, ``candidate_prompts [n]``, ``candidate_pairs``
  (index pairs into the candidates: same class, different spurious attribute);
- ``roboshot``: ``class_prompts [C]``, ``reject`` and ``accept`` (concept pairs ``[first, second]``: the direction
  is ``emb(first) - emb(second)``);
- ``tie`` and ``fairerclip``: ``class_prompts [C]``, ``spurious_prompts`` (one list of prompts per spurious-attribute
  value, in the dataset's attribute order ``attr_names``).

The file also names the dataset's ``class_names`` and ``attr_names``, so a file that does not fit its dataset
fails here, with the file named, instead of as a silent mismatch inside a method.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

PROMPT_DIR = Path(__file__).resolve().parent / "prompts"
ALIASES = {"toy-quick": "toy"}  # dataset name -> prompt file stem
SECTIONS: dict[str, tuple[str, ...]] = {
    "orth_cali": ("class_prompts", "spurious_prompts", "candidate_prompts", "candidate_pairs"),
    "roboshot": ("class_prompts", "reject", "accept"),
    "tie": ("class_prompts", "spurious_prompts"),
    "fairerclip": ("class_prompts", "spurious_prompts"),
}


class PromptFileError(ValueError):
    """A prompt file that is missing, unreadable or does not fit its dataset."""


def prompt_file(dataset: str) -> Path:
    """The prompt file of ``dataset`` (which may not exist)."""
    return PROMPT_DIR / f"{ALIASES.get(dataset, dataset)}.json"


def has_prompt_file(dataset: str) -> bool:
    return prompt_file(dataset).is_file()


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) and v.strip() for v in value)


def check_prompt_spec(spec: dict[str, Any], where: str) -> None:
    """Raise :class:`PromptFileError` naming ``where`` when ``spec`` breaks the layout in the module docstring."""

    def fail(msg: str) -> None:
        raise PromptFileError(f"prompt file {where}: {msg}")

    if not isinstance(spec, dict):
        fail("is not a JSON object")
    for key in ("class_names", "attr_names"):
        if not _strings(spec.get(key)):
            fail(f"{key!r} must be a list of names")
    n_classes, n_attrs = len(spec["class_names"]), len(spec["attr_names"])
    for name, keys in SECTIONS.items():
        section = spec.get(name)
        if section is None:
            continue
        if not isinstance(section, dict) or not isinstance(section.get("source"), str):
            fail(f"section {name!r} must be an object with a 'source'")
        missing = [k for k in keys if k not in section]
        if missing:
            fail(f"section {name!r} lacks {missing}")
        if not _strings(section["class_prompts"]) or len(section["class_prompts"]) != n_classes:
            fail(f"{name}.class_prompts must hold {n_classes} prompts, one per class {spec['class_names']}")
        if name == "orth_cali":
            if not _strings(section["spurious_prompts"]) or not _strings(section["candidate_prompts"]):
                fail("orth_cali.spurious_prompts and candidate_prompts must be lists of prompts")
            n = len(section["candidate_prompts"])
            pairs = section["candidate_pairs"]
            if not pairs or not all(
                isinstance(p, list)
                and len(p) == 2
                and all(isinstance(i, int) and 0 <= i < n for i in p)
                and p[0] != p[1]
                for p in pairs
            ):
                fail(f"orth_cali.candidate_pairs must be pairs of distinct indices into the {n} candidate prompts")
        elif name == "roboshot":
            for key in ("reject", "accept"):
                if not isinstance(section[key], list) or not all(_strings(p) and len(p) == 2 for p in section[key]):
                    fail(f"roboshot.{key} must be a list of [first, second] concept pairs")
            if not section["reject"]:
                fail("roboshot.reject needs at least one concept pair")
        else:
            per_value = section["spurious_prompts"]
            if not isinstance(per_value, list) or len(per_value) != n_attrs or not all(map(_strings, per_value)):
                fail(f"{name}.spurious_prompts must hold one list of prompts per attribute value {spec['attr_names']}")


@cache
def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def load_prompt_file(dataset: str) -> dict[str, Any]:
    """The parsed, checked prompt file of ``dataset``; :class:`PromptFileError` when there is none or it is bad."""
    path = prompt_file(dataset)
    if not path.is_file():
        known = sorted(p.stem for p in PROMPT_DIR.glob("*.json"))
        raise PromptFileError(f"dataset {dataset!r} has no prompt file {path}; prompt files exist for {known}")
    try:
        spec = json.loads(_read(path))
    except (OSError, ValueError) as err:
        raise PromptFileError(f"prompt file {path} cannot be read: {err}") from err
    check_prompt_spec(spec, str(path))
    return spec


def prompt_texts(spec: dict[str, Any]) -> list[str]:
    """Every prompt in ``spec`` (sorted, each once): what the text encoder embeds for it."""
    texts: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, str):
            texts.add(value)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    for name in SECTIONS:
        for key, value in spec.get(name, {}).items():
            if key not in ("source", "notes", "candidate_pairs"):
                walk(value)
    return sorted(texts)


def check_fits(spec: dict[str, Any], dataset: str, class_names: list[str], attr_names: list[str] | None) -> None:
    """Raise :class:`PromptFileError` when the file's class or attribute names are not the dataset's."""
    path = prompt_file(dataset)
    if list(spec["class_names"]) != list(class_names):
        raise PromptFileError(f"prompt file {path} is for classes {spec['class_names']}, the dataset has {class_names}")
    if attr_names is not None and list(spec["attr_names"]) != list(attr_names):
        raise PromptFileError(
            f"prompt file {path} is for attribute values {spec['attr_names']}, the dataset has {attr_names}"
        )
