"""Private numba kernels of the JPEG-LS lossless codec (ITU-T T.87, NEAR = 0).

Context modelling, prediction, Golomb coding and run mode as T.87 Annex A specifies them.
Every read of the input and write of the output is bounds-checked by hand (numba does not
check), and failures are reported through status codes: the public wrapper raises.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# J table of run lengths (A.7.1.2)
J = np.array(
    [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 9, 10, 11, 12, 13, 14, 15],
    dtype=np.int64,
)
N_CONTEXTS = 367  # 365 regular + 2 run interruption (365: RItype 0, 366: RItype 1)

OK = 0
ERR_OVERFLOW = 1  # output buffer too small (encoder) / decoder wrote past its image
ERR_TRUNCATED = 2  # the scan data ended (or met a marker) before the image was complete
ERR_CORRUPT = 3  # a code that cannot occur in a valid stream


@njit(cache=True, nogil=True)
def _quantize(d: int, t1: int, t2: int, t3: int) -> int:
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
def _predict(ra: int, rb: int, rc: int) -> int:
    if rc >= max(ra, rb):
        return min(ra, rb)
    if rc <= min(ra, rb):
        return max(ra, rb)
    return ra + rb - rc


@njit(cache=True, nogil=True)
def init_contexts(a, b, c, n, nn, rng: int) -> None:
    a_init = max(2, (rng + 32) // 64)
    for i in range(N_CONTEXTS):
        a[i] = a_init
        b[i] = 0
        c[i] = 0
        n[i] = 1
        nn[i] = 0


# --- bit writer state lives in a small int64 array: [acc, nbits, pos, last_was_ff, error] ---


@njit(cache=True, nogil=True)
def _put(out, st, value: int, count: int) -> None:
    """Append ``count`` (<= 32) bits of ``value``, MSB first, with 0xFF bit stuffing."""
    acc = (st[0] << count) | (value & ((1 << count) - 1))
    nbits = st[1] + count
    pos = st[2]
    ff = st[3]
    while True:
        take = 7 if ff else 8
        if nbits < take:
            break
        byte = (acc >> (nbits - take)) & ((1 << take) - 1)
        nbits -= take
        if pos >= out.shape[0]:
            st[4] = ERR_OVERFLOW
            return
        out[pos] = byte
        pos += 1
        ff = 1 if byte == 0xFF else 0
    st[0] = acc & ((1 << nbits) - 1)
    st[1] = nbits
    st[2] = pos
    st[3] = ff


@njit(cache=True, nogil=True)
def _put_zeros(out, st, count: int) -> None:
    while count > 24:
        _put(out, st, 0, 24)
        count -= 24
    if count > 0:
        _put(out, st, 0, count)


@njit(cache=True, nogil=True)
def flush(out, st) -> None:
    """Pad the last byte with zeros; a final 0xFF is followed by a zero byte so that the
    marker after the scan cannot be misread."""
    take = 7 if st[3] else 8
    if st[1] > 0:
        _put(out, st, 0, take - st[1])
    if st[3] and st[4] == OK:
        _put(out, st, 0, 7)


@njit(cache=True, nogil=True)
def _golomb_encode(out, st, value: int, k: int, limit: int, qbpp: int) -> None:
    high = value >> k
    if high < limit - qbpp - 1:
        _put_zeros(out, st, high)
        _put(out, st, 1, 1)
        if k:
            _put(out, st, value & ((1 << k) - 1), k)
    else:
        _put_zeros(out, st, limit - qbpp - 1)
        _put(out, st, 1, 1)
        _put(out, st, value - 1, qbpp)


@njit(cache=True, nogil=True)
def _update_regular(a, b, c, n, q: int, errval: int, reset: int) -> None:
    b[q] += errval
    a[q] += abs(errval)
    if n[q] == reset:
        a[q] >>= 1
        if b[q] >= 0:
            b[q] >>= 1
        else:
            b[q] = -((1 - b[q]) >> 1)
        n[q] >>= 1
    n[q] += 1
    if b[q] <= -n[q]:
        b[q] += n[q]
        if c[q] > -128:
            c[q] -= 1
        if b[q] <= -n[q]:
            b[q] = -n[q] + 1
    elif b[q] > 0:
        b[q] -= n[q]
        if c[q] < 127:
            c[q] += 1
        if b[q] > 0:
            b[q] = 0


@njit(cache=True, nogil=True)
def _k_for(n: int, a: int) -> int:
    k = 0
    while (n << k) < a:
        k += 1
    return k


@njit(cache=True, nogil=True)
def _mod_reduce(errval: int, rng: int) -> int:
    if errval < 0:
        errval += rng
    if errval >= (rng + 1) // 2:
        errval -= rng
    return errval


@njit(cache=True, nogil=True)
def _encode_regular(out, st, a, b, c, n, q, sign, x, px, rng, maxval, limit, qbpp, reset):
    px = px + c[q] if sign > 0 else px - c[q]
    if px > maxval:
        px = maxval
    elif px < 0:
        px = 0
    errval = x - px
    if sign < 0:
        errval = -errval
    errval = _mod_reduce(errval, rng)
    k = _k_for(n[q], a[q])
    if k == 0 and 2 * b[q] <= -n[q]:
        merr = 2 * errval + 1 if errval >= 0 else -2 * (errval + 1)
    else:
        merr = 2 * errval if errval >= 0 else -2 * errval - 1
    _golomb_encode(out, st, merr, k, limit, qbpp)
    _update_regular(a, b, c, n, q, errval, reset)


@njit(cache=True, nogil=True)
def _encode_ri(out, st, a, n, nn, errval, ritype, runindex, rng, limit, qbpp, reset):
    """A run interruption sample's error (A.7.2), ``errval`` before modulo reduction."""
    errval = _mod_reduce(errval, rng)
    q = 365 + ritype
    temp = a[q] + (n[q] >> 1) if ritype else a[q]
    k = _k_for(n[q], temp)
    mapped = 0
    if k == 0 and errval > 0 and 2 * nn[q] < n[q]:
        mapped = 1
    elif errval < 0 and 2 * nn[q] >= n[q]:
        mapped = 1
    elif errval < 0 and k != 0:
        mapped = 1
    emerr = 2 * abs(errval) - ritype - mapped
    _golomb_encode(out, st, emerr, k, limit - J[runindex] - 1, qbpp)
    if errval < 0:
        nn[q] += 1
    a[q] += (emerr + 1 - ritype) >> 1
    if n[q] == reset:
        a[q] >>= 1
        n[q] >>= 1
        nn[q] >>= 1
    n[q] += 1


