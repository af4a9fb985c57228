"""Class names: what a class index means, for checkpoints, results.json, predictions.csv, exports and prediction.

A train.py checkpoint stores its training data's class folder names (``classes``). Folders named by ImageNet-1k's
WordNet ids, and released weights (which store nothing), read as ImageNet-1k's human-readable names: the first
WordNet lemma of each wnid (``imagenet_classes.tsv``, shipped with the package; taken from timm's
``timm/data/_info/imagenet_synset_to_lemma.txt``, which lists WordNet's lemmas per synset).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from importlib import resources

from .imagenet_wnids import IMAGENET1K_WNIDS

__all__ = ["class_names_of", "display_names", "imagenet_class_names", "wnid_lemmas"]


@lru_cache(maxsize=1)
def wnid_lemmas() -> dict[str, str]:
    """wnid -> its WordNet lemmas ('tench, Tinca tinca') for ImageNet-1k's 1,000 classes."""
    text = resources.files("res2net.data").joinpath("imagenet_classes.tsv").read_text(encoding="utf-8")
    return dict(line.split("\t", 1) for line in text.splitlines() if line)


def imagenet_class_names() -> list[str]:
    """ImageNet-1k's class names in class-index order (the first lemma of each sorted wnid: 'tench', 'goldfish')."""
    lemmas = wnid_lemmas()
    return [lemmas[w].split(",", 1)[0].strip() for w in IMAGENET1K_WNIDS]


def display_names(classes: Sequence[str]) -> list[str]:
    """Readable names of class folder names: ImageNet wnids become their first lemma, other names stay."""
    lemmas = wnid_lemmas()
    return [lemmas[c].split(",", 1)[0].strip() if c in lemmas else c for c in classes]


def class_names_of(checkpoint: Mapping, num_classes: int) -> list[str]:
    """The names of a model's ``num_classes`` outputs: a checkpoint's (or export record's) ``classes``, else
    ImageNet-1k's when it has 1,000 outputs (released weights), else the indices as strings."""
    stored = checkpoint.get("classes")
    if isinstance(stored, Sequence) and not isinstance(stored, str) and len(stored) == num_classes:
        return display_names([str(c) for c in stored])
    if num_classes == len(IMAGENET1K_WNIDS):
        return imagenet_class_names()
    return [str(i) for i in range(num_classes)]
