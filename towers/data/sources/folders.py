"""Any ROOT/<class>/* tree with two or more class folders: cat(s)/dog(s) map to 0/1 whatever the case,
other class names to their sorted order. No official test split."""

from pathlib import Path

from towers.data.sources import Found, class_folder_files, visible
from towers.data.sources.catsdogs import CLASSES


def class_label(name: str, names: list[str]) -> int:
    """cat/cats -> 0 and dog/dogs -> 1 whatever the case; other class names by sorted order."""
    lower = [n.lower().rstrip("s") for n in names]
    if sorted(lower) == list(CLASSES):
        return CLASSES.index(name.lower().rstrip("s"))
    return sorted(names).index(name)


def find(root: Path, unused: list) -> Found | None:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and visible(p) and class_folder_files(p))
    if len(folders) < 2:
        return None
    names = [f.name for f in folders]
    files = [
        (str(p.relative_to(root)), class_label(f.name, names)) for f in folders for p in class_folder_files(f, unused)
    ]
    return Found("folders", root, sorted(files), sorted(names, key=lambda n: class_label(n, names)))
