"""The polygon-safe crop: crafted geometry that breaks naive clipping, alignment with mmdet's bitmap
path, and a property test that crop-then-rasterise equals rasterise-then-crop."""
import copy

import numpy as np
import pytest
import shapely
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mmdet.datasets.transforms import FilterAnnotations, LoadAnnotations, RandomCrop
from mmdet.registry import TRANSFORMS
from mmdet.structures.bbox import HorizontalBoxes
from mmdet.structures.mask import BitmapMasks, PolygonMasks

from projects.vim_disc.datasets.transforms import (PolygonRandomCrop, RobustPolygonMasks,
                                                    clip_polygons_to_box)


def region(rings):
    """The region a list of hole-free flat rings stands for: their union."""
    return shapely.union_all([shapely.Polygon(np.asarray(r, float).reshape(-1, 2)) for r in rings])


def same_region(rings, expected, tol=1e-9):
    got = region(rings)
    return got.symmetric_difference(expected).area <= tol * max(expected.area, 1.0)


def pairwise_overlap(rings):
    polys = [shapely.Polygon(np.asarray(r, float).reshape(-1, 2)) for r in rings]
    return sum(a.intersection(b).area for i, a in enumerate(polys) for b in polys[i + 1:])


def rasterise(rings, height, width):
    return PolygonMasks([rings], height, width).to_ndarray()[0]


def flat(points):
    return np.asarray(points, dtype=np.float64).ravel()


# --------------------------------------------------------------------------------------------
# clip_polygons_to_box: crafted cases
# --------------------------------------------------------------------------------------------
def test_geometry_collection_keeps_polygon_drops_touching_line():
    # Inside the box: the rectangle [2,4]x[4,10]; the part above y=10 touches the top edge along
    # the segment (6,10)-(8,10), so Shapely returns GEOMETRYCOLLECTION(POLYGON, LINESTRING).
    ring = flat([(2, 4), (4, 4), (4, 12), (6, 12), (6, 10), (8, 10), (8, 14), (2, 14)])
    box = (0, 0, 10, 10)
    raw = shapely.Polygon(ring.reshape(-1, 2)).intersection(shapely.box(*box))
    assert raw.geom_type == 'GeometryCollection'
    rings = clip_polygons_to_box([ring], box)
    assert len(rings) == 1
    assert same_region(rings, shapely.box(2, 4, 4, 10))


def test_concave_u_is_cut_into_two_polygons_in_crop_frame():
    # A U (arms x in [1,3] and [7,9], y in [1,9], base y in [1,3]); the crop y in [5,10] keeps
    # only the two arms, each 2 x 4, shifted by the crop origin (0, 5).
    u = flat([(1, 1), (9, 1), (9, 9), (7, 9), (7, 3), (3, 3), (3, 9), (1, 9)])
    rings = clip_polygons_to_box([u], (0, 5, 10, 10))
    assert len(rings) == 2
    assert same_region(rings, shapely.union_all([shapely.box(1, 0, 3, 4), shapely.box(7, 0, 9, 4)]))


def test_bow_tie_keeps_both_lobes():
    bow_tie = flat([(0, 0), (10, 10), (10, 0), (0, 10)])
    # buffer(0) -- what mmdet's PolygonMasks.crop does -- keeps one lobe of the two.
    assert shapely.Polygon(bow_tie.reshape(-1, 2)).buffer(0).area == pytest.approx(25)
    rings = clip_polygons_to_box([bow_tie], (0, 0, 10, 10))
    assert len(rings) == 2
    assert sum(shapely.Polygon(r.reshape(-1, 2)).area for r in rings) == pytest.approx(50)
    expected = shapely.Polygon([(0, 0), (5, 5), (0, 10)]).union(shapely.Polygon([(10, 0), (5, 5), (10, 10)]))
    assert same_region(rings, expected)


