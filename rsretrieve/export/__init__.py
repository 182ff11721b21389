"""Pictures and files for people and other tools: the query mosaic."""

from rsretrieve.export.mosaic import labels_subtitle, mosaic_size, render_mosaic, to_rgb

__all__ = ["labels_subtitle", "mosaic_size", "render_mosaic", "to_rgb"]