@njit(cache=True, nogil=True)
def encode_scan(img, comps, ilv, maxval, t1, t2, t3, reset, out, st):
    """Encode the components ``comps`` of ``img`` (rows, cols, all components) as one scan
    with interleave mode ``ilv`` (0 with one component, 1 line, 2 sample)."""
    rows, cols = img.shape[0], img.shape[1]
    nc = comps.shape[0]
    rng = maxval + 1
    qbpp = 1
    while (1 << qbpp) < rng:
        qbpp += 1
    bpp = max(2, qbpp)
    limit = 2 * (bpp + max(8, bpp))
    a = np.empty(N_CONTEXTS, np.int64)
    b = np.empty(N_CONTEXTS, np.int64)
    c = np.empty(N_CONTEXTS, np.int64)
    n = np.empty(N_CONTEXTS, np.int64)
    nn = np.empty(N_CONTEXTS, np.int64)
    init_contexts(a, b, c, n, nn, rng)
    # line buffers with one sample of padding each side: index x + 1 is column x
    prev = np.zeros((nc, cols + 2), np.int64)
    cur = np.zeros((nc, cols + 2), np.int64)
    runindex = np.zeros(nc, np.int64)
    for y in range(rows):
        for ci in range(nc):
            cur[ci, 0] = prev[ci, 1]
            prev[ci, cols + 1] = prev[ci, cols]
        if ilv == 2:
            _encode_line_interleaved(img, comps, y, prev, cur, a, b, c, n, nn, runindex,
                                     maxval, rng, t1, t2, t3, limit, qbpp, reset, out, st)
        else:
            for ci in range(nc):
                _encode_line(img, comps[ci], y, prev[ci], cur[ci], a, b, c, n, nn, runindex, ci,
                             maxval, rng, t1, t2, t3, limit, qbpp, reset, out, st)
        if st[4] != OK:
            return
        prev, cur = cur, prev
    flush(out, st)


