# cython: language_level=3, embedsignature=True
"""The general translation's plan, for any key numpy takes, in five steps (internal).

``_indexing._translate`` parses the key (``_keyitems._parse``) and runs these steps on the
items: the result's rank checked, the basic items resolved, the index arrays broadcast and
bounds-checked, the broadcast block placed, then the product plan (or the point plan when the
product would read too much more than the result). Keys without index arrays stop after the
second step, at ``_basic_selection``.
"""

import numpy as np

from multitables._keys._indexsets cimport _dim_plan
from multitables._keys._keyitems cimport (
    K_ARRAY, K_BOOL0, K_ELLIPSIS, K_INT, K_MASK, K_NEWAXIS, K_SLICE, _implied,
)
from multitables._keys._selection cimport Selection, _count, _prod

# numpy's bound on an array's rank (NPY_MAXDIMS).
_MAXDIMS = 64

# Where numpy puts the broadcast block of the advanced items (index arrays, and integers beside
# them), found by scanning the key (numpy's mapping.c, mapiter_fill_info): at the first advanced
# item when they are all adjacent, else in front.
cdef enum:
    ADV_NONE_SEEN    # no advanced item yet
    ADV_IN_RUN       # in the first run of adjacent advanced items
    ADV_RUN_ENDED    # a basic item followed that run
    ADV_SPLIT        # an advanced item came after the gap: the block goes in front


def _shape_str(shape):
    """A shape as numpy prints it in indexing errors: ``(2,)``, ``(2,3)``."""
    if len(shape) == 1:
        return f"({shape[0]},)"
    return "(" + ",".join(str(s) for s in shape) + ")"


# The steps of _translate. Those returning Python objects report errors as every such cdef
# function does (NULL, checked by the caller); those returning C values say ``except -1``.

cdef int _check_result_rank(list items, tuple shp) except -1:
    """Step 1: the result's rank bound and the boolean masks' shapes, as numpy's prepare_index
    checks them."""
    cdef Py_ssize_t d = 0, j
    nres = 0
    fancy_nd = 0
    for it in items:
        kind = it[0]
        if kind == K_MASK:
            for j in range(it[1].ndim):
                m = it[1].shape[j]
                if m > 0 and m != shp[d + j]:
                    raise IndexError(
                        f"boolean index did not match indexed array along axis {d + j}; "
                        f"size of axis is {shp[d + j]} but size of corresponding boolean "
                        f"axis is {m}")
            d += it[1].ndim
            fancy_nd = max(fancy_nd, 1)
        elif kind == K_ARRAY:
            d += 1
            fancy_nd = max(fancy_nd, it[1].ndim)
        elif kind == K_BOOL0:
            fancy_nd = max(fancy_nd, 1)
        elif kind == K_ELLIPSIS:
            d += it[1]
            nres += it[1]
        elif kind == K_NEWAXIS:
            nres += 1
        else:
            if kind == K_SLICE:
                nres += 1
            d += 1
    if nres + fancy_nd > _MAXDIMS:
        raise IndexError(f"number of dimensions must be within [0, {_MAXDIMS}], "
                         f"indexing result would have {nres + fancy_nd}")
    return 0


cdef bint _plan_basic_items(list items, tuple shp, list dims, list local, list fancy,
                            list item_dim) except -1:
    """Step 2: the basic items in key order (ints bounds-checked, slices resolved into
    ``dims``), each item's local key and first dimension appended to ``local`` and
    ``item_dim``, the index arrays collected in ``fancy``. Whether there are any."""
    cdef Py_ssize_t d = 0, i, j, n
    cdef bint has_fancy = False
    for i, it in enumerate(items):
        kind = it[0]
        item_dim.append(d)
        if kind == K_INT:
            n = shp[d]
            v = it[1]
            if not -n <= v < n:
                raise IndexError(f"index {v} is out of bounds for axis {d} with size {n}")
            if v < 0:
                v += n
            dims[d] = (v, 1, 1)
            local.append(0)
            d += 1
        elif kind == K_SLICE:
            start, stop, step = it[1].indices(shp[d])
            count = len(range(start, stop, step))
            if count == 0:
                dims[d] = (0, 1, 0)
                local.append(slice(None))
            elif count == 1:
                dims[d] = (start, 1, 1)
                local.append(slice(None))
            elif step > 0:
                dims[d] = (start, step, count)
                local.append(slice(None))
            else:
                dims[d] = (start + (count - 1) * step, -step, count)
                local.append(slice(None, None, -1))
            d += 1
        elif kind == K_ELLIPSIS:
            for j in range(it[1]):
                dims[d + j] = (0, 1, shp[d + j])
            local.append(None if _implied(it) else Ellipsis)
            d += it[1]
        elif kind == K_NEWAXIS:
            local.append(None)
        elif kind == K_BOOL0:
            has_fancy = True
            local.append(it[1])
            fancy.append((i, -1, np.zeros(1 if it[1] else 0, np.int64)))
        elif kind == K_ARRAY:
            has_fancy = True
            local.append(None)
            fancy.append((i, d, it[1]))
            d += 1
        else:  # K_MASK
            has_fancy = True
            local.append(None)
            for j, comp in enumerate(np.nonzero(it[1])):
                fancy.append((i, d + j, comp))
            d += it[1].ndim
    return has_fancy


