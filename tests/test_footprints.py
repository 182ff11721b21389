"""Patch footprints in WGS84 (`rsretrieve.geo`): the UTM zone of a patch, its MGRS tile, its 1,200 m
square, checked against the GeoTIFFs' own bounds."""

import math

import numpy as np
import pytest
import rasterio
import shapely
from rasterio.transform import Affine
from rasterio.warp import transform, transform_bounds, transform_geom

from rsretrieve import geo
from rsretrieve.datasets import open_dataset, sample_root
from rsretrieve.datasets.benv2 import band_path

AREA_M2 = 1200.0 * 1200.0


def metres_apart(a, b, lat):
    """Largest difference between two (west, south, east, north) boxes in degrees, in metres."""
    dx = max(abs(a[0] - b[0]), abs(a[2] - b[2])) * 111_320.0 * math.cos(math.radians(lat))
    dy = max(abs(a[1] - b[1]), abs(a[3] - b[3])) * 110_574.0
    return max(dx, dy)


def in_crs(polygon, crs):
    """A WGS84 shapely geometry in another CRS (rasterio's transform_geom)."""
    return shapely.geometry.shape(transform_geom("EPSG:4326", crs, shapely.geometry.mapping(polygon)))


def assert_is_the_raster(polygon, lat, lon, path, metres=1.0):
    """The footprint contains the centre, covers 1.44 km2 in the raster's CRS, and matches its bounds."""
    with rasterio.open(path) as ds:
        crs, bounds = ds.crs, ds.bounds
    assert polygon.is_valid and polygon.geom_type == "Polygon"
    assert polygon.contains(shapely.Point(lon, lat))
    back = in_crs(polygon, crs)
    assert back.area == pytest.approx(AREA_M2, rel=1e-3)
    assert back.hausdorff_distance(shapely.box(*bounds)) < 0.05  # the square itself, to centimetres
    assert metres_apart(polygon.bounds, transform_bounds(crs, "EPSG:4326", *bounds), lat) < metres


@pytest.mark.parametrize("modality,band", [("s2", "B02"), ("s1", "VV")])
def test_every_sample_patch_footprint_is_its_geotiff(modality, band):
    meta = open_dataset("sample").metadata(modality).to_pylist()
    assert len(meta) == 24
    root = sample_root()
    many = geo.patch_footprints([r["lat"] for r in meta], [r["lon"] for r in meta], [r["patch_id"] for r in meta])
    for row, polygon, epsg in zip(meta, many.wgs84, many.epsg):
        tile = geo.mgrs_tile_of(row["patch_id"])
        assert tile in ("33UUP", "35VNJ")
        assert epsg == geo.utm_epsg_of(row["lat"], row["lon"], tile) == 32600 + int(tile[:2])
        one = geo.footprint(row["lat"], row["lon"], epsg)
        assert one.equals_exact(polygon, 1e-12)
        assert_is_the_raster(polygon, row["lat"], row["lon"], band_path(root, row["patch_id"], modality, band))
        assert polygon.exterior.is_ccw


def test_major_tom_sample_footprints_are_their_windows():
    """The Major TOM sample's cells are BigEarthNet patches (one 120 px window each): S2 ids carry
    their product's tile (T33UUP), S1 ids none (the zone of the position, 33 here too)."""
    dataset = open_dataset("majortom", root=sample_root() / "majortom")
    for modality, band in (("s2", "B02"), ("s1", "VV")):
        meta = dataset.metadata(modality).to_pylist()
        found = geo.footprints([r["lat"] for r in meta], [r["lon"] for r in meta], [r["patch_id"] for r in meta])
        for row, polygon in zip(meta, found):
            tile = row["product_id"].rsplit("_T", 1)[1] if modality == "s2" else None
            assert geo.mgrs_tile_of(row["patch_id"]) == tile
            assert row["window"] == [0, 0, 120, 120]
            source = band_path(sample_root(), row["source_patch_id"], modality, band)
            assert_is_the_raster(polygon, row["lat"], row["lon"], source)


def write_patch(path, crs, west, north, size=120, res=10.0):
    profile = {"driver": "GTiff", "width": size, "height": size, "count": 1, "dtype": "uint16", "crs": crs,
               "transform": Affine(res, 0.0, west, 0.0, -res, north)}
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(np.ones((1, size, size), dtype="uint16"))
    with rasterio.open(path) as ds:
        x, y = geo.pixel_to_xy(ds.transform, ds.width / 2, ds.height / 2)
        lats, lons = geo.to_wgs84(ds.crs, [x], [y])
    return float(lats[0]), float(lons[0])


def test_a_southern_hemisphere_patch(tmp_path):
    """Near Sydney, in EPSG:32756 (false northing 10,000 km): the zone and hemisphere come from the
    position, or from the tile's latitude band (H: south)."""
    path = tmp_path / "sydney.tif"
    lat, lon = write_patch(path, "EPSG:32756", 334_000.0, 6_251_200.0)
    assert -34.0 < lat < -33.8 and 151.1 < lon < 151.3
    assert geo.utm_epsg_of(lat, lon) == 32756
    patch_id = "S2B_MSIL2A_20200105T235239_N0213_R130_T56HLH_20200106T011205/1U_1R/0_0"
    assert geo.mgrs_tile_of(patch_id) == "56HLH" and geo.utm_epsg_of(lat, lon, "56HLH") == 32756
    assert_is_the_raster(geo.footprint(lat, lon, 32756), lat, lon, path)
    assert_is_the_raster(geo.footprints([lat], [lon], [patch_id])[0], lat, lon, path)