def test_polygon_fully_outside_vanishes():
    assert clip_polygons_to_box([flat([(20, 20), (30, 20), (30, 30)])], (0, 0, 10, 10)) == []


def test_polygon_exactly_on_the_border():
    box = (2, 3, 12, 9)
    # Outside, sharing the whole top edge with the box: the intersection is a line, no area.
    above = flat([(2, 9), (12, 9), (12, 15), (2, 15)])
    assert clip_polygons_to_box([above], box) == []
    # Outside, touching one corner: a point.
    corner = flat([(12, 9), (15, 9), (15, 12)])
    assert clip_polygons_to_box([corner], box) == []
    # The box itself: the whole crop, in the crop frame.
    rings = clip_polygons_to_box([flat([(2, 3), (12, 3), (12, 9), (2, 9)])], box)
    assert len(rings) == 1 and same_region(rings, shapely.box(0, 0, 10, 6))


def test_degenerate_rings_are_dropped_not_raised():
    box = (0, 0, 10, 10)
    square = flat([(1, 1), (4, 1), (4, 4), (1, 4)])
    two_points = flat([(1, 1), (5, 5)])
    repeated = flat([(1, 1), (5, 5), (1, 1), (5, 5)])  # 4 vertices, 2 distinct
    collinear = flat([(1, 1), (2, 2), (3, 3)])  # 3 distinct, zero area
    with_nan = flat([(5, 5), (np.nan, 6), (8, 8)])
    with_inf = flat([(5, 5), (np.inf, 6), (8, 9)])
    odd_length = np.array([1., 1., 5., 1., 5.])
    for bad in (two_points, repeated, collinear, with_nan, with_inf, odd_length, np.zeros(6)):
        assert clip_polygons_to_box([bad], box) == []
        # A bad ring does not take the instance's good rings with it.
        rings = clip_polygons_to_box([bad, square], box)
        assert same_region(rings, shapely.box(1, 1, 4, 4))
    assert clip_polygons_to_box([], box) == []
    assert clip_polygons_to_box([square], (5, 5, 5, 9)) == []  # an empty box


def test_instance_rings_are_unioned_without_overlap():
    # COCO reads an instance as the union of its rings; overlapping rings must not double the area.
    a, b = flat([(0, 0), (6, 0), (6, 6), (0, 6)]), flat([(3, 3), (9, 3), (9, 9), (3, 9)])
    rings = clip_polygons_to_box([a, b], (0, 0, 10, 10))
    assert pairwise_overlap(rings) == pytest.approx(0)
    assert PolygonMasks([rings], 10, 10).areas[0] == pytest.approx(36 + 36 - 9)


@pytest.mark.parametrize('rings', [
    # four rectangles framing a 6 x 6 hole (a union of COCO rings can enclose one)
    [flat([(0, 0), (10, 0), (10, 2), (0, 2)]), flat([(0, 8), (10, 8), (10, 10), (0, 10)]),
     flat([(0, 0), (2, 0), (2, 10), (0, 10)]), flat([(8, 0), (10, 0), (10, 10), (8, 10)])],
    # one keyhole ring: the outer square, then the 4 x 4 hole walked inside it (even-odd: a hole)
    [flat([(0, 0), (10, 0), (10, 10), (0, 10), (0, 0), (3, 3), (3, 7), (7, 7), (7, 3), (3, 3)])],
], ids=['frame-of-rings', 'keyhole-ring'])
def test_holes_are_kept_by_hole_free_pieces(rings):
    expected = shapely.union_all([shapely.make_valid(shapely.Polygon(r.reshape(-1, 2))) for r in rings])
    assert len(expected.interiors) == 1  # the case really has a hole
    box = (-1, -1, 19, 14)
    out = clip_polygons_to_box(rings, box)
    assert all(not shapely.Polygon(r.reshape(-1, 2)).interiors for r in out)
    assert pairwise_overlap(out) == pytest.approx(0, abs=1e-9)
    assert same_region(out, shapely.affinity.translate(expected, 1, 1))
    # Rasterised the way mmdet does (union of rings), the hole stays empty.
    h, w = 15, 20
    crop_then_raster = rasterise(out, h, w)
    # The box origin is (-1, -1): the crop is the full raster shifted by one pixel.
    raster_then_crop = np.pad(rasterise(rings, 20, 20), ((1, 0), (1, 0)))[:h, :w]
    assert np.array_equal(crop_then_raster, raster_then_crop)
    assert PolygonMasks([out], h, w).areas[0] == pytest.approx(expected.area)