cdef tuple _broadcast_index_arrays(list fancy, tuple shp):
    """Step 3: the index arrays broadcast, then bounds-checked (numpy skips that when the
    result is empty): ``(broadcast shape, {dataset dim: int64 array, in range, non-negative})``."""
    cdef Py_ssize_t d, n
    shapes = [f[2].shape for f in fancy]
    try:
        bshape = tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        raise IndexError("shape mismatch: indexing arrays could not be broadcast together "
                         "with shapes " + "".join(_shape_str(s) + " " for s in shapes)) from None
    bsize = _prod(bshape)
    cdef dict arrays = {}
    for f in fancy:
        d = f[1]
        if d < 0:
            continue
        a = f[2]
        if a.dtype != np.int64:
            a = a.astype(np.int64, casting="unsafe")
        if bsize and a.size:
            n = shp[d]
            lo = a.min()
            hi = a.max()
            if lo < -n or hi >= n:
                bad = a.reshape(-1)[np.flatnonzero((a < -n) | (a >= n))[0]]
                raise IndexError(f"index {bad} is out of bounds for axis {d} with size {n}")
            if lo < 0:
                a = np.where(a < 0, a + n, a)
        arrays[d] = a
    return bshape, arrays


cdef tuple _place_block(list items, list item_dim, list dims, tuple shp, tuple bshape):
    """Step 4: where numpy puts the broadcast block (see ADV_NONE_SEEN), and so the result's
    shape: ``(result shape, result axes before the block when it is not moved, moved)``."""
    cdef Py_ssize_t consec = 0, i, j
    status = ADV_NONE_SEEN
    nres = 0
    for it in items:
        kind = it[0]
        if kind == K_INT or kind == K_ARRAY or kind == K_MASK or kind == K_BOOL0:
            if status == ADV_NONE_SEEN:
                consec = nres
                status = ADV_IN_RUN
            elif status == ADV_RUN_ENDED:
                status = ADV_SPLIT
                consec = 0
        elif status == ADV_IN_RUN:
            status = ADV_RUN_ENDED
        if kind == K_SLICE or kind == K_NEWAXIS:
            nres += 1
        elif kind == K_ELLIPSIS:
            nres += it[1]
    pre = []
    post = []
    for i, it in enumerate(items):
        kind = it[0]
        if kind == K_SLICE:
            c = dims[item_dim[i]][2]
            (pre if len(pre) < consec else post).append(c)
        elif kind == K_NEWAXIS:
            (pre if len(pre) < consec else post).append(1)
        elif kind == K_ELLIPSIS:
            for j in range(it[1]):
                (pre if len(pre) < consec else post).append(shp[item_dim[i] + j])
    return tuple(pre) + bshape + tuple(post), consec, status == ADV_SPLIT


cdef Selection _product_selection(tuple shp, list dims, list items, list item_dim, list local,
                                  dict arrays, tuple bshape, Py_ssize_t consec, bint moved,
                                  tuple result_shape, object factor, object slack):
    """Step 5: the product plan (per-dimension unique sets, positions within them), or the
    point plan when the product would read more than ``factor`` times the result plus
    ``slack`` elements (``_indexing._SUPERSET_FACTOR``, ``_SUPERSET_SLACK``)."""
    cdef Py_ssize_t i
    local_arrays = {}
    for d, a in arrays.items():
        dims[d], local_arrays[d] = _dim_plan(a)
    read_shape = tuple([_count(e) for e in dims])
    nontrivial = [d for d in arrays if _count(dims[d]) > 1]
    if (len(nontrivial) > 1
            and _prod(read_shape) > factor * _prod(result_shape) + slack):
        return _point_selection(shp, dims, items, item_dim, local, arrays, bshape,
                                consec, moved, result_shape)
    lkey = []
    for i, it in enumerate(items):
        kind = it[0]
        if kind == K_ARRAY:
            lkey.append(local_arrays[item_dim[i]])
        elif kind == K_MASK:
            lkey.append(_submask(it[1], dims, item_dim[i]))
        elif not _implied(it):
            lkey.append(local[i])
    if _is_identity(items, item_dim, dims, local, local_arrays, nontrivial, bshape, moved):
        return Selection(shp, tuple(dims), read_shape, result_shape, None)
    return Selection(shp, tuple(dims), read_shape, result_shape, tuple(lkey))


cdef object _submask(object mask, list dims, Py_ssize_t d0):
    """The part of boolean ``mask`` (on dims ``d0``...) that lies in the box.

    Every True element is in the box, and restricting to sorted index sets keeps their C
    order, so the box indexed by this mask gives what the array indexed by ``mask`` gives,
    for a byte per box element instead of eight per True element and dimension.
    """
    sub = mask
    for j in range(mask.ndim):
        e = dims[d0 + j]
        if isinstance(e, tuple):
            sub = sub[(slice(None),) * j + (slice(e[0], e[0] + e[1] * e[2], e[1]),)]
        else:
            sub = np.take(sub, e, axis=j)
    return sub



