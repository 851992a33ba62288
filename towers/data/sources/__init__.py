"""Where the images come from. Each source is a small module that finds the files of one kind of
dataset folder and returns them with their labels, the class names and any official split:

    catsdogs.py  Microsoft's PetImages, the Kaggle competition (and the demo set, which uses its layout),
                 Oxford-IIIT Pet's cat/dog labels
    folders.py   any ROOT/<class>/* tree
    imagenet.py  ILSVRC-2012 as distributed (archives, unpacked through torchvision) and as extracted

:func:`find` detects the layout (``auto``) or uses the one named; :class:`Subset` narrows any source to
some of its classes and images. Nothing here decodes an image; :mod:`towers.data.files` does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from towers.errors import MissingData
from towers.files import shown_path

FORMAT_OF_SUFFIX = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".png": "PNG",
    ".gif": "GIF",
    ".bmp": "BMP",
    ".webp": "WEBP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}

EXPECTED_LAYOUTS = """expected one of:
  Microsoft archive  ROOT/PetImages/Cat/*.jpg and ROOT/PetImages/Dog/*.jpg  (--data.download true fetches it)
  Kaggle             ROOT/train/cat.0.jpg, ROOT/train/dog.0.jpg, ...         (or the files directly in ROOT)
  Oxford-IIIT Pet    ROOT/oxford-iiit-pet/images and .../annotations         (--data.source oxford_pet --data.download true)
  ImageNet           ROOT/train/nXXXXXXXX/*.JPEG and ROOT/val, or the ILSVRC2012_*.tar archives (--data.source imagenet)
  class folders      ROOT/<class>/* with two or more class folders
  demo               --data.source demo generates a synthetic set in ROOT"""


# Layouts whose files under this prefix are the dataset's official test split (ImageNet's validation set).
OFFICIAL_TEST_PREFIX = {"imagenet": "val/"}


@dataclass
class Found:
    """What a source found under a dataset folder.

    ``files`` are (path relative to ``base``, label), sorted by path; ``classes`` the class ids by label
    (folder names, or ImageNet's WordNet ids); ``descriptions`` what each class is in words, where the
    dataset says (ImageNet's devkit); ``test_prefix``: the files under it are the dataset's official
    test split (ImageNet's validation set), None when the dataset has none and the test images are
    drawn at random.
    """

    layout: str
    base: Path
    files: list[tuple[str, int]]
    classes: list[str]
    descriptions: list[str] = field(default_factory=list)
    test_prefix: str | None = None


# ----------------------------------------------------------------------------- folder helpers


def visible(path: Path) -> bool:
    return not path.name.startswith(".")


def class_folder_files(folder: Path, unused: list | None = None) -> list[Path]:
    """The visible files under ``folder``, links included (dangling ones too: :func:`link_problem` sorts
    them out). Folders named like images and linked folders (not followed) go to ``unused`` with why."""
    files = []
    for here, folders, names in os.walk(folder):  # never follows linked folders
        here = Path(here)
        folders[:] = sorted(d for d in folders if not d.startswith("."))
        for name in folders:
            if (here / name).is_symlink():
                note(unused, here / name, "a link to a folder, not followed")
            elif Path(name).suffix.lower() in FORMAT_OF_SUFFIX:
                note(unused, here / name, "a folder named like an image (the files in it are read)")
        files += [here / name for name in names if not name.startswith(".")]
    return sorted(files)


def note(unused: list | None, path: Path, reason: str) -> None:
    if unused is not None:
        unused.append((path, reason))


def link_problem(path: Path, root: Path) -> str | None:
    """Why the symbolic link ``path`` cannot be used (points at nothing, or outside ``root``), else None."""
    if not path.is_symlink():
        return None
    target = path.resolve()
    if not target.exists():
        return f"a symbolic link to {shown_path(os.readlink(path))}, which does not exist"
    if not target.is_relative_to(Path(root).resolve()):
        return f"a symbolic link to {shown_path(target)}, outside the data folder (refused)"
    return None


# ----------------------------------------------------------------------------- detection


def find(root: str | Path, source: str | Subset = "auto", unused: list | None = None) -> Found:
    """The files of ``root`` in the layout ``source`` names (``auto``: the first that matches, in the
    order Oxford-IIIT Pet, Microsoft, Kaggle, ImageNet, class folders), or as a :class:`Subset` selects.

    Entries of the layout's folders that are not used are appended to ``unused`` as (path, reason).
    Raises :class:`MissingData` (a FileNotFoundError) listing what was found and what was expected.
    """
    if isinstance(source, Subset):
        return source.find(root, unused)
    from towers.data.sources import catsdogs, folders, imagenet

    root = Path(root)
    if not root.is_dir():
        raise MissingData(f"Dataset folder {root} does not exist; {EXPECTED_LAYOUTS}")
    finders = {
        "oxford_pet": catsdogs.oxford_pet,
        "microsoft": catsdogs.microsoft,
        "kaggle": catsdogs.kaggle,
        "demo": catsdogs.kaggle,
        "imagenet": imagenet.find,
        "folders": folders.find,
    }
    for layout, finder in finders.items():
        if source not in ("auto", layout) or (source == "auto" and layout == "demo"):
            continue
        seen: list = []  # entries not used; only the detected layout's are kept
        found = finder(root, seen)
        if found is not None and found.files:
            if unused is not None:
                unused += seen
            return found
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    shown = ", ".join(entries[:20]) + (f", ... ({len(entries)} entries)" if len(entries) > 20 else "")
    asked = "" if source == "auto" else f" in the {source!r} layout"
    raise MissingData(
        f"No labelled images found{asked} in {root}. Found: {shown or 'an empty folder'}; {EXPECTED_LAYOUTS}"
    )


def find_images(
    root: str | Path, layout: str | Subset = "auto", unused: list | None = None
) -> tuple[str, Path, list[tuple[str, int]], list[str]]:
    """``(layout, base, [(path relative to base, label)], class names)`` of :func:`find`."""
    found = find(root, layout, unused)
    return found.layout, found.base, found.files, found.classes


@dataclass(frozen=True)
class Subset:
    """Some classes of a source and some training images of each (ImageNet-100 style subsets).

    ``classes``: None (all), a number N (N classes drawn at random with ``seed``, then sorted), or
    the path of a text file of class ids one a line (``#`` comments). ``images_per_class``: None
    (all), or at most N training images of each class, drawn at random with ``seed``; an official
    test split keeps all its images of the chosen classes. Labels are renumbered 0..C-1 in the
    order of the chosen class ids. Everything depends on ``seed`` and the dataset alone.
    """

    source: str = "auto"
    classes: int | str | None = None
    images_per_class: int | None = None
    seed: int = 0

    def find(self, root: str | Path, unused: list | None = None) -> Found:
        import numpy as np

        from towers.errors import BadOption

        found = find(root, self.source, unused)
        chosen = list(range(len(found.classes)))
        if isinstance(self.classes, int):
            if not 1 <= self.classes <= len(found.classes):
                raise BadOption(f"--data.classes {self.classes}: the data has {len(found.classes)} classes")
            chosen = sorted(np.random.default_rng(self.seed).choice(len(found.classes), self.classes, replace=False))
        elif self.classes is not None:
            path = Path(self.classes)
            if not path.is_file():
                raise BadOption(f"--data.classes {self.classes}: neither a number nor a file of class ids")
            wanted = [w.split("#")[0].strip() for w in path.read_text().splitlines()]
            wanted = list(dict.fromkeys(w for w in wanted if w))
            missing = [w for w in wanted if w not in found.classes]
            if missing or not wanted:
                raise BadOption(
                    f"--data.classes {path}: {len(missing)} of its {len(wanted)} class ids are not in the data "
                    f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})"
                )
            chosen = sorted(found.classes.index(w) for w in wanted)
        relabel = {int(old): new for new, old in enumerate(chosen)}
        files = [(f, relabel[label]) for f, label in found.files if label in relabel]
        if self.images_per_class is not None:
            if self.images_per_class < 1:
                raise BadOption(f"--data.images_per_class {self.images_per_class} must be at least 1")
            test = [(f, y) for f, y in files if found.test_prefix and f.startswith(found.test_prefix)]
            train = [(f, y) for f, y in files if not (found.test_prefix and f.startswith(found.test_prefix))]
            rng = np.random.default_rng([self.seed, 1])
            kept = []
            for label in range(len(chosen)):
                mine = [item for item in train if item[1] == label]
                pick = rng.permutation(len(mine))[: self.images_per_class]
                kept += [mine[i] for i in sorted(pick)]
            files = sorted(kept + test)
        return Found(
            found.layout,
            found.base,
            files,
            [found.classes[i] for i in chosen],
            [found.descriptions[i] for i in chosen] if found.descriptions else [],
            found.test_prefix,
        )