def test_vanished_marker_rasterises_empty():
    # The marker mmdet itself uses for "no polygon": zero area, empty bitmap, box [0, 0, 0, 0].
    masks = PolygonMasks([[np.zeros(6)]], 7, 9)
    assert not masks.to_ndarray().any()
    assert masks.areas[0] == 0
    assert masks.get_bboxes(HorizontalBoxes).tensor.tolist() == [[0, 0, 0, 0]]


def test_self_intersection_is_read_even_odd_like_pycocotools():
    # A pentagram in one ring: pycocotools leaves the centre pentagon empty (even-odd) and so must
    # the repaired polygon.
    star = flat([(5, 45), (95, 45), (20, 95), (50, 5), (80, 95)])
    rings = clip_polygons_to_box([star], (0, 0, 100, 100))
    got, ref = rasterise(rings, 100, 100), rasterise([star], 100, 100)
    assert not ref[60, 50] and not got[60, 50]  # the centre
    assert (got & ref).sum() / (got | ref).sum() >= 0.98


# --------------------------------------------------------------------------------------------
# PolygonRandomCrop: the transform
# --------------------------------------------------------------------------------------------
def make_results(polys_per_instance, height, width, labels=None):
    """A results dict as LoadAnnotations(poly2mask=False) leaves it, boxes from the polygons."""
    boxes = []
    for polys in polys_per_instance:
        xy = np.concatenate([np.asarray(p, float).reshape(-1, 2) for p in polys])
        xy = xy[np.isfinite(xy).all(axis=1)]
        boxes.append([*xy.min(axis=0), *xy.max(axis=0)] if len(xy) else [0, 0, 0, 0])
    n = len(polys_per_instance)
    return dict(
        img=np.random.RandomState(0).randint(0, 255, (height, width, 3), dtype=np.uint8),
        img_shape=(height, width),
        gt_bboxes=HorizontalBoxes(np.asarray(boxes, np.float32).reshape(-1, 4)),
        gt_bboxes_labels=np.arange(n, dtype=np.int64) if labels is None else labels,
        gt_ignore_flags=np.zeros(n, dtype=bool),
        gt_masks=PolygonMasks([[np.asarray(p, np.float64) for p in polys] for polys in polys_per_instance],
                              height, width))


def crop_at(transform, results, offset, crop_hw):
    """Run the transform with its two random draws (crop size, offset) fixed."""
    transform._rand_offset = lambda margin: offset
    transform._get_crop_size = lambda image_size: crop_hw
    return transform.transform(results)


def test_registered_and_drop_in_arguments():
    t = TRANSFORMS.build(dict(type='PolygonRandomCrop', crop_size=(64, 64), crop_type='absolute_range',
                              recompute_bbox=True, allow_negative_crop=True, bbox_clip_border=True))
    assert isinstance(t, PolygonRandomCrop) and isinstance(t, RandomCrop)
    assert t.crop_type == 'absolute_range' and t.recompute_bbox and t.allow_negative_crop
    with pytest.raises(ValueError):
        PolygonRandomCrop(crop_size=(64, 64), crop_type='nonsense')