@njit(cache=True, nogil=True)
def _encode_line(img, comp, y, prev, cur, a, b, c, n, nn, runindex, ri_slot,
                 maxval, rng, t1, t2, t3, limit, qbpp, reset, out, st):
    cols = img.shape[1]
    x = 0
    while x < cols:
        ra = cur[x]
        rb = prev[x + 1]
        rc = prev[x]
        rd = prev[x + 2]
        q1 = _quantize(rd - rb, t1, t2, t3)
        q2 = _quantize(rb - rc, t1, t2, t3)
        q3 = _quantize(rc - ra, t1, t2, t3)
        if q1 == 0 and q2 == 0 and q3 == 0:
            # run mode (A.7)
            run = 0
            while x + run < cols and img[y, x + run, comp] == ra:
                cur[x + run + 1] = ra
                run += 1
            ri = runindex[ri_slot]
            count = run
            while count >= (1 << J[ri]):
                _put(out, st, 1, 1)
                count -= 1 << J[ri]
                if ri < 31:
                    ri += 1
            x += run
            if x == cols:
                if count > 0:
                    _put(out, st, 1, 1)
                runindex[ri_slot] = ri
                break
            _put(out, st, 0, 1)
            if J[ri]:
                _put(out, st, count, J[ri])
            # run interruption sample
            value = int(img[y, x, comp])
            rb = prev[x + 1]
            if ra == rb:
                _encode_ri(out, st, a, n, nn, value - ra, 1, ri, rng, limit, qbpp, reset)
            else:
                errval = value - rb
                if ra > rb:
                    errval = -errval
                _encode_ri(out, st, a, n, nn, errval, 0, ri, rng, limit, qbpp, reset)
            if ri > 0:
                ri -= 1
            runindex[ri_slot] = ri
            cur[x + 1] = value
            x += 1
            continue
        qs = (q1 * 9 + q2) * 9 + q3
        sign = 1
        if qs < 0:
            sign = -1
            qs = -qs
        value = int(img[y, x, comp])
        _encode_regular(out, st, a, b, c, n, qs, sign, value, _predict(ra, rb, rc),
                        rng, maxval, limit, qbpp, reset)
        cur[x + 1] = value
        x += 1


@njit(cache=True, nogil=True)
def _encode_line_interleaved(img, comps, y, prev, cur, a, b, c, n, nn, runindex,
                             maxval, rng, t1, t2, t3, limit, qbpp, reset, out, st):
    cols = img.shape[1]
    nc = comps.shape[0]
    qs_all = np.empty(nc, np.int64)
    x = 0
    while x < cols:
        all_zero = True
        for ci in range(nc):
            ra = cur[ci, x]
            rb = prev[ci, x + 1]
            rc = prev[ci, x]
            rd = prev[ci, x + 2]
            q = (_quantize(rd - rb, t1, t2, t3) * 9 + _quantize(rb - rc, t1, t2, t3)) * 9 \
                + _quantize(rc - ra, t1, t2, t3)
            qs_all[ci] = q
            if q != 0:
                all_zero = False
        if all_zero:
            run = 0
            while x + run < cols:
                same = True
                for ci in range(nc):
                    if img[y, x + run, comps[ci]] != cur[ci, x]:
                        same = False
                        break
                if not same:
                    break
                for ci in range(nc):
                    cur[ci, x + run + 1] = cur[ci, x]
                run += 1
            ri = runindex[0]
            count = run
            while count >= (1 << J[ri]):
                _put(out, st, 1, 1)
                count -= 1 << J[ri]
                if ri < 31:
                    ri += 1
            x += run
            if x == cols:
                if count > 0:
                    _put(out, st, 1, 1)
                runindex[0] = ri
                break
            _put(out, st, 0, 1)
            if J[ri]:
                _put(out, st, count, J[ri])
            for ci in range(nc):
                ra = cur[ci, x]
                rb = prev[ci, x + 1]
                value = int(img[y, x, comps[ci]])
                errval = value - rb
                if rb < ra:
                    errval = -errval
                _encode_ri(out, st, a, n, nn, errval, 0, ri, rng, limit, qbpp, reset)
                cur[ci, x + 1] = value
            if ri > 0:
                ri -= 1
            runindex[0] = ri
            x += 1
            continue
        for ci in range(nc):
            qs = qs_all[ci]
            sign = 1
            if qs < 0:
                sign = -1
                qs = -qs
            value = int(img[y, x, comps[ci]])
            px = _predict(cur[ci, x], prev[ci, x + 1], prev[ci, x])
            _encode_regular(out, st, a, b, c, n, qs, sign, value, px, rng, maxval, limit, qbpp, reset)
            cur[ci, x + 1] = value
        x += 1


