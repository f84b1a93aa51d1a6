"""The Triton kernels behind `_multitensor` (imported only there, and only where Triton is).

`reduce`: one program per row of the table, each a chunk of one tensor, reduces it to a
partial state: each lane adds in float32 (float64 for float64 tensors; Kahan-compensated for
sum and mean, which may cancel: `_multitensor.SUM_LANES`), the lanes are
combined in float64 and the state is stored in float64. The last program to finish combines
the rows' states in float64 and writes the result: one launch in all (a second launch for
the combine cost ResNet-50's sum 80 us instead of 56 on an H200). Op codes are
`_multitensor.OPS`.
"""

import triton
import triton.language as tl

# Op codes, as in _multitensor.OPS (constexpr: a kernel may read no other globals).
SUM = tl.constexpr(0)
MEAN = tl.constexpr(1)
NORM = tl.constexpr(2)
AMAX = tl.constexpr(3)
AMIN = tl.constexpr(4)
VAR = tl.constexpr(5)
STD = tl.constexpr(6)
VAR_MEAN = tl.constexpr(7)
STD_MEAN = tl.constexpr(8)
DIST = tl.constexpr(9)
SUMSQ = tl.constexpr(10)


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _welford_merge(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
    n = n_a + n_b
    share = tl.where(n == 0, 0.0, n_b / tl.where(n == 0, 1.0, n))
    delta = mean_b - mean_a
    return mean_a + delta * share, m2_a + m2_b + delta * delta * n_a * share, n


@triton.jit
def _row(x, y, n, dst, OP: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr, KAHAN: tl.constexpr):
    lanes = tl.arange(0, BLOCK)
    if OP == AMAX or OP == AMIN:
        top = tl.full([BLOCK], float("-inf"), ACC)
        for i in range(0, n, BLOCK):
            offs = i + lanes
            inside = offs < n
            v = tl.load(x + offs, mask=inside, other=0.0).to(ACC)
            if OP == AMIN:
                v = -v  # min(x) = -max(-x), exactly
            top = tl.maximum(top, tl.where(inside, v, float("-inf")), propagate_nan=tl.PropagateNan.ALL)
        tl.store(dst, tl.reduce(top, 0, _max_nan).to(tl.float64))
    elif OP >= VAR and OP <= STD_MEAN:
        # Welford's update per lane (no cancellation, unlike raw moments), lanes merged by
        # Chan et al.'s formula. Around the first step's mean: the running means are then
        # small where the mean is large against the spread (norm-layer scales: 1 +- 0.1), and
        # rounding them costs M2 digits no more.
        first = tl.load(x + lanes, mask=lanes < n, other=0.0).to(ACC)
        shift = tl.sum(first, 0) / tl.minimum(n, BLOCK).to(ACC)
        mean = tl.zeros([BLOCK], ACC)
        m2 = tl.zeros([BLOCK], ACC)
        count = tl.zeros([BLOCK], ACC)
        for i in range(0, n, BLOCK):
            offs = i + lanes
            inside = offs < n
            v = tl.load(x + offs, mask=inside, other=0.0).to(ACC) - shift
            count += inside.to(ACC)
            delta = v - mean
            mean += tl.where(inside, delta / tl.maximum(count, 1.0), 0.0)
            m2 += tl.where(inside, delta * (v - mean), 0.0)
        # Lanes merged in float64: a float32 tree over 1024 lanes would cost M2 digits.
        lanes_64 = (mean.to(tl.float64), m2.to(tl.float64), count.to(tl.float64))
        row_mean, row_m2, row_n = tl.reduce(lanes_64, 0, _welford_merge)
        tl.store(dst, shift.to(tl.float64))
        tl.store(dst + 1, row_mean)
        tl.store(dst + 2, row_m2)
    else:  # sums: of x, of x * x, of (x - y) ** 2
        total = tl.zeros([BLOCK], ACC)
        lost = tl.zeros([BLOCK], ACC)  # Kahan's compensation: what total's rounding dropped
        for i in range(0, n, BLOCK):
            offs = i + lanes
            v = tl.load(x + offs, mask=offs < n, other=0.0).to(ACC)
            if OP == DIST:
                v -= tl.load(y + offs, mask=offs < n, other=0.0).to(ACC)
            if OP == NORM or OP == DIST or OP == SUMSQ:
                v = v * v
            if KAHAN:
                v -= lost
                t = total + v
                # Past inf the compensation would be inf - inf: NaN where the sum is inf.
                lost = tl.where(tl.abs(t) < float("inf"), (t - total) - v, 0.0)
                total = t
            else:
                total += v
        tl.store(dst, tl.sum(total.to(tl.float64) - lost.to(tl.float64), 0))


@triton.jit
def _partial(x, y, table, vector_rows, partials, OP: tl.constexpr, VEC: tl.constexpr, BLOCK: tl.constexpr,
             F64: tl.constexpr, KAHAN: tl.constexpr):
    row = tl.program_id(0)
    start_x = tl.load(table + 3 * row)
    start_y = tl.load(table + 3 * row + 1)
    n = tl.load(table + 3 * row + 2)
    ACC: tl.constexpr = tl.float64 if F64 else tl.float32
    dst = partials + row * (3 if (OP >= VAR and OP <= STD_MEAN) else 1)  # words of state per row
    if row < vector_rows:
        # In units of VEC elements (16 bytes): Triton then knows that each start and length
        # is a multiple of 16 bytes, and loads 16 bytes at a time.
        _row(x + start_x * VEC, y + start_y * VEC, n * VEC, dst, OP, BLOCK, ACC, KAHAN)
    else:
        _row(x + start_x, y + start_y, n, dst, OP, BLOCK, ACC, KAHAN)


@triton.jit
def _row_states(partials, counts, rows_at, rows):
    # A var row's state: its shift, its mean around the shift, its M2; and its count.
    inside = rows_at < rows
    at = partials + 3 * rows_at
    n = tl.load(counts + rows_at, mask=inside, other=0.0)
    m = tl.load(at, mask=inside, other=0.0, cache_modifier=".cg") + tl.load(at + 1, mask=inside, other=0.0, cache_modifier=".cg")
    s = tl.load(at + 2, mask=inside, other=0.0, cache_modifier=".cg")
    return n, m, s


@triton.jit
def _finish(partials, counts, rows, numel, correction, out, second, OP: tl.constexpr, TILE: tl.constexpr):
    lanes = tl.arange(0, TILE)
    if OP == AMAX or OP == AMIN:
        top = tl.full([TILE], float("-inf"), tl.float64)
        for r in range(0, rows, TILE):
            inside = r + lanes < rows
            v = tl.load(partials + r + lanes, mask=inside, other=0.0, cache_modifier=".cg").to(tl.float64)
            top = tl.maximum(top, tl.where(inside, v, float("-inf")), propagate_nan=tl.PropagateNan.ALL)
        result = tl.reduce(top, 0, _max_nan)
        if OP == AMIN:
            result = -result
        tl.store(out, result.to(out.dtype.element_ty))
    elif OP >= VAR and OP <= STD_MEAN:
        # Chan et al.: the grand mean first, then M2 = sum(M2_r) + sum(n_r (mean_r - mean)^2).
        weighted = tl.zeros([TILE], tl.float64)
        for r in range(0, rows, TILE):
            n, m, s = _row_states(partials, counts, r + lanes, rows)
            weighted += n * m
        total = tl.cast(numel, tl.float64)
        mean = tl.sum(weighted, 0) / total
        m2 = tl.zeros([TILE], tl.float64)
        for r in range(0, rows, TILE):
            n, m, s = _row_states(partials, counts, r + lanes, rows)
            m2 += s + n * (m - mean) * (m - mean)
        # torch divides by max(numel - correction, 0): inf or NaN where that is 0
        var = tl.sum(m2, 0) / tl.maximum(total - correction, 0.0)
        if OP == STD or OP == STD_MEAN:
            var = tl.sqrt(var)
        tl.store(out, var.to(out.dtype.element_ty))
        if OP == VAR_MEAN or OP == STD_MEAN:
            tl.store(second, mean.to(second.dtype.element_ty))
    else:
        acc = tl.zeros([TILE], tl.float64)
        for r in range(0, rows, TILE):
            acc += tl.load(partials + r + lanes, mask=r + lanes < rows, other=0.0, cache_modifier=".cg").to(tl.float64)
        result = tl.sum(acc, 0)
        if OP == MEAN:
            result = result / tl.cast(numel, tl.float64)
        if OP == NORM or OP == DIST:
            result = tl.sqrt(result)
        tl.store(out, result.to(out.dtype.element_ty))


@triton.jit(do_not_specialize=["vector_rows", "rows", "numel", "correction"])
def reduce(x, y, table, vector_rows, partials, counts, rows, numel, correction, arrived, out, second,
           OP: tl.constexpr, VEC: tl.constexpr, BLOCK: tl.constexpr, F64: tl.constexpr, KAHAN: tl.constexpr,
           TILE: tl.constexpr):
    _partial(x, y, table, vector_rows, partials, OP, VEC, BLOCK, F64, KAHAN)
    # Each program's atomic add releases its stores, and the one that counts the last row
    # acquires them all, so it reads every row's state.
    if tl.atomic_add(arrived, 1, sem="acq_rel") == rows - 1:
        _finish(partials, counts, rows, numel, correction, out, second, OP, TILE)
        tl.atomic_xchg(arrived, 0)  # for the next launch on this stream
