from .shapes import ShapesDataset, generate_shapes_dataset
from .transforms import PolygonRandomCrop, RobustPolygonMasks, clip_polygons_to_box

__all__ = [
    'ShapesDataset', 'generate_shapes_dataset', 'PolygonRandomCrop', 'RobustPolygonMasks', 'clip_polygons_to_box'
]