def test_vanished_instances_follow_the_bitmap_path():
    # The crop is x, y in [0, 20). Instance 0 crosses it; 1 only meets its right edge (box width 0
    # after clipping: RandomCrop itself drops it); 2 is a bow-tie inside; 3 is an L whose box (set by
    # hand) overlaps the crop while its mask misses it, so its mask vanishes inside the crop.
    polys = [
        [flat([(5, 5), (30, 5), (30, 30), (5, 30)])],
        [flat([(20, 2), (26, 2), (26, 8), (20, 8)])],
        [flat([(2, 2), (12, 12), (12, 2), (2, 12)])],
        [flat([(22, 22), (40, 22), (40, 24), (24, 24), (24, 40), (22, 40)])],
    ]
    crop_hw, offset = (20, 20), (0, 0)
    results = make_results(polys, 40, 40)
    results['gt_bboxes'].tensor[3] = results['gt_bboxes'].tensor.new_tensor([15, 15, 40, 40])
    bitmap = copy.deepcopy(results)
    bitmap['gt_masks'] = results['gt_masks'].to_bitmap()

    for recompute in (False, True):
        ours = crop_at(PolygonRandomCrop((20, 20), recompute_bbox=recompute), copy.deepcopy(results),
                       offset, crop_hw)
        ref = crop_at(RandomCrop((20, 20), recompute_bbox=recompute), copy.deepcopy(bitmap), offset, crop_hw)
        assert type(ours['gt_masks']) is PolygonMasks
        assert ours['img'].shape == ref['img'].shape == (20, 20, 3)
        assert ours['gt_bboxes_labels'].tolist() == ref['gt_bboxes_labels'].tolist()
        assert ours['gt_ignore_flags'].tolist() == ref['gt_ignore_flags'].tolist()
        assert len(ours['gt_masks']) == len(ours['gt_bboxes']) == len(ref['gt_masks'])
        ours_raster, ref_raster = ours['gt_masks'].to_ndarray(), ref['gt_masks'].to_ndarray()
        assert ours_raster.any(axis=(1, 2)).tolist() == ref_raster.any(axis=(1, 2)).tolist()
        labels = ours['gt_bboxes_labels'].tolist()
        assert labels == [0, 2, 3]
        vanished = labels.index(3)
        assert not ours_raster[vanished].any()
        if recompute:
            # Boxes from masks: the vanished instance gets [0, 0, 0, 0] on both paths; the others
            # differ from the bitmap's pixel extents by less than a pixel.
            np.testing.assert_allclose(ours['gt_bboxes'].numpy(), ref['gt_bboxes'].numpy(), atol=1.0)
            assert ours['gt_bboxes'].numpy()[vanished].tolist() == [0, 0, 0, 0]
        else:
            np.testing.assert_array_equal(ours['gt_bboxes'].numpy(), ref['gt_bboxes'].numpy())
        # FilterAnnotations then removes the same instances on both paths.
        for filt in (FilterAnnotations(min_gt_bbox_wh=(1e-2, 1e-2)),
                     FilterAnnotations(min_gt_bbox_wh=(1e-2, 1e-2), by_mask=True)):
            kept_ours = filt.transform(copy.deepcopy(ours))['gt_bboxes_labels'].tolist()
            kept_ref = filt.transform(copy.deepcopy(ref))['gt_bboxes_labels'].tolist()
            assert kept_ours == kept_ref
        kept = FilterAnnotations(min_gt_bbox_wh=(1e-2, 1e-2), by_mask=True).transform(copy.deepcopy(ours))
        assert 3 not in kept['gt_bboxes_labels'].tolist()
        # The bow-tie keeps both lobes through the transform.
        bow = labels.index(2)
        assert ours['gt_masks'].areas[bow] == pytest.approx(50)


def test_empty_instance_list():
    results = make_results([], 30, 40)
    out = crop_at(PolygonRandomCrop((16, 16), allow_negative_crop=True), results, (3, 5), (16, 16))
    assert out['img'].shape == (16, 16, 3)
    assert len(out['gt_masks']) == 0 and len(out['gt_bboxes']) == 0
    assert out['gt_masks'].to_ndarray().shape == (0, 16, 16)
    # Without allow_negative_crop an image with nothing in the crop is skipped, as in mmdet.
    assert crop_at(PolygonRandomCrop((16, 16)), make_results([], 30, 40), (3, 5), (16, 16)) is None


