"""Cats vs dogs (cat = 0, dog = 1) in the layouts it is distributed in: Microsoft's PetImages, the Kaggle
competition's train/cat.N.jpg (also the demo set's layout), and Oxford-IIIT Pet's cat/dog labels.
Their downloads are in :mod:`towers.data.download`. None has an official test split we use."""

import re
from pathlib import Path

from towers.data.sources import FORMAT_OF_SUFFIX, Found, class_folder_files, visible

CLASSES = ("cat", "dog")  # label 0 is cat, 1 is dog
KAGGLE_NAME = re.compile(r"^(cat|dog)\.\d+\.\w+$", re.IGNORECASE)


def oxford_pet(root: Path, unused: list) -> Found | None:
    """ROOT/oxford-iiit-pet/{images,annotations}: the species column of trainval.txt and test.txt."""
    pet = root / "oxford-iiit-pet" if (root / "oxford-iiit-pet").is_dir() else root
    if not ((pet / "annotations" / "trainval.txt").is_file() and (pet / "images").is_dir()):
        return None
    files = []
    for split in ("trainval.txt", "test.txt"):  # lines: "<image id> <breed id> <species 1=cat 2=dog> <breed>"
        for line in (pet / "annotations" / split).read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                image_id, _, species, *_ = line.split()
                files.append((f"images/{image_id}.jpg", int(species) - 1))
    return Found("oxford_pet", pet, sorted(set(files)), list(CLASSES))


def microsoft(root: Path, unused: list) -> Found | None:
    """ROOT/PetImages/Cat/* and ROOT/PetImages/Dog/* (or Cat/ and Dog/ directly in ROOT)."""
    petimages = root / "PetImages" if (root / "PetImages").is_dir() else root
    if not ((petimages / "Cat").is_dir() and (petimages / "Dog").is_dir()):
        return None
    files = [
        (str(p.relative_to(petimages)), label)
        for label, name in enumerate(("Cat", "Dog"))
        for p in class_folder_files(petimages / name, unused)
    ]
    return Found("microsoft", petimages, sorted(files), list(CLASSES))


def kaggle(root: Path, unused: list) -> Found | None:
    """ROOT/train/cat.N.jpg and ROOT/train/dog.N.jpg (or the files directly in ROOT); test1/ is unlabelled."""
    for base in (root / "train", root):
        entries = sorted(p for p in base.glob("*.*") if visible(p)) if base.is_dir() else []
        # links are kept whatever they point at (link_problem sorts them out), folders are not
        names = [p.name for p in entries if (p.is_file() or p.is_symlink()) and KAGGLE_NAME.match(p.name)]
        if names:
            used = set(names)
            unused += [
                (p, "a folder named like an image")
                if p.is_dir() and not p.is_symlink()
                else (p, "named like an image but not cat.N.ext or dog.N.ext, so it has no label")
                for p in entries
                if p.suffix.lower() in FORMAT_OF_SUFFIX and p.name not in used
            ]
            files = [(name, CLASSES.index(name.split(".")[0].lower())) for name in names]
            return Found("kaggle", base, files, list(CLASSES))
    return None