# --- decoding: bit reader state [acc, nbits, pos, last_was_ff, error, fake_bits] ---------


@njit(cache=True, nogil=True)
def _fill(src, st) -> None:
    acc, nbits, pos, ff = st[0], st[1], st[2], st[3]
    end = src.shape[0]
    while nbits <= 48:
        if pos < end:
            byte = int(src[pos])
            if ff:
                if byte & 0x80:  # a marker, not data: the scan ends here
                    st[2] = end  # nothing more is read from this buffer
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
            acc <<= 8  # zeros past the end; counted, so over-reading is detected
            nbits += 8
            st[5] += 8
    st[0] = acc & ((1 << nbits) - 1)
    st[1] = nbits
    st[2] = pos
    st[3] = ff


@njit(cache=True, nogil=True)
def _get(src, st, count: int) -> int:
    if st[1] < count:
        _fill(src, st)
    st[1] -= count
    return (st[0] >> st[1]) & ((1 << count) - 1)


@njit(cache=True, nogil=True)
def _golomb_decode(src, st, k: int, limit: int, qbpp: int) -> int:
    high = 0
    while _get(src, st, 1) == 0:
        high += 1
        if high > limit:  # no valid code has this many leading zeros
            st[4] = ERR_CORRUPT
            return 0
    if high < limit - qbpp - 1:
        return (high << k) | (_get(src, st, k) if k else 0)
    if high != limit - qbpp - 1:
        st[4] = ERR_CORRUPT
        return 0
    return _get(src, st, qbpp) + 1


@njit(cache=True, nogil=True)
def _decode_regular(src, st, a, b, c, n, q, sign, px, rng, maxval, limit, qbpp, reset) -> int:
    px = px + c[q] if sign > 0 else px - c[q]
    if px > maxval:
        px = maxval
    elif px < 0:
        px = 0
    k = _k_for(n[q], a[q])
    merr = _golomb_decode(src, st, k, limit, qbpp)
    if k == 0 and 2 * b[q] <= -n[q]:
        errval = (merr - 1) >> 1 if merr & 1 else -(merr >> 1) - 1
    else:
        errval = merr >> 1 if (merr & 1) == 0 else -((merr + 1) >> 1)
    _update_regular(a, b, c, n, q, errval, reset)
    if sign < 0:
        errval = -errval
    value = px + errval
    if value < 0:
        value += rng
    elif value > maxval:
        value -= rng
    if value < 0 or value > maxval:
        st[4] = ERR_CORRUPT
        return 0
    return value


