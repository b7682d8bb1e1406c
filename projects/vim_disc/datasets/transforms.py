"""A random crop whose polygon path never crashes and never corrupts a mask.

LSJ crops every training image. Keeping instance masks as polygons through that crop (instead of
full-resolution bitmaps) is cheaper at 1024 x 1024, but clipping a polygon to a box returns anything
Shapely can produce: Polygon, MultiPolygon, GeometryCollection (polygons mixed with the lines and
points where the shape only touches the box), polygons with holes, or nothing. COCO also holds
self-intersecting (bow-tie) and degenerate rings.

Representation (see docs/polygon_crop.md): mmdet's ``PolygonMasks`` holds, per instance, a list of
flat rings ``[x0, y0, x1, y1, ...]``, and rasterises an instance as the UNION of its rings
(``pycocotools.frPyObjects`` + ``merge``), each ring filled even-odd. A union cannot express a
hole, so a clipped region is written as hole-free, non-overlapping pieces whose union is exactly
that region: every polygon that still has an interior ring is cut by a vertical line through a
hole until no piece has one. Non-overlapping pieces also keep ``PolygonMasks.areas`` (a sum of
shoelace areas) equal to the true area.

Self-intersecting rings are repaired with ``shapely.make_valid`` (linework method: the even-odd
reading, the same one pycocotools rasterises), not ``buffer(0)``, which keeps one lobe of a bow-tie.
"""
from typing import Iterator, List, Optional, Sequence, Union

import numpy as np
import shapely
from mmdet.datasets.transforms import RandomCrop
from mmdet.registry import TRANSFORMS
from mmdet.structures.mask import PolygonMasks
from shapely.geometry.base import BaseGeometry

# What mmdet writes for an instance without a usable polygon (LoadAnnotations' fake mask,
# PolygonMasks.crop's "dummy polygon"): a degenerate ring at the origin. It rasterises to an
# empty bitmap, has zero area and gives the box [0, 0, 0, 0], exactly what an empty bitmap gives,
# so FilterAnnotations treats a vanished polygon instance as it treats a vanished bitmap one.
VANISHED_RING = np.zeros(6, dtype=np.float64)


def _ring_to_region(ring: Sequence[float]) -> Optional[BaseGeometry]:
    """One flat ring -> the valid region it encloses (even-odd), or None if it encloses no area."""
    xy = np.asarray(ring, dtype=np.float64).ravel()
    if xy.size % 2 or xy.size < 6:
        return None
    xy = xy.reshape(-1, 2)
    # NaN/inf would poison every GEOS predicate.
    if not np.isfinite(xy).all():
        return None
    # Fewer than 3 distinct (or only collinear) vertices collapse to a line or a point: zero area.
    region = shapely.make_valid(shapely.Polygon(xy))
    return region if region.area > 0 else None


def _polygonal_parts(geom: BaseGeometry) -> Iterator[shapely.Polygon]:
    """Every non-empty Polygon inside ``geom``, however deeply collections nest; lines and
    points (where a shape only touches the box) carry no area and are dropped."""
    if geom.is_empty:
        return
    if isinstance(geom, shapely.Polygon):
        yield geom
    elif hasattr(geom, 'geoms'):  # MultiPolygon, GeometryCollection, Multi* of lines/points
        for part in geom.geoms:
            yield from _polygonal_parts(part)


def _split_holes(polygon: shapely.Polygon) -> List[shapely.Polygon]:
    """Hole-free pieces whose union is ``polygon``.

    A vertical line through a hole (strictly inside the hole's x-range) crosses it, so on either
    side that hole opens onto the cut and becomes part of the outer boundary: each cut removes at
    least one interior ring, and the recursion ends. Pieces only share cut edges (zero area).
    """
    if not polygon.interiors:
        return [polygon]
    hole_x0, _, hole_x1, _ = polygon.interiors[0].bounds
    cut_x = 0.5 * (hole_x0 + hole_x1)
    x0, y0, x1, y1 = polygon.bounds
    pieces = []
    for half in (shapely.box(x0 - 1, y0 - 1, cut_x, y1 + 1), shapely.box(cut_x, y0 - 1, x1 + 1, y1 + 1)):
        for part in _polygonal_parts(polygon.intersection(half)):
            pieces.extend(_split_holes(part))
    return pieces


def _exterior_ring(polygon: shapely.Polygon, x1: float, y1: float) -> Optional[np.ndarray]:
    """The flat exterior ring of a hole-free polygon, shifted into the crop frame, or None for a
    piece without area (positive area also means at least 3 distinct vertices)."""
    xy = np.asarray(polygon.exterior.coords, dtype=np.float64)[:-1]  # drop the closing vertex
    if len(xy) < 3 or not polygon.area > 0 or not np.isfinite(xy).all():
        return None
    return (xy - np.array([x1, y1])).ravel()