def test_bitmap_masks_take_mmdets_path_unchanged():
    polys = [[flat([(3, 4), (25, 6), (20, 28)])], [flat([(10, 10), (38, 12), (30, 35), (12, 30)])]]
    results = make_results(polys, 40, 40)
    results['gt_masks'] = results['gt_masks'].to_bitmap()
    for recompute in (False, True):
        ours = crop_at(PolygonRandomCrop((24, 24), recompute_bbox=recompute), copy.deepcopy(results),
                       (7, 9), (24, 24))
        ref = crop_at(RandomCrop((24, 24), recompute_bbox=recompute), copy.deepcopy(results), (7, 9), (24, 24))
        assert isinstance(ours['gt_masks'], BitmapMasks)
        np.testing.assert_array_equal(ours['gt_masks'].masks, ref['gt_masks'].masks)
        np.testing.assert_array_equal(ours['gt_bboxes'].numpy(), ref['gt_bboxes'].numpy())


@pytest.mark.parametrize('poly2mask', [False, True], ids=['polygons', 'bitmaps'])
def test_crowd_rle_instances_pass_through(poly2mask):
    from pycocotools import mask as mask_utils
    height, width = 32, 48
    crowd = np.zeros((height, width), np.uint8, order='F')
    crowd[5:20, 10:40] = 1
    rle = mask_utils.encode(crowd)
    rle['counts'] = rle['counts'].decode()
    results = dict(
        img=np.zeros((height, width, 3), np.uint8), img_shape=(height, width), ori_shape=(height, width),
        instances=[
            dict(bbox=[10, 5, 40, 20], bbox_label=0, ignore_flag=1, mask=rle),  # crowd, RLE
            dict(bbox=[2, 2, 30, 26], bbox_label=1, ignore_flag=0,
                 mask=[[2, 2, 30, 2, 30, 26, 2, 26], [0, 0, 5, 5]]),  # a good ring and a 2-point one
            dict(bbox=[20, 10, 44, 30], bbox_label=2, ignore_flag=0,
                 mask=[[20, 10, 44, 30, 44, 10, 20, 30]]),  # bow-tie
        ])
    results = LoadAnnotations(with_bbox=True, with_mask=True, poly2mask=poly2mask).transform(results)
    assert isinstance(results['gt_masks'], BitmapMasks if poly2mask else PolygonMasks)
    out = crop_at(PolygonRandomCrop((24, 24), recompute_bbox=True), results, (4, 8), (24, 24))
    assert out['gt_bboxes_labels'].tolist() == [0, 1, 2]
    assert out['gt_ignore_flags'].tolist() == [True, False, False]  # the crowd stays ignored
    raster = out['gt_masks'].to_ndarray()
    assert raster.shape == (3, 24, 24)
    if poly2mask:
        # The crowd's RLE is decoded and cropped (crop origin x=8, y=4): rows 1..15, columns 2..23.
        assert raster[0].sum() == 15 * 22 and raster[0][1:16, 2:24].all()
        return
    assert not raster[0].any()  # poly2mask=False leaves crowds a fake ring: nothing to rasterise
    # The good ring (x 2..30, y 2..26) in the crop frame (origin x=8, y=4).
    assert same_region(out['gt_masks'].masks[1], shapely.box(0, 0, 22, 22))
    # Both bow-tie lobes, within the crop (x 8..32, y 4..28).
    lobes = shapely.make_valid(shapely.Polygon([(20, 10), (44, 30), (44, 10), (20, 30)]))
    assert same_region(out['gt_masks'].masks[2],
                       shapely.affinity.translate(lobes.intersection(shapely.box(8, 4, 32, 28)), -8, -4))