@njit(cache=True, nogil=True)
def _decode_ri(src, st, a, n, nn, ritype, runindex, limit, qbpp, reset) -> int:
    """Decode a run interruption error (before sign and modular reconstruction)."""
    q = 365 + ritype
    temp = a[q] + (n[q] >> 1) if ritype else a[q]
    k = _k_for(n[q], temp)
    emerr = _golomb_decode(src, st, k, limit - J[runindex] - 1, qbpp)
    # invert EMErrval = 2|E| - RItype - map: map is the parity of EMErrval + RItype, and
    # whether map = 1 means a positive or a negative error depends on k and Nn (A.7.2.2)
    tmp = emerr + ritype
    mapped = tmp & 1
    if k == 0 and 2 * nn[q] < n[q]:
        errval = (tmp + 1) >> 1 if mapped else -(tmp >> 1)
    else:
        errval = -((tmp + 1) >> 1) if mapped else tmp >> 1
    if errval < 0:
        nn[q] += 1
    a[q] += (emerr + 1 - ritype) >> 1
    if n[q] == reset:
        a[q] >>= 1
        n[q] >>= 1
        nn[q] >>= 1
    n[q] += 1
    return errval


@njit(cache=True, nogil=True)
def decode_scan(src, img, comps, ilv, maxval, t1, t2, t3, reset, st):
    rows, cols = img.shape[0], img.shape[1]
    nc = comps.shape[0]
    rng = maxval + 1
    qbpp = 1
    while (1 << qbpp) < rng:
        qbpp += 1
    bpp = max(2, qbpp)
    limit = 2 * (bpp + max(8, bpp))
    a = np.empty(N_CONTEXTS, np.int64)
    b = np.empty(N_CONTEXTS, np.int64)
    c = np.empty(N_CONTEXTS, np.int64)
    n = np.empty(N_CONTEXTS, np.int64)
    nn = np.empty(N_CONTEXTS, np.int64)
    init_contexts(a, b, c, n, nn, rng)
    prev = np.zeros((nc, cols + 2), np.int64)
    cur = np.zeros((nc, cols + 2), np.int64)
    runindex = np.zeros(nc, np.int64)
    for y in range(rows):
        for ci in range(nc):
            cur[ci, 0] = prev[ci, 1]
            prev[ci, cols + 1] = prev[ci, cols]
        if ilv == 2:
            _decode_line_interleaved(src, st, img, comps, y, prev, cur, a, b, c, n, nn, runindex,
                                     maxval, rng, t1, t2, t3, limit, qbpp, reset)
        else:
            for ci in range(nc):
                _decode_line(src, st, img, comps[ci], y, prev[ci], cur[ci], a, b, c, n, nn,
                             runindex, ci, maxval, rng, t1, t2, t3, limit, qbpp, reset)
        if st[4] != OK:
            return
        prev, cur = cur, prev
    if st[5] > st[1]:  # zero bits invented past the end of the data were used
        st[4] = ERR_TRUNCATED


@njit(cache=True, nogil=True)
def _decode_line(src, st, img, comp, y, prev, cur, a, b, c, n, nn, runindex, ri_slot,
                 maxval, rng, t1, t2, t3, limit, qbpp, reset):
    cols = img.shape[1]
    x = 0
    while x < cols:
        if st[4] != OK:
            return
        ra = cur[x]
        rb = prev[x + 1]
        rc = prev[x]
        rd = prev[x + 2]
        q1 = _quantize(rd - rb, t1, t2, t3)
        q2 = _quantize(rb - rc, t1, t2, t3)
        q3 = _quantize(rc - ra, t1, t2, t3)
        if q1 == 0 and q2 == 0 and q3 == 0:
            ri = runindex[ri_slot]
            interrupted = False
            while True:
                if _get(src, st, 1) == 1:
                    count = min(1 << J[ri], cols - x)
                    for i in range(count):
                        cur[x + 1 + i] = ra
                        img[y, x + i, comp] = ra
                    x += count
                    if count == (1 << J[ri]) and ri < 31:
                        ri += 1
                    if x == cols:
                        break
                    if st[5] > st[1] + 64:
                        st[4] = ERR_TRUNCATED
                        return
                else:
                    count = _get(src, st, J[ri]) if J[ri] else 0
                    if x + count >= cols:
                        st[4] = ERR_CORRUPT
                        return
                    for i in range(count):
                        cur[x + 1 + i] = ra
                        img[y, x + i, comp] = ra
                    x += count
                    interrupted = True
                    break
            if interrupted:
                rb = prev[x + 1]
                if ra == rb:
                    errval = _decode_ri(src, st, a, n, nn, 1, ri, limit, qbpp, reset)
                    value = ra + errval
                else:
                    errval = _decode_ri(src, st, a, n, nn, 0, ri, limit, qbpp, reset)
                    if ra > rb:
                        errval = -errval
                    value = rb + errval
                if value < 0:
                    value += rng
                elif value > maxval:
                    value -= rng
                if value < 0 or value > maxval:
                    st[4] = ERR_CORRUPT
                    return
                if ri > 0:
                    ri -= 1
                cur[x + 1] = value
                img[y, x, comp] = value
                x += 1
            runindex[ri_slot] = ri
            continue
        qs = (q1 * 9 + q2) * 9 + q3
        sign = 1
        if qs < 0:
            sign = -1
            qs = -qs
        value = _decode_regular(src, st, a, b, c, n, qs, sign, _predict(ra, rb, rc),
                                rng, maxval, limit, qbpp, reset)
        cur[x + 1] = value
        img[y, x, comp] = value
        x += 1


