from .shapes import ShapesDataset, generate_shapes_dataset
from .transforms import PolygonRandomCrop, clip_polygons_to_box

__all__ = ['ShapesDataset', 'generate_shapes_dataset', 'PolygonRandomCrop', 'clip_polygons_to_box']
