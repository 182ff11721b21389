"""The BigEarthNet 19-class nomenclature, in one fixed, documented order.

The order is alphabetical, as in the reBEN training code (configilm's BENv2 utilities), so that
multi-hot vectors written by rsretrieve line up with labels produced by that code.
"""

from collections.abc import Iterable

import numpy as np

CLASSES: tuple[str, ...] = tuple(
    sorted(
        [
            "Urban fabric",
            "Industrial or commercial units",
            "Arable land",
            "Permanent crops",
            "Pastures",
            "Complex cultivation patterns",
            "Land principally occupied by agriculture, with significant areas of natural vegetation",
            "Agro-forestry areas",
            "Broad-leaved forest",
            "Coniferous forest",
            "Mixed forest",
            "Natural grassland and sparsely vegetated areas",
            "Moors, heathland and sclerophyllous vegetation",
            "Transitional woodland, shrub",
            "Beaches, dunes, sands",
            "Inland wetlands",
            "Coastal wetlands",
            "Inland waters",
            "Marine waters",
        ]
    )
)
CLASS_INDEX: dict[str, int] = {name: i for i, name in enumerate(CLASSES)}


def multi_hot(labels: Iterable[str]) -> np.ndarray:
    """Boolean (19,) vector; raises KeyError naming a label outside the nomenclature."""
    vector = np.zeros(len(CLASSES), dtype=bool)
    for label in labels:
        if label not in CLASS_INDEX:
            raise KeyError(f"label {label!r} is not one of the 19 BigEarthNet-v2 classes")
        vector[CLASS_INDEX[label]] = True
    return vector