def clip_polygons_to_box(polys: Sequence[Sequence[float]],
                         box: Sequence[float]) -> List[np.ndarray]:
    """Clip one instance's rings to a box and shift them into the box's frame.

    Args:
        polys: the instance's rings, each flat ``[x0, y0, x1, y1, ...]`` (COCO's polygon format);
            the instance is their union, each ring read even-odd, as pycocotools rasterises it.
            Rings may be self-intersecting, degenerate, or hold NaN/inf.
        box: the crop ``(x1, y1, x2, y2)`` in the same frame as ``polys``.

    Returns:
        Hole-free, non-overlapping flat float64 rings (closing vertex not repeated) in the frame whose
        origin is ``(x1, y1)``; their union is exactly the part of the instance inside the box. An
        empty list when nothing with positive area is left. Never raises on malformed rings: they
        are dropped.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    if not (x2 > x1 and y2 > y1):
        return []
    regions = [r for r in (_ring_to_region(ring) for ring in polys) if r is not None]
    if not regions:
        return []
    # The instance is the union of its rings (pycocotools merges them): one region, so pieces
    # never overlap and no area is counted twice.
    instance = shapely.union_all(regions)
    clipped = instance.intersection(shapely.box(x1, y1, x2, y2))
    rings = []
    for part in _polygonal_parts(clipped):
        for piece in _split_holes(part):
            ring = _exterior_ring(piece, x1, y1)
            if ring is not None:
                rings.append(ring)
    return rings


class RobustPolygonMasks(PolygonMasks):
    """``PolygonMasks`` whose ``crop`` is :func:`clip_polygons_to_box`.

    Indexing keeps the class (mmdet's ``PolygonMasks.__getitem__`` returns the base class), so
    ``masks[keep].crop(box)`` inside mmdet's ``RandomCrop`` reaches the robust crop. ``crop``
    returns a plain ``PolygonMasks``: everything after the crop sees mmdet's own type.
    """

    def __getitem__(self, index) -> 'RobustPolygonMasks':
        selected = super().__getitem__(index)
        return RobustPolygonMasks(selected.masks, selected.height, selected.width)

    def crop(self, bbox: np.ndarray) -> PolygonMasks:
        """Same contract as ``PolygonMasks.crop``: box clamped to the image, output size
        ``max(x2 - x1, 1)`` by ``max(y2 - y1, 1)``, one entry per instance, aligned."""
        assert isinstance(bbox, np.ndarray) and bbox.ndim == 1
        bbox = bbox.copy()
        bbox[0::2] = np.clip(bbox[0::2], 0, self.width)
        bbox[1::2] = np.clip(bbox[1::2], 0, self.height)
        x1, y1, x2, y2 = bbox
        w = np.maximum(x2 - x1, 1)
        h = np.maximum(y2 - y1, 1)
        cropped = []
        for polys in self.masks:
            rings = clip_polygons_to_box(polys, (x1, y1, x2, y2))
            # Keep the instance (boxes, labels and masks stay aligned); its mask is empty.
            cropped.append(rings if rings else [VANISHED_RING.copy()])
        return PolygonMasks(cropped, h, w)


@TRANSFORMS.register_module()
class PolygonRandomCrop(RandomCrop):
    """mmdet's ``RandomCrop`` (same arguments, same randomness, same box and label handling)
    whose polygon masks are clipped by :func:`clip_polygons_to_box`.

    Only the mask crop changes: polygon masks are wrapped in :class:`RobustPolygonMasks` for the
    duration of the parent's ``_crop_data``. Bitmap masks (``poly2mask=True``) and crowd/RLE
    instances (which ``LoadAnnotations(poly2mask=False)`` turns into an ignored fake ring) go
    through the parent's path unchanged. An instance whose polygon vanishes keeps its place with an
    empty mask, exactly as an all-zero bitmap would: with ``recompute_bbox`` its box becomes
    ``[0, 0, 0, 0]`` and ``FilterAnnotations`` removes it.
    """

    def _crop_data(self, results: dict, crop_size, allow_negative_crop: bool) -> Union[dict, None]:
        masks = results.get('gt_masks', None)
        if isinstance(masks, PolygonMasks):
            results['gt_masks'] = RobustPolygonMasks(masks.masks, masks.height, masks.width)
        try:
            return super()._crop_data(results, crop_size, allow_negative_crop)
        finally:
            # The parent crops masks only when gt_bboxes exist; never leak the wrapper downstream.
            left = results.get('gt_masks', None)
            if isinstance(left, RobustPolygonMasks):
                results['gt_masks'] = PolygonMasks(left.masks, left.height, left.width)
