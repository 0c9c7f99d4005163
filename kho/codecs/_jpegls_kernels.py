"""Private numba kernels of the JPEG-LS lossless codec (ITU-T T.87, NEAR = 0).

Context modelling, prediction, Golomb coding and run mode as T.87 Annex A specifies them.
The bit writer and reader state (accumulator, bit count, position, last byte was 0xFF)
is threaded through the helpers as scalars so that LLVM keeps it in registers.  Every read
of the input and write of the output is bounds-checked by hand (numba does not check);
errors come back as status codes and the public wrapper raises.

What makes these kernels fast (measured; see benchmarks/codecs.py):

- the per-sample paths (``_encode_line``, ``_decode_line``, ``_encode_pixels``,
  ``_decode_pixels``) call no helper that takes an array: numba increments and decrements
  the reference count of every array passed to a call it does not inline, with atomic
  instructions, and that took ~40% of the time.  Helpers on that path take and return
  scalars (LLVM inlines them); the ones that take arrays (``_put``, ``_golomb``,
  ``_fill``, ``_ungolomb``) serve the rare cases (long codes, refills in run mode);
- no ``inline="always"``: numba's IR inlining multiplied compile time and (passing
  arrays) brought the reference counting back;
- one specialisation per function: numba compiles a function again for each new tuple
  of argument types, and a literal constant argument is a type of its own, so constants
  are passed as ``np.int64(...)``; the wrapper hands the encoder read-only uint16 only;
- indices known to be non-negative are cast to unsigned (numba emits wraparound code
  for signed indices); Ra, Rb, Rc stay in registers from one sample to the next; the
  quantisation table is int8 (L1-sized), the context array flat with 4 fields per context.
"""

from __future__ import annotations

import numpy as np
from numba import config, njit
from numba.cpython.unsafe.numbers import leading_zeros

# count leading zeros: numba's LLVM intrinsic when compiling, plain Python under
# NUMBA_DISABLE_JIT=1 (intrinsics cannot run as Python)
if getattr(config, "DISABLE_JIT", False):

    def _clz64(x):
        return 64 - int(x).bit_length()

else:

    @njit(cache=True, nogil=True)
    def _clz64(x):
        return leading_zeros(x)  # type: ignore[call-arg]


# J table of run lengths (A.7.1.2)
# fmt: off
J = np.array(
    [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3,
     4, 4, 5, 5, 6, 6, 7, 7, 8, 9, 10, 11, 12, 13, 14, 15],
    dtype=np.int64,
)
# fmt: on
N_CONTEXTS = 367  # 365 regular + 2 run interruption (365: RItype 0, 366: RItype 1)

OK = 0
ERR_OVERFLOW = 1  # the output buffer is too small
ERR_TRUNCATED = 2  # the scan data ended (or met a marker) before the image was complete
ERR_CORRUPT = 3  # a code that cannot occur in a valid stream


@njit(cache=True, nogil=True)
def _quantize(d, t1, t2, t3):
    if d <= -t3:
        return -4
    if d <= -t2:
        return -3
    if d <= -t1:
        return -2
    if d < 0:
        return -1
    if d == 0:
        return 0
    if d < t1:
        return 1
    if d < t2:
        return 2
    if d < t3:
        return 3
    return 4


@njit(cache=True, nogil=True)
def _quant_table(maxval, t1, t2, t3):
    """Q(d) for every gradient d in -maxval..maxval, at index d + maxval: a table lookup
    instead of a chain of unpredictable branches per gradient."""
    table = np.empty(2 * maxval + 1, np.int8)  # int8: small enough to stay in L1 cache
    for i in range(2 * maxval + 1):
        table[i] = _quantize(i - maxval, t1, t2, t3)
    return table


@njit(cache=True, nogil=True)
def _predict(ra, rb, rc):
    """The MED predictor (A.4.1): the median of Ra, Rb and Ra + Rb - Rc, as min / max
    (conditional moves, no branch on the data)."""
    return max(min(ra, rb), min(max(ra, rb), ra + rb - rc))