# --------------------------------------------------------------------------------------------
# Property: crop-then-rasterise == rasterise-then-crop, never raises, boxes = mask extents
# --------------------------------------------------------------------------------------------
IMAGE_H, IMAGE_W = 96, 112
# pycocotools quantises vertices to 1/5 px and fills a pixel by its centre, so where a crop moves an
# edge's endpoint, pixels whose centre lies within a fraction of a pixel of that edge may flip. That
# is rasterisation rounding, not a lost part: no disagreeing pixel may lie farther from the boundary.
MAX_FLIP_DISTANCE = 0.5  # px, pixel centre to the exact clipped boundary (measured max: 0.26)
# Slivers, where a few rounded boundary pixels are a large fraction of the area, are excepted from
# the per-instance IoU bound (not from the checks above): mean half-width under 4 px, or under
# 24 px across.
SLIVER_THICKNESS = 4.0  # area / perimeter
SLIVER_EXTENT = 24.0


@st.composite
def random_ring(draw):
    """A star-shaped simple ring, or (one time in three) the same vertices in random order, which
    is usually self-intersecting; vertices may fall outside the image."""
    n = draw(st.integers(3, 9))
    cx = draw(st.floats(-20, IMAGE_W + 20))
    cy = draw(st.floats(-20, IMAGE_H + 20))
    radius = draw(st.floats(4, 60))
    radii = radius * np.asarray(draw(st.lists(st.floats(0.4, 1), min_size=n, max_size=n)))
    angles = draw(st.lists(st.floats(0, 2 * np.pi), min_size=n, max_size=n, unique=True))
    if draw(st.integers(0, 2)):
        angles = sorted(angles)
    xy = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1)
    return xy.ravel()


@st.composite
def crop_case(draw):
    instances = draw(st.lists(st.lists(random_ring(), min_size=1, max_size=3), min_size=0, max_size=5))
    crop_h = draw(st.integers(8, IMAGE_H))
    crop_w = draw(st.integers(8, IMAGE_W))
    offset = (draw(st.integers(0, IMAGE_H - crop_h)), draw(st.integers(0, IMAGE_W - crop_w)))
    return instances, (crop_h, crop_w), offset