@njit(cache=True, nogil=True)
def _decode_line_interleaved(src, st, img, comps, y, prev, cur, a, b, c, n, nn, runindex,
                             maxval, rng, t1, t2, t3, limit, qbpp, reset):
    cols = img.shape[1]
    nc = comps.shape[0]
    qs_all = np.empty(nc, np.int64)
    x = 0
    while x < cols:
        if st[4] != OK:
            return
        all_zero = True
        for ci in range(nc):
            ra = cur[ci, x]
            rb = prev[ci, x + 1]
            rc = prev[ci, x]
            rd = prev[ci, x + 2]
            q = (_quantize(rd - rb, t1, t2, t3) * 9 + _quantize(rb - rc, t1, t2, t3)) * 9 \
                + _quantize(rc - ra, t1, t2, t3)
            qs_all[ci] = q
            if q != 0:
                all_zero = False
        if all_zero:
            ri = runindex[0]
            interrupted = False
            while True:
                if _get(src, st, 1) == 1:
                    count = min(1 << J[ri], cols - x)
                    for i in range(count):
                        for ci in range(nc):
                            cur[ci, x + 1 + i] = cur[ci, x]
                            img[y, x + i, comps[ci]] = cur[ci, x]
                    x += count
                    if count == (1 << J[ri]) and ri < 31:
                        ri += 1
                    if x == cols:
                        break
                    if st[5] > st[1] + 64:
                        st[4] = ERR_TRUNCATED
                        return
                else:
                    count = _get(src, st, J[ri]) if J[ri] else 0
                    if x + count >= cols:
                        st[4] = ERR_CORRUPT
                        return
                    for i in range(count):
                        for ci in range(nc):
                            cur[ci, x + 1 + i] = cur[ci, x]
                            img[y, x + i, comps[ci]] = cur[ci, x]
                    x += count
                    interrupted = True
                    break
            if interrupted:
                for ci in range(nc):
                    ra = cur[ci, x]
                    rb = prev[ci, x + 1]
                    errval = _decode_ri(src, st, a, n, nn, 0, ri, limit, qbpp, reset)
                    if rb < ra:
                        errval = -errval
                    value = rb + errval
                    if value < 0:
                        value += rng
                    elif value > maxval:
                        value -= rng
                    if value < 0 or value > maxval:
                        st[4] = ERR_CORRUPT
                        return
                    cur[ci, x + 1] = value
                    img[y, x, comps[ci]] = value
                if ri > 0:
                    ri -= 1
                x += 1
            runindex[0] = ri
            continue
        for ci in range(nc):
            qs = qs_all[ci]
            sign = 1
            if qs < 0:
                sign = -1
                qs = -qs
            px = _predict(cur[ci, x], prev[ci, x + 1], prev[ci, x])
            value = _decode_regular(src, st, a, b, c, n, qs, sign, px, rng, maxval, limit, qbpp, reset)
            cur[ci, x + 1] = value
            img[y, x, comps[ci]] = value
        x += 1
