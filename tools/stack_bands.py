"""Stack a BigEarthNet patch folder's single-band GeoTIFFs into one multi-band query tile.

    python tools/stack_bands.py <patch folder> out.tif

S1 folders give a 2-band VV,VH tile; S2 folders a 10-band tile (20 m bands upsampled to 10 m with
nearest neighbour), each band described by name so `rsretrieve query` detects the modality.
"""

import sys
from pathlib import Path

import rasterio

from rsretrieve.bands import PATCH_SIZE, S1_BANDS, S2_BANDS, upsample_nearest


def stack(folder: Path, out: Path) -> Path:
    name = folder.name
    bands = S1_BANDS if (folder / f"{name}_VV.tif").exists() else S2_BANDS
    arrays, profile = [], None
    for band in bands:
        with rasterio.open(folder / f"{name}_{band}.tif") as src:
            data = src.read(1)
            if data.shape[-1] == PATCH_SIZE:
                profile = src.profile
            arrays.append(upsample_nearest(data) if data.shape[-1] != PATCH_SIZE else data)
    profile.update(count=len(bands), compress="deflate")
    out.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(out, "w", **profile) as dst:
        for i, (band, data) in enumerate(zip(bands, arrays), start=1):
            dst.write(data, i)
            dst.set_band_description(i, band)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(stack(Path(sys.argv[1]), Path(sys.argv[2])))
