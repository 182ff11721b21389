"""Pictures and files for people and other tools: the query mosaic, a store as GeoParquet."""

from rsretrieve.export.geoparquet import ExportSummary, export_geoparquet
from rsretrieve.export.mosaic import labels_subtitle, mosaic_size, render_mosaic, to_rgb

__all__ = ["ExportSummary", "export_geoparquet", "labels_subtitle", "mosaic_size", "render_mosaic", "to_rgb"]