@st.composite
def seeded_crop_case(draw):
    """The same kind of case with its numbers from a seeded generator: Hypothesis leans to the ends
    of each range (tiny crops, minimal radii, integer vertices), which finds edge cases; this keeps
    typical sizes in the mix."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    instances = []
    for _ in range(rng.integers(0, 6)):
        rings = []
        for _ in range(rng.integers(1, 4)):
            n = rng.integers(3, 10)
            centre = rng.uniform([-20, -20], [IMAGE_W + 20, IMAGE_H + 20])
            radii = rng.uniform(4, 60) * rng.uniform(0.4, 1, n)
            angles = rng.uniform(0, 2 * np.pi, n)
            if rng.integers(0, 3):
                angles = np.sort(angles)
            xy = np.stack([centre[0] + radii * np.cos(angles), centre[1] + radii * np.sin(angles)], 1)
            rings.append(xy.ravel())
        instances.append(rings)
    crop_h, crop_w = int(rng.integers(8, IMAGE_H + 1)), int(rng.integers(8, IMAGE_W + 1))
    offset = (int(rng.integers(0, IMAGE_H - crop_h + 1)), int(rng.integers(0, IMAGE_W - crop_w + 1)))
    return instances, (crop_h, crop_w), offset


def exact_clipped_region(rings, x1, y1, x2, y2):
    """What the crop must keep, from Shapely directly: the union of the repaired rings, intersected
    with the box, in the crop frame."""
    parts = [shapely.make_valid(shapely.Polygon(r.reshape(-1, 2))) for r in rings]
    region = shapely.union_all(parts).intersection(shapely.box(x1, y1, x2, y2))
    region = shapely.union_all([g for g in shapely.get_parts(region) if g.geom_type == 'Polygon'])
    return shapely.affinity.translate(region, -x1, -y1)


def test_crop_then_rasterise_matches_rasterise_then_crop():
    totals = dict(inter=0, union=0, compared=0)

    # derandomize: CI sees the same 800 cases every run (a failure reproduces; no flaky bound).
    @settings(max_examples=800, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.one_of(seeded_crop_case(), crop_case()))
    def check(case):
        instances, (crop_h, crop_w), (off_h, off_w) = case
        results = make_results(instances, IMAGE_H, IMAGE_W)
        reference = results['gt_masks'].to_ndarray()[:, off_h:off_h + crop_h, off_w:off_w + crop_w]
        out = crop_at(PolygonRandomCrop((crop_w, crop_h), recompute_bbox=True, allow_negative_crop=True),
                      results, (off_h, off_w), (crop_h, crop_w))
        assert out['img'].shape[:2] == (crop_h, crop_w)
        labels, masks, boxes = out['gt_bboxes_labels'], out['gt_masks'], out['gt_bboxes'].numpy()
        assert len(masks) == len(labels) == len(boxes) == len(out['gt_ignore_flags'])
        got = masks.to_ndarray()
        assert got.shape == (len(labels), crop_h, crop_w)
        for k, label in enumerate(labels):  # labels index the input instances
            rings = masks.masks[k]
            exact = exact_clipped_region(instances[label], off_w, off_h, off_w + crop_w, off_h + crop_h)
            # Geometry: the kept pieces cover exactly the clipped region, without overlap.
            assert masks.areas[k] == pytest.approx(exact.area, rel=1e-6, abs=1e-6)
            assert pairwise_overlap(rings) <= 1e-6 * max(exact.area, 1.0)
            # Raster: crop-then-rasterise differs from rasterise-then-crop only by boundary rounding.
            ours, ref = got[k], reference[label]
            flipped = np.argwhere(ours != ref)
            if len(flipped):
                centres = shapely.points(flipped[:, 1] + 0.5, flipped[:, 0] + 0.5)
                with np.errstate(divide='ignore'):  # GEOS on edges ~1e-197 long (Hypothesis finds them)
                    distance = shapely.distance(centres, exact.boundary).max()
                assert distance <= MAX_FLIP_DISTANCE
            inter, union = int((ours & ref).sum()), int((ours | ref).sum())
            totals['inter'] += inter
            totals['union'] += union
            x0, y0, x1, y1 = exact.bounds if not exact.is_empty else (0, 0, 0, 0)
            sliver = (exact.area < SLIVER_THICKNESS * exact.length
                      or min(x1 - x0, y1 - y0) < SLIVER_EXTENT)
            if not sliver:
                totals['compared'] += 1
                assert inter / union >= 0.98
            # recompute_bbox: the box is the mask's extent ([0, 0, 0, 0] for a vanished mask).
            xy = np.concatenate([r.reshape(-1, 2) for r in rings])
            np.testing.assert_allclose(boxes[k], [*xy.min(0), *xy.max(0)], atol=1e-3)
            assert (xy >= -1e-6).all() and (xy <= np.array([crop_w, crop_h]) + 1e-6).all()

    check()
    # Area-weighted over every instance of every example, slivers included.
    assert totals['inter'] / totals['union'] >= 0.98
    assert totals['compared'] >= 50, totals  # the bound above was exercised, not vacuous


def test_robust_masks_index_and_crop_types():
    masks = RobustPolygonMasks([[flat([(0, 0), (8, 0), (8, 8)])], [flat([(1, 1), (2, 1), (2, 2)])]], 10, 10)
    picked = masks[np.array([1])]
    assert type(picked) is RobustPolygonMasks and len(picked) == 1
    cropped = masks.crop(np.array([0, 0, 5, 5]))
    assert type(cropped) is PolygonMasks and (cropped.height, cropped.width) == (5, 5)