def test_the_tile_zone_wins_over_the_longitude(tmp_path):
    """32TQM lies in zone 32 although its eastern part is east of 12 E (zone 33's longitudes): a patch
    there is a square in EPSG:32632, which the tile in its id says; the zone of its longitude would
    give a square turned by about 2 degrees, tens of metres off at the corners."""
    path = tmp_path / "t32tqm.tif"
    lat, lon = write_patch(path, "EPSG:32632", 790_000.0, 5_001_200.0)
    assert lon > 12.0 and geo.utm_epsg_of(lat, lon) == 32633
    patch_id = "S2A_MSIL2A_20180601T101021_N9999_R022_T32TQM_40_80"
    assert geo.mgrs_tile_of(patch_id) == "32TQM" and geo.utm_epsg_of(lat, lon, "32TQM") == 32632
    right = geo.patch_footprints([lat], [lon], [patch_id])
    assert right.epsg.tolist() == [32632]
    assert_is_the_raster(right.wgs84[0], lat, lon, path)
    assert right.utm[0].equals_exact(shapely.box(790_000.0, 5_000_000.0, 791_200.0, 5_001_200.0), 1e-6)
    wrong = geo.footprint(lat, lon, 32633)
    with rasterio.open(path) as ds:
        assert in_crs(wrong, ds.crs).hausdorff_distance(shapely.box(*ds.bounds)) > 10.0


@pytest.mark.parametrize("name,tile", [
    ("S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_26_57", "33UUP"),
    ("S1B_IW_GRDH_1SDV_20170612T165809_33UUP_37_88", "33UUP"),
    ("S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP/539U_97R.1/0_0", "33UUP"),
    ("S2B_MSIL2A_20200529T101559_N0214_R065_T32TQM_20200529T131339", "32TQM"),
    ("S2B_MSIL1C_20230119T161811_N0509_R111_T01CDJ_20230119T190838/922D_249L/105_0", "01CDJ"),
    ("S1B_IW_GRDH_1SDV_20170612T165809/539U_97R/0_0", None),  # Major TOM S1: no tile
    ("S1A_IW_GRDH_1SDV_20170613T165043", None),
    ("S2A_MSIL2A_20170613T101031_N9999_R022", None),
])
def test_mgrs_tile_of(name, tile):
    assert geo.mgrs_tile_of(name) == tile


def test_utm_zones_by_position_and_by_tile():
    assert geo.utm_epsg_of(48.3, 13.7) == 32633
    assert geo.utm_epsg_of(-33.9, 151.2) == 32756
    assert geo.utm_epsg_of(60.4, 5.3) == 32632  # Bergen: Norway's 32V, not 31
    assert geo.utm_epsg_of(78.2, 15.6) == 32633  # Longyearbyen: Svalbard's 33X
    assert geo.utm_epsg_of(78.2, 8.0) == 32631 and geo.utm_epsg_of(78.2, 25.0) == 32635
    assert geo.utm_epsg_of(10.0, 179.9) == 32660 and geo.utm_epsg_of(10.0, 180.0) == geo.utm_epsg_of(10.0, -180.0) == 32601
    assert geo.utm_epsg_of(-5.0, 30.0, "35MNT") == 32735  # band M: south
    assert geo.utm_epsg_of(5.0, 30.0, "35NNA") == 32635  # band N: north
    assert geo.utm_epsg_of(0.0, 0.0, "01CDJ") == 32701  # the tile, whatever the point says
    for bad in ("33U", "61UUP", "33IUP", "T33UUP"):
        with pytest.raises(ValueError):
            geo.utm_epsg_of(48.0, 13.0, bad)
    with pytest.raises(ValueError):
        geo.utm_epsg_of(float("nan"), 13.0)
    assert geo.utm_epsg(33) == 32633 and geo.utm_epsg(33, north=False) == 32733  # unchanged


def test_unlocated_patches_and_the_antimeridian():
    found = geo.patch_footprints([48.34, float("nan"), 0.5], [13.73, 13.0, 179.9995], ["a", "b", "c"])
    assert found.wgs84[1] is None and found.utm[1] is None and found.epsg[1] == 0
    assert found.wgs84[0].geom_type == "Polygon"
    crossing = found.wgs84[2]  # zone 60, cut at 180 degrees into two parts
    assert crossing.geom_type == "MultiPolygon" and crossing.bounds[0] == -180.0 and crossing.bounds[2] == 180.0
    assert crossing.intersects(shapely.Point(179.9995, 0.5))
    with pytest.raises(ValueError):
        geo.patch_footprints([1.0, 2.0], [1.0], None)
    corners = geo.footprint(48.34, 13.73, 32633, densify_m=None)
    assert len(corners.exterior.coords) == 5
    assert len(geo.footprint(48.34, 13.73, 32633).exterior.coords) == 17  # 300 m segments
    x, y = transform("EPSG:4326", "EPSG:32633", [13.73], [48.34])
    assert in_crs(geo.footprint(48.34, 13.73, 32633, size_m=10_680.0), "EPSG:32633").area == pytest.approx(10_680.0 ** 2, rel=1e-6)
    assert shapely.Point(x[0], y[0]).within(found.utm[0])