@njit(cache=True, nogil=True)
def _contexts(rng):
    """A, B, C, N of context q at 4q .. 4q + 3 (A.2.1 initialisation); the two run
    interruption contexts keep Nn where the regular ones keep B."""
    ctx = np.zeros(N_CONTEXTS * 4, np.int64)  # flat, 4 per context: 32 bytes
    ctx[0::4] = max(2, (rng + 32) // 64)
    ctx[3::4] = 1
    return ctx


@njit(cache=True, nogil=True)
def _k_for(n, a):
    """The least k with n << k >= a (A.5.1), from bit lengths instead of a loop."""
    k = _clz64(n) - _clz64(a)  # bit_length(a) - bit_length(n): k is this or one more
    if k < 0:
        k = 0
    return k + ((n << k) < a)


@njit(cache=True, nogil=True)
def _mod_reduce(errval, rng):
    if errval < 0:
        errval += rng
    if errval >= (rng + 1) >> 1:
        errval -= rng
    return errval


@njit(cache=True, nogil=True)
def _adapt(a, b, c, n, errval, reset):
    """Context update and bias correction (A.6.1, A.6.2) on scalars: the hot loops load
    and store the context themselves, so that no array crosses a call (numba counts
    references, with atomic instructions, on every call that passes an array)."""
    b += errval
    a += abs(errval)
    if n == reset:
        a >>= 1
        b = b >> 1 if b >= 0 else -((1 - b) >> 1)
        n >>= 1
    n += 1
    if b <= -n:
        b += n
        if c > -128:
            c -= 1
        if b <= -n:
            b = -n + 1
    elif b > 0:
        b -= n
        if c < 127:
            c += 1
        if b > 0:
            b = 0
    return a, b, c, n


# --- encoder ------------------------------------------------------------------------------
# writer state: acc (pending bits, right-aligned), nbits, pos, ff (last byte was 0xFF)


@njit(cache=True, nogil=True)
def _put(out, acc, nbits, pos, ff, value, count):
    """Append ``count`` (<= 32) bits of ``value``, MSB first, with 0xFF bit stuffing."""
    acc = (acc << count) | (value & ((1 << count) - 1))
    nbits += count
    while nbits >= 8 - ff:
        take = 8 - ff
        byte = (acc >> (nbits - take)) & ((1 << take) - 1)
        nbits -= take
        if pos < out.shape[0]:
            out[pos] = byte
        pos += 1  # past the end is detected by the caller (pos > len)
        ff = 1 if byte == 0xFF else 0
    acc &= (1 << nbits) - 1
    return acc, nbits, pos, ff


@njit(cache=True, nogil=True)
def _golomb(out, acc, nbits, pos, ff, value, k, limit, qbpp):
    high = value >> k
    if high < limit - qbpp - 1:
        while high > 24:
            acc, nbits, pos, ff = _put(out, acc, nbits, pos, ff, np.int64(0), np.int64(24))
            high -= 24
        # the unary zeros, the 1 and the k low bits together (high + 1 + k <= 24 + 1 + 16)
        if high + 1 + k <= 32:
            bits = (1 << k) | (value & ((1 << k) - 1))
            return _put(out, acc, nbits, pos, ff, bits, high + 1 + k)
        acc, nbits, pos, ff = _put(out, acc, nbits, pos, ff, np.int64(1), high + 1)
        return _put(out, acc, nbits, pos, ff, value & ((1 << k) - 1), k)
    zeros = limit - qbpp - 1
    while zeros > 24:
        acc, nbits, pos, ff = _put(out, acc, nbits, pos, ff, np.int64(0), np.int64(24))
        zeros -= 24
    acc, nbits, pos, ff = _put(out, acc, nbits, pos, ff, np.int64(1), zeros + 1)
    return _put(out, acc, nbits, pos, ff, value - 1, qbpp)


@njit(cache=True, nogil=True)
def encode_scan(img, comps, ilv, maxval, t1, t2, t3, reset, out, st):
    """Encode the components ``comps`` of ``img`` (rows, cols, all components) as one scan
    with interleave mode ``ilv`` (0: one component, 1: line, 2: sample).  ``st`` gets
    [_, _, bytes written, _, status]."""
    rows, cols = img.shape[0], img.shape[1]
    nc = comps.shape[0]
    rng = maxval + 1
    qbpp = 1
    while (1 << qbpp) < rng:
        qbpp += 1
    bpp = max(2, qbpp)
    limit = 2 * (bpp + max(8, bpp))
    ctx = _contexts(rng)
    qt = _quant_table(maxval, t1, t2, t3)
    prev = np.zeros((nc, cols + 2), np.int32)
    cur = np.zeros((nc, cols + 2), np.int32)
    runindex = np.zeros(nc, np.int64)
    qs_all = np.zeros(nc, np.int64)
    # np.int64(0), not 0: a literal would make numba compile the callees once more for it
    acc, nbits, pos, ff = np.int64(0), np.int64(0), np.int64(0), np.int64(0)
    for y in range(rows):
        for ci in range(nc):
            cur[ci, 0] = prev[ci, 1]
            prev[ci, cols + 1] = prev[ci, cols]
        if ilv == 2:
            acc, nbits, pos, ff = _encode_pixels(
                img,
                y,
                comps,
                prev,
                cur,
                runindex,
                qs_all,
                ctx,
                qt,
                out,
                acc,
                nbits,
                pos,
                ff,
                maxval,
                rng,
                limit,
                qbpp,
                reset,
            )
        else:
            for ci in range(nc):
                acc, nbits, pos, ff = _encode_line(
                    img,
                    y,
                    comps[ci],
                    prev[ci],
                    cur[ci],
                    runindex,
                    ci,
                    ctx,
                    qt,
                    out,
                    acc,
                    nbits,
                    pos,
                    ff,
                    maxval,
                    rng,
                    limit,
                    qbpp,
                    reset,
                )
        if pos > out.shape[0]:
            st[4] = ERR_OVERFLOW
            return
        prev, cur = cur, prev
    # flush: pad with zeros; a final 0xFF is followed by 7 zero bits (a 0x00 byte) so the
    # marker after the scan cannot be misread
    acc, nbits, pos, ff = _put(
        out, acc, nbits, pos, ff, np.int64(0), np.int64(0)
    )  # whole bytes first
    if nbits > 0:
        acc, nbits, pos, ff = _put(out, acc, nbits, pos, ff, np.int64(0), 8 - ff - nbits)
    if ff:
        acc, nbits, pos, ff = _put(out, acc, nbits, pos, ff, np.int64(0), np.int64(7))
    st[2] = pos
    st[4] = ERR_OVERFLOW if pos > out.shape[0] else OK


@njit(cache=True, nogil=True)
def _encode_pixels(
    img,
    y,
    comps,
    prev,
    cur,
    runindex,
    qs_all,
    ctx,
    qt,
    out,
    acc,
    nbits,
    pos,
    ff,
    maxval,
    rng,
    limit,
    qbpp,
    reset,
):
    """One line of sample-interleaved pixels (ILV = 2), written like ``_encode_line``: no
    array crosses a call per sample."""
    cols = img.shape[1]
    nc = comps.shape[0]
    size = out.shape[0]
    escape = limit - qbpp - 1
    for ci in range(nc):
        comp = comps[ci]
        for i in range(cols):
            cur[ci, i + 1] = img[y, i, comp]
    x = 0
    while x < cols:
        all_zero = True
        for ci in range(nc):
            ra = np.int64(cur[ci, x])
            rb = np.int64(prev[ci, x + 1])
            rc = np.int64(prev[ci, x])
            rd = np.int64(prev[ci, x + 2])
            q1 = np.int64(qt[np.uint64(rd - rb + maxval)])
            q2 = np.int64(qt[np.uint64(rb - rc + maxval)])
            qn = (q1 * 9 + q2) * 9 + np.int64(qt[np.uint64(rc - ra + maxval)])
            qs_all[ci] = qn
            if qn != 0:
                all_zero = False
        if not all_zero:
            for ci in range(nc):
                if nbits >= 32:
                    while nbits >= 8 - ff:
                        take = 8 - ff
                        nbits -= take
                        byte = (acc >> nbits) & ((1 << take) - 1)
                        if pos < size:
                            out[np.uint64(pos)] = byte
                        pos += 1
                        ff = 1 if byte == 0xFF else 0
                    acc &= (1 << nbits) - 1
                qs = qs_all[ci]
                ra = np.int64(cur[ci, x])
                rb = np.int64(prev[ci, x + 1])
                rc = np.int64(prev[ci, x])
                value = np.int64(cur[ci, x + 1])
                sign = (qs >> 63) | 1
                q = np.uint64((qs * sign) * 4)
                a = ctx[q]
                b = ctx[q + 1]
                c = ctx[q + 2]
                n = ctx[q + 3]
                px = min(max(_predict(ra, rb, rc) + sign * c, 0), maxval)
                errval = _mod_reduce(sign * (value - px), rng)
                k = _k_for(n, a)
                e = errval ^ (-1 if (k == 0 and 2 * b <= -n) else 0)
                merr = (e << 1) ^ (e >> 63)
                high = merr >> k
                if high < escape and high + 1 + k <= 32:
                    acc = (acc << (high + 1 + k)) | (1 << k) | (merr & ((1 << k) - 1))
                    nbits += high + 1 + k
                else:
                    acc, nbits, pos, ff = _golomb(out, acc, nbits, pos, ff, merr, k, limit, qbpp)
                a, b, c, n = _adapt(a, b, c, n, errval, reset)
                ctx[q] = a
                ctx[q + 1] = b
                ctx[q + 2] = c
                ctx[q + 3] = n
            x += 1
            continue
        # run mode over whole pixels (A.7 with ILV = 2: one run index, RItype 0)
        run = 0
        while x + run < cols:
            same = True
            for ci in range(nc):
                if cur[ci, x + run + 1] != cur[ci, x]:
                    same = False
            if not same:
                break
            run += 1
        ri = runindex[0]
        while run >= (1 << J[ri]):
            if nbits >= 56:
                acc, nbits, pos, ff = _put(out, acc, nbits, pos, ff, np.int64(0), np.int64(0))
            acc = (acc << 1) | 1
            nbits += 1
            run -= 1 << J[ri]
            x += 1 << J[ri]
            if ri < 31:
                ri += 1
        x += run
        if x == cols:
            if run > 0:
                acc, nbits, pos, ff = _put(out, acc, nbits, pos, ff, np.int64(1), np.int64(1))
            runindex[0] = ri
            break
        acc, nbits, pos, ff = _put(out, acc, nbits, pos, ff, np.int64(0), np.int64(0))
        j = J[ri]
        acc = (acc << (j + 1)) | run  # a 0, then the remaining run length in J bits
        nbits += j + 1
        rlimit = limit - j - 1
        for ci in range(nc):
            if nbits >= 24:
                acc, nbits, pos, ff = _put(out, acc, nbits, pos, ff, np.int64(0), np.int64(0))
            ra = np.int64(cur[ci, x])
            rb = np.int64(prev[ci, x + 1])
            value = np.int64(cur[ci, x + 1])
            errval = value - rb if rb >= ra else rb - value
            errval = _mod_reduce(errval, rng)
            a = ctx[365 * 4]
            n = ctx[365 * 4 + 3]
            nn = ctx[365 * 4 + 1]
            k = _k_for(n, a)
            mapped = 0
            if (k == 0 and errval > 0 and 2 * nn < n) or (errval < 0 and (2 * nn >= n or k)):
                mapped = 1
            emerr = 2 * abs(errval) - mapped
            high = emerr >> k
            if high < rlimit - qbpp - 1 and high + 1 + k <= 32:
                acc = (acc << (high + 1 + k)) | (1 << k) | (emerr & ((1 << k) - 1))
                nbits += high + 1 + k
            else:
                acc, nbits, pos, ff = _golomb(out, acc, nbits, pos, ff, emerr, k, rlimit, qbpp)
            if errval < 0:
                nn += 1
            a += (emerr + 1) >> 1
            if n == reset:
                a >>= 1
                n >>= 1
                nn >>= 1
            ctx[365 * 4] = a
            ctx[365 * 4 + 3] = n + 1
            ctx[365 * 4 + 1] = nn
        if ri > 0:
            ri -= 1
        runindex[0] = ri
        x += 1
    return acc, nbits, pos, ff


@njit(cache=True, nogil=True)
def _encode_line(
    img,
    y,
    comp,
    pl,
    cl,
    runindex,
    slot,
    ctx,
    qt,
    out,
    acc,
    nbits,
    pos,
    ff,
    maxval,
    rng,
    limit,
    qbpp,
    reset,
):
    """One line of one component (interleave none or line).  The per-sample path calls no
    helper that takes an array (numba would count references, atomically, on every such
    call): the writer keeps up to 63 pending bits in ``acc`` and writes whole bytes once 32
    are pending; a code that does not fit goes through the general ``_golomb``.  Array
    indices are unsigned (numba adds negative-index wraparound code for signed ones) and
    Ra, Rb, Rc are carried in registers from one sample to the next."""
    cols = img.shape[1]
    size = out.shape[0]
    for i in range(cols):  # the line itself goes into cl[1:], after cl[0] (= Rb of x = 0)
        cl[i + 1] = img[y, i, comp]
    escape = limit - qbpp - 1  # the unary part of a code must stay below this
    x = 0
    ra = np.int64(cl[0])
    rb = np.int64(pl[1])
    rc = np.int64(pl[0])
    while x < cols:
        if nbits >= 32:
            while nbits >= 8 - ff:
                take = 8 - ff
                nbits -= take
                byte = (acc >> nbits) & ((1 << take) - 1)
                if pos < size:
                    out[np.uint64(pos)] = byte
                pos += 1  # past the end is detected by the caller (pos > len)
                ff = 1 if byte == 0xFF else 0
            acc &= (1 << nbits) - 1
        rd = np.int64(pl[np.uint64(x + 2)])
        value = np.int64(cl[np.uint64(x + 1)])
        qs = (
            np.int64(qt[np.uint64(rd - rb + maxval)]) * 9
            + np.int64(qt[np.uint64(rb - rc + maxval)])
        ) * 9
        qs += np.int64(qt[np.uint64(rc - ra + maxval)])
        if qs != 0:
            sign = (qs >> 63) | 1  # -1 or 1, without a branch
            q = np.uint64((qs * sign) * 4)
            a = ctx[q]
            b = ctx[q + 1]
            c = ctx[q + 2]
            n = ctx[q + 3]
            px = min(max(_predict(ra, rb, rc) + sign * c, 0), maxval)
            errval = _mod_reduce(sign * (value - px), rng)
            k = _k_for(n, a)
            # error mapping (A.5.2), the k = 0 special case as a complement: branch-free
            e = errval ^ (-1 if (k == 0 and 2 * b <= -n) else 0)
            merr = (e << 1) ^ (e >> 63)
            high = merr >> k
            if high < escape and high + 1 + k <= 32:
                acc = (acc << (high + 1 + k)) | (1 << k) | (merr & ((1 << k) - 1))
                nbits += high + 1 + k
            else:
                acc, nbits, pos, ff = _golomb(out, acc, nbits, pos, ff, merr, k, limit, qbpp)
            a, b, c, n = _adapt(a, b, c, n, errval, reset)
            ctx[q] = a
            ctx[q + 1] = b
            ctx[q + 2] = c
            ctx[q + 3] = n
            rc = rb
            rb = rd
            ra = value
            x += 1
            continue
        # run mode (A.7)
        run = 0
        while x + run < cols and cl[np.uint64(x + run + 1)] == ra:
            run += 1
        ri = runindex[slot]
        while run >= (1 << J[ri]):
            if nbits >= 56:
                acc, nbits, pos, ff = _put(out, acc, nbits, pos, ff, np.int64(0), np.int64(0))
            acc = (acc << 1) | 1
            nbits += 1
            run -= 1 << J[ri]
            x += 1 << J[ri]
            if ri < 31:
                ri += 1
        x += run
        if x == cols:
            if run > 0:
                acc, nbits, pos, ff = _put(out, acc, nbits, pos, ff, np.int64(1), np.int64(1))
            runindex[slot] = ri
            break
        if nbits >= 16:
            acc, nbits, pos, ff = _put(out, acc, nbits, pos, ff, np.int64(0), np.int64(0))
        j = J[ri]
        acc = (acc << (j + 1)) | run  # a 0, then the remaining run length in J bits
        nbits += j + 1
        # the run interruption sample (A.7.2)
        value = np.int64(cl[x + 1])
        rb = np.int64(pl[x + 1])
        ritype = 1 if ra == rb else 0
        if ritype:
            errval = value - ra
        else:
            errval = value - rb if ra <= rb else rb - value
        errval = _mod_reduce(errval, rng)
        qr = (365 + ritype) * 4
        a = ctx[qr]
        n = ctx[qr + 3]
        nn = ctx[qr + 1]
        k = _k_for(n, a + (n >> 1) if ritype else a)
        mapped = 0
        if (k == 0 and errval > 0 and 2 * nn < n) or (errval < 0 and (2 * nn >= n or k)):
            mapped = 1
        emerr = 2 * abs(errval) - ritype - mapped
        rlimit = limit - j - 1
        high = emerr >> k
        if high < rlimit - qbpp - 1 and high + 1 + k <= 32:
            acc = (acc << (high + 1 + k)) | (1 << k) | (emerr & ((1 << k) - 1))
            nbits += high + 1 + k
        else:
            acc, nbits, pos, ff = _golomb(out, acc, nbits, pos, ff, emerr, k, rlimit, qbpp)
        if errval < 0:
            nn += 1
        a += (emerr + 1 - ritype) >> 1
        if n == reset:
            a >>= 1
            n >>= 1
            nn >>= 1
        ctx[qr] = a
        ctx[qr + 3] = n + 1
        ctx[qr + 1] = nn
        if ri > 0:
            ri -= 1
        runindex[slot] = ri
        x += 1
        ra = value
        rc = rb
        rb = np.int64(pl[x + 1])
    return acc, nbits, pos, ff


# --- decoder ------------------------------------------------------------------------------
# reader state: acc, nbits, pos, ff, fake (zero bits invented past the end of the data)


@njit(cache=True, nogil=True)
def _fill(src, acc, nbits, pos, ff, fake):
    end = src.shape[0]
    while nbits <= 48:
        if pos < end:
            byte = np.int64(src[pos])
            if ff:
                if byte & 0x80:  # a marker, not data: the scan data end here
                    pos = end
                    continue
                acc = (acc << 7) | byte
                nbits += 7
            else:
                acc = (acc << 8) | byte
                nbits += 8
            ff = 1 if byte == 0xFF else 0
            pos += 1
        else:
            acc <<= 8  # zeros past the end, counted so over-reading is detected
            nbits += 8
            fake += 8
    acc &= (1 << nbits) - 1
    return acc, nbits, pos, ff, fake


@njit(cache=True, nogil=True)
def _get(src, acc, nbits, pos, ff, fake, count):
    if nbits < count:
        acc, nbits, pos, ff, fake = _fill(src, acc, nbits, pos, ff, fake)
    nbits -= count
    return (acc >> nbits) & ((1 << count) - 1), acc, nbits, pos, ff, fake


@njit(cache=True, nogil=True)
def _ungolomb(src, acc, nbits, pos, ff, fake, k, limit, qbpp):
    """Decode one LG(k, limit) code; value -1 for a code no valid stream contains."""
    if nbits < 24:  # refill rarely, a few bytes at a time
        acc, nbits, pos, ff, fake = _fill(src, acc, nbits, pos, ff, fake)
    live = acc & ((1 << nbits) - 1)  # bits above nbits are stale
    if live:  # the usual case: the whole code is in the accumulator
        top = 63 - _clz64(live)
        high = nbits - 1 - top
        if top >= k and high < limit - qbpp - 1:
            nbits = top - k
            return (high << k) | ((acc >> nbits) & ((1 << k) - 1)), acc, nbits, pos, ff, fake
    high = 0
    while True:
        if nbits == 0:
            acc, nbits, pos, ff, fake = _fill(src, acc, nbits, pos, ff, fake)
        # index of the highest 1 among the nbits valid bits (-1: all zeros)
        live = acc & ((1 << nbits) - 1)  # bits above nbits are stale
        top = 63 - _clz64(live) if live else -1
        if top >= 0:
            high += nbits - 1 - top
            nbits = top  # consume the zeros and the 1
            break
        high += nbits
        nbits = 0
        if high > limit:
            return -1, acc, nbits, pos, ff, fake
    if high < limit - qbpp - 1:
        if k == 0:
            return high, acc, nbits, pos, ff, fake
        low, acc, nbits, pos, ff, fake = _get(src, acc, nbits, pos, ff, fake, k)
        return (high << k) | low, acc, nbits, pos, ff, fake
    if high != limit - qbpp - 1:
        return -1, acc, nbits, pos, ff, fake
    value, acc, nbits, pos, ff, fake = _get(src, acc, nbits, pos, ff, fake, qbpp)
    return value + 1, acc, nbits, pos, ff, fake


@njit(cache=True, nogil=True)
def decode_scan(src, img, comps, ilv, maxval, t1, t2, t3, reset, st):
    """Decode one scan into ``img``; ``st[4]`` gets the status."""
    rows, cols = img.shape[0], img.shape[1]
    nc = comps.shape[0]
    rng = maxval + 1
    qbpp = 1
    while (1 << qbpp) < rng:
        qbpp += 1
    bpp = max(2, qbpp)
    limit = 2 * (bpp + max(8, bpp))
    ctx = _contexts(rng)
    qt = _quant_table(maxval, t1, t2, t3)
    prev = np.zeros((nc, cols + 2), np.int32)
    cur = np.zeros((nc, cols + 2), np.int32)
    runindex = np.zeros(nc, np.int64)
    qs_all = np.zeros(nc, np.int64)
    # np.int64(0), not 0: a literal would make numba compile the callees once more for it
    acc, nbits, pos, ff, fake = np.int64(0), np.int64(0), np.int64(0), np.int64(0), np.int64(0)
    for y in range(rows):
        for ci in range(nc):
            cur[ci, 0] = prev[ci, 1]
            prev[ci, cols + 1] = prev[ci, cols]
        if ilv != 2:
            for ci in range(nc):
                acc, nbits, pos, ff, fake, status = _decode_line(
                    src,
                    acc,
                    nbits,
                    pos,
                    ff,
                    fake,
                    img,
                    y,
                    comps[ci],
                    prev[ci],
                    cur[ci],
                    runindex,
                    ci,
                    ctx,
                    maxval,
                    rng,
                    qt,
                    limit,
                    qbpp,
                    reset,
                )
                if status != OK:
                    st[4] = status
                    return
            prev, cur = cur, prev
            continue
        acc, nbits, pos, ff, fake, status = _decode_pixels(
            src,
            acc,
            nbits,
            pos,
            ff,
            fake,
            img,
            y,
            comps,
            prev,
            cur,
            runindex,
            qs_all,
            ctx,
            maxval,
            rng,
            qt,
            limit,
            qbpp,
            reset,
        )
        if status != OK:
            st[4] = status
            return
        prev, cur = cur, prev
    if fake > nbits:  # zero bits invented past the end of the data were used
        st[4] = ERR_TRUNCATED


@njit(cache=True, nogil=True)
def _decode_pixels(
    src,
    acc,
    nbits,
    pos,
    ff,
    fake,
    img,
    y,
    comps,
    prev,
    cur,
    runindex,
    qs_all,
    ctx,
    maxval,
    rng,
    qt,
    limit,
    qbpp,
    reset,
):
    """One line of sample-interleaved pixels (ILV = 2), read like ``_decode_line``."""
    cols = img.shape[1]
    nc = comps.shape[0]
    end = src.shape[0]
    escape = limit - qbpp - 1
    status = OK
    x = 0
    while x < cols and status == OK:
        all_zero = True
        for ci in range(nc):
            ra = np.int64(cur[ci, x])
            rb = np.int64(prev[ci, x + 1])
            rc = np.int64(prev[ci, x])
            rd = np.int64(prev[ci, x + 2])
            q1 = np.int64(qt[np.uint64(rd - rb + maxval)])
            q2 = np.int64(qt[np.uint64(rb - rc + maxval)])
            qn = (q1 * 9 + q2) * 9 + np.int64(qt[np.uint64(rc - ra + maxval)])
            qs_all[ci] = qn
            if qn != 0:
                all_zero = False
        if not all_zero:
            for ci in range(nc):
                if nbits < 32:
                    while nbits <= 48:
                        if pos < end:
                            byte = np.int64(src[np.uint64(pos)])
                            if ff:
                                if byte & 0x80:  # a marker, not data: the scan data end here
                                    pos = end
                                    continue
                                acc = (acc << 7) | byte
                                nbits += 7
                            else:
                                acc = (acc << 8) | byte
                                nbits += 8
                            ff = 1 if byte == 0xFF else 0
                            pos += 1
                        else:
                            acc <<= 8  # zeros past the end, counted
                            nbits += 8
                            fake += 8
                    if fake > nbits + 64:
                        status = ERR_TRUNCATED
                        break
                qs = qs_all[ci]
                ra = np.int64(cur[ci, x])
                rb = np.int64(prev[ci, x + 1])
                rc = np.int64(prev[ci, x])
                sign = (qs >> 63) | 1
                q = np.uint64((qs * sign) * 4)
                a = ctx[q]
                b = ctx[q + 1]
                c = ctx[q + 2]
                n = ctx[q + 3]
                px = min(max(_predict(ra, rb, rc) + sign * c, 0), maxval)
                k = _k_for(n, a)
                live = acc & ((1 << nbits) - 1)
                top = 63 - _clz64(live)
                high = nbits - 1 - top
                if top >= k and high < escape:
                    nbits = top - k
                    merr = (high << k) | ((acc >> nbits) & ((1 << k) - 1))
                else:
                    merr, acc, nbits, pos, ff, fake = _ungolomb(
                        src, acc, nbits, pos, ff, fake, k, limit, qbpp
                    )
                    if merr < 0:
                        status = ERR_CORRUPT
                        break
                swap = 1 if (k == 0 and 2 * b <= -n) else 0
                errval = (merr >> 1) ^ -((merr & 1) ^ swap)
                a, b, c, n = _adapt(a, b, c, n, errval, reset)
                ctx[q] = a
                ctx[q + 1] = b
                ctx[q + 2] = c
                ctx[q + 3] = n
                value = px + sign * errval
                if value < 0:
                    value += rng
                elif value > maxval:
                    value -= rng
                if value < 0 or value > maxval:
                    status = ERR_CORRUPT
                    break
                cur[ci, x + 1] = value
            x += 1
            continue
        # run mode over whole pixels (ILV = 2: one run index, RItype 0)
        ri = runindex[0]
        while True:
            if nbits == 0:
                acc, nbits, pos, ff, fake = _fill(src, acc, nbits, pos, ff, fake)
                if fake > nbits + 64:
                    status = ERR_TRUNCATED
                    break
            nbits -= 1
            if (acc >> nbits) & 1:
                count = min(1 << J[ri], cols - x)
                for i in range(count):
                    for ci in range(nc):
                        cur[ci, x + 1 + i] = cur[ci, x]
                x += count
                if count == (1 << J[ri]) and ri < 31:
                    ri += 1
                if x == cols:
                    break
                continue
            j = J[ri]
            count = 0
            if j:
                if nbits < j:
                    acc, nbits, pos, ff, fake = _fill(src, acc, nbits, pos, ff, fake)
                nbits -= j
                count = (acc >> nbits) & ((1 << j) - 1)
            if x + count >= cols:
                status = ERR_CORRUPT
                break
            for i in range(count):
                for ci in range(nc):
                    cur[ci, x + 1 + i] = cur[ci, x]
            x += count
            # the run interruption pixel: every component with RItype 0
            for ci in range(nc):
                ra = np.int64(cur[ci, x])
                rb = np.int64(prev[ci, x + 1])
                a = ctx[365 * 4]
                n = ctx[365 * 4 + 3]
                nn = ctx[365 * 4 + 1]
                k = _k_for(n, a)
                emerr, acc, nbits, pos, ff, fake = _ungolomb(
                    src, acc, nbits, pos, ff, fake, k, limit - j - 1, qbpp
                )
                if emerr < 0:
                    status = ERR_CORRUPT
                    break
                if k == 0 and 2 * nn < n:
                    errval = (emerr + 1) >> 1 if emerr & 1 else -(emerr >> 1)
                else:
                    errval = -((emerr + 1) >> 1) if emerr & 1 else emerr >> 1
                if errval < 0:
                    nn += 1
                a += (emerr + 1) >> 1
                if n == reset:
                    a >>= 1
                    n >>= 1
                    nn >>= 1
                ctx[365 * 4] = a
                ctx[365 * 4 + 3] = n + 1
                ctx[365 * 4 + 1] = nn
                value = rb + errval if rb >= ra else rb - errval
                if value < 0:
                    value += rng
                elif value > maxval:
                    value -= rng
                if value < 0 or value > maxval:
                    status = ERR_CORRUPT
                    break
                cur[ci, x + 1] = value
            if ri > 0:
                ri -= 1
            x += 1
            break
        runindex[0] = ri
    for ci in range(nc):
        comp = comps[ci]
        for i in range(cols):
            img[y, i, comp] = cur[ci, i + 1]
    return acc, nbits, pos, ff, fake, status


@njit(cache=True, nogil=True)
def _decode_line(
    src,
    acc,
    nbits,
    pos,
    ff,
    fake,
    img,
    y,
    comp,
    pl,
    cl,
    runindex,
    slot,
    ctx,
    maxval,
    rng,
    qt,
    limit,
    qbpp,
    reset,
):
    """One line of one component (interleave none or line) into cl[1:], then copied into
    the image.  As in ``_encode_line`` the per-sample path passes no array to a helper: the
    reader refills ``acc`` in place when fewer than 32 bits are left and decodes a Golomb
    code found whole in it directly; other codes go through the general ``_ungolomb``."""
    cols = img.shape[1]
    end = src.shape[0]
    escape = limit - qbpp - 1
    status = OK
    x = 0
    ra = np.int64(cl[0])
    rb = np.int64(pl[1])
    rc = np.int64(pl[0])
    while x < cols:
        if nbits < 32:
            while nbits <= 48:
                if pos < end:
                    byte = np.int64(src[np.uint64(pos)])
                    if ff:
                        if byte & 0x80:  # a marker, not data: the scan data end here
                            pos = end
                            continue
                        acc = (acc << 7) | byte
                        nbits += 7
                    else:
                        acc = (acc << 8) | byte
                        nbits += 8
                    ff = 1 if byte == 0xFF else 0
                    pos += 1
                else:
                    acc <<= 8  # zeros past the end, counted so over-reading is detected
                    nbits += 8
                    fake += 8
            if fake > nbits + 64:  # far past the end of the data: truncated
                status = ERR_TRUNCATED
                break
        rd = np.int64(pl[np.uint64(x + 2)])
        qs = (
            np.int64(qt[np.uint64(rd - rb + maxval)]) * 9
            + np.int64(qt[np.uint64(rb - rc + maxval)])
        ) * 9
        qs += np.int64(qt[np.uint64(rc - ra + maxval)])
        if qs != 0:
            sign = (qs >> 63) | 1  # -1 or 1, without a branch (the sign is unpredictable)
            q = np.uint64((qs * sign) * 4)
            a = ctx[q]
            b = ctx[q + 1]
            c = ctx[q + 2]
            n = ctx[q + 3]
            px = min(max(_predict(ra, rb, rc) + sign * c, 0), maxval)
            k = _k_for(n, a)
            # the Golomb code, when it lies whole in the accumulator (almost always)
            live = acc & ((1 << nbits) - 1)  # bits above nbits are stale
            top = 63 - _clz64(live)  # -1 when no bit is set
            high = nbits - 1 - top
            if top >= k and high < escape:
                nbits = top - k
                merr = (high << k) | ((acc >> nbits) & ((1 << k) - 1))
            else:
                merr, acc, nbits, pos, ff, fake = _ungolomb(
                    src, acc, nbits, pos, ff, fake, k, limit, qbpp
                )
                if merr < 0:
                    status = ERR_CORRUPT
                    break
            # inverse of the error mapping (A.5.2): even -> >= 0, odd -> < 0, swapped in
            # the special k = 0 case; written as an xor so that no branch depends on the data
            swap = 1 if (k == 0 and 2 * b <= -n) else 0
            errval = (merr >> 1) ^ -((merr & 1) ^ swap)
            a, b, c, n = _adapt(a, b, c, n, errval, reset)
            ctx[q] = a
            ctx[q + 1] = b
            ctx[q + 2] = c
            ctx[q + 3] = n
            value = px + sign * errval
            if value < 0:
                value += rng
            elif value > maxval:
                value -= rng
            if value < 0 or value > maxval:
                status = ERR_CORRUPT
                break
            cl[np.uint64(x + 1)] = value
            rc = rb
            rb = rd
            ra = value
            x += 1
            continue
        # run mode (A.7)
        ri = runindex[slot]
        while True:
            if nbits == 0:
                acc, nbits, pos, ff, fake = _fill(src, acc, nbits, pos, ff, fake)
                if fake > nbits + 64:
                    status = ERR_TRUNCATED
                    break
            nbits -= 1
            if (acc >> nbits) & 1:
                count = min(1 << J[ri], cols - x)
                for i in range(count):
                    cl[x + 1 + i] = ra
                x += count
                if count == (1 << J[ri]) and ri < 31:
                    ri += 1
                if x == cols:
                    break
                continue
            j = J[ri]
            count = 0
            if j:
                if nbits < j:
                    acc, nbits, pos, ff, fake = _fill(src, acc, nbits, pos, ff, fake)
                nbits -= j
                count = (acc >> nbits) & ((1 << j) - 1)
            if x + count >= cols:
                status = ERR_CORRUPT
                break
            for i in range(count):
                cl[x + 1 + i] = ra
            x += count
            # the run interruption sample (A.7.2)
            rb = np.int64(pl[x + 1])
            ritype = 1 if ra == rb else 0
            qr = (365 + ritype) * 4
            a = ctx[qr]
            n = ctx[qr + 3]
            nn = ctx[qr + 1]
            k = _k_for(n, a + (n >> 1) if ritype else a)
            emerr, acc, nbits, pos, ff, fake = _ungolomb(
                src, acc, nbits, pos, ff, fake, k, limit - j - 1, qbpp
            )
            if emerr < 0:
                status = ERR_CORRUPT
                break
            # invert EMErrval = 2|E| - RItype - map (A.7.2.2)
            tmp = emerr + ritype
            if k == 0 and 2 * nn < n:
                errval = (tmp + 1) >> 1 if tmp & 1 else -(tmp >> 1)
            else:
                errval = -((tmp + 1) >> 1) if tmp & 1 else tmp >> 1
            if errval < 0:
                nn += 1
            a += (emerr + 1 - ritype) >> 1
            if n == reset:
                a >>= 1
                n >>= 1
                nn >>= 1
            ctx[qr] = a
            ctx[qr + 3] = n + 1
            ctx[qr + 1] = nn
            if ritype:
                value = ra + errval
            else:
                value = rb + errval if rb >= ra else rb - errval
            if value < 0:
                value += rng
            elif value > maxval:
                value -= rng
            if value < 0 or value > maxval:
                status = ERR_CORRUPT
                break
            if ri > 0:
                ri -= 1
            cl[x + 1] = value
            x += 1
            ra = value
            rc = rb
            rb = np.int64(pl[x + 1])
            break
        runindex[slot] = ri
        if status != OK:
            break
    for i in range(cols):
        img[y, i, comp] = cl[i + 1]
    return acc, nbits, pos, ff, fake, status