cdef Selection _basic_selection(tuple shp, list dims, list items, list local):
    """Plan for keys without arrays: a single regular hyperslab per dimension."""
    result = []
    lkey = []
    reverse = False
    d = 0
    for i, it in enumerate(items):
        kind = it[0]
        if kind == K_SLICE:
            result.append(dims[d][2])
            reverse = reverse or local[i].step is not None
            d += 1
        elif kind == K_INT:
            d += 1
        elif kind == K_NEWAXIS:
            result.append(1)
        elif kind == K_ELLIPSIS:
            for j in range(it[1]):
                result.append(shp[d + j])
            d += it[1]
        if not _implied(it):
            lkey.append(local[i])
    read_shape = tuple([e[2] for e in dims])
    result_shape = tuple(result)
    if not reverse or 0 in read_shape:
        return Selection(shp, tuple(dims), read_shape, result_shape, None)
    return Selection(shp, tuple(dims), read_shape, result_shape, tuple(lkey))


cdef bint _is_identity(list items, list item_dim, list dims, list local, dict local_arrays,
                       list nontrivial, tuple bshape, bint moved) except -1:
    """Whether the product plan's result is its box in the same order (so no gather)."""
    if len(nontrivial) > 1:
        return False
    for i, it in enumerate(items):
        if it[0] == K_SLICE and local[i].step is not None:
            return False
    if nontrivial:
        d = nontrivial[0]
        pos = local_arrays[d]
        n = _count(dims[d])
        if _prod(bshape) != n or pos.size != n:
            return False
        if not np.array_equal(pos.reshape(-1), np.arange(n)):
            return False
    elif _prod(bshape) != 1:
        return False
    # Dimensions of size > 1 must keep their order: the fancy block sits at the first
    # advanced item's dimension, or in front when the advanced items are not adjacent.
    order = []
    fancy_at = None
    if nontrivial:
        fancy_at = nontrivial[0]
        if moved:
            order.append(fancy_at)
    for i, it in enumerate(items):
        kind = it[0]
        d = item_dim[i]
        if kind == K_SLICE and dims[d][2] > 1:
            order.append(d)
        elif kind == K_ELLIPSIS:
            for j in range(it[1]):
                if dims[d + j][2] > 1:
                    order.append(d + j)
        elif fancy_at is not None and not moved and kind in (K_ARRAY, K_MASK) and (
                d <= fancy_at < d + (it[1].ndim if kind == K_MASK else 1)):
            order.append(fancy_at)
    return order == sorted(order)


cdef Selection _point_selection(tuple shp, list dims, list items, list item_dim, list local,
                                dict arrays, tuple bshape, Py_ssize_t consec, bint moved,
                                tuple result_shape):
    """Plan reading the unique points of the advanced dims times the other dims' hyperslabs.

    Integer items join the points (numpy treats them as advanced here, too). The box holds
    the points on one axis, placed where numpy puts the broadcast block, so the local key
    needs a single index array.
    """
    pdims = sorted(list(arrays) + [item_dim[i] for i, it in enumerate(items) if it[0] == K_INT])
    pshape = [shp[d] for d in pdims]
    coords = []
    for d in pdims:
        if d in arrays:
            coords.append(np.broadcast_to(arrays[d], bshape).reshape(-1))
        else:
            coords.append(np.full(_prod(bshape), dims[d][0], np.int64))
    try:
        codes = np.ravel_multi_index(coords, pshape)
    except ValueError:  # more cells than an int64 can number
        pts, inv = np.unique(np.stack(coords, axis=1), axis=0, return_inverse=True)
    else:
        ucodes, inv = np.unique(codes, return_inverse=True)
        pts = np.stack(np.unravel_index(ucodes, pshape), axis=1).astype(np.int64)
    inv = inv.reshape(bshape)
    for j, d in enumerate(pdims):
        dims[d] = np.unique(pts[:, j])
    other = [d for d in range(len(shp)) if d not in pdims]
    if moved:
        axis = 0
    else:
        axis = sum(1 for d in other if d < pdims[0])
    read_shape = [dims[d][2] for d in other]
    read_shape.insert(axis, pts.shape[0])
    lkey = []
    for i, it in enumerate(items):
        kind = it[0]
        d = item_dim[i]
        if kind == K_SLICE or kind == K_NEWAXIS:
            lkey.append(local[i])
        elif kind == K_ELLIPSIS:
            lkey.extend([slice(None)] * it[1])
        elif len(lkey) == (0 if moved else consec) and inv is not None:
            lkey.append(inv)
            inv = None
    if inv is not None:
        lkey.insert(0 if moved else len(lkey), inv)
    return Selection(shp, tuple(dims), tuple(read_shape), result_shape, tuple(lkey),
                     pts, tuple(pdims), axis)
