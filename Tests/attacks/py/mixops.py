# For l9: connection i of n owns regions r % n == i; random WRITE (partial / whole / spanning two
# owned... no: within owned regions), TRIM (whole or unaligned), WRITE_ZEROES (+NO_HOLE, +FAST_ZERO),
# CACHE, READ checked against a model (bytes trimmed are "unknown" until written), FLUSH.
import nbd, random, sys
uri, i, n, srcp, ops = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
R = 65536
h = nbd.NBD(); h.connect_uri(uri); size = h.get_size()
model = bytearray(open(srcp, "rb").read()); unknown = bytearray(size // 4096)
rnd = random.Random(1000 + i); bad = 0; errs = {}
nreg = size // R
def pick():
    r = rnd.randrange(0, nreg // n) * n + i
    return r * R
for k in range(ops):
    base = pick(); op = rnd.random()
    try:
        if op < 0.3:
            off = base + rnd.randrange(0, 16) * 4096; ln = rnd.choice([4096, 8192, R - (off - base)])
            ln = min(ln, base + R - off); d = bytes([rnd.randrange(1, 256)]) * ln
            h.pwrite(d, off); model[off:off+ln] = d
            for b in range(off // 4096, (off + ln) // 4096): unknown[b] = 0
        elif op < 0.45:
            off = base + rnd.choice([0, 0, 4096]); ln = rnd.choice([R, R - 4096, 4096])
            ln = min(ln, base + R - off)
            h.trim(ln, off)
            if off == base and ln == R:
                for b in range(off // 4096, (off + ln) // 4096): unknown[b] = 1
        elif op < 0.6:
            off = base + rnd.choice([0, 0, 8192]); ln = min(rnd.choice([R, 4096 * 3]), base + R - off)
            fl = rnd.choice([0, nbd.CMD_FLAG_NO_HOLE, nbd.CMD_FLAG_FAST_ZERO])
            try:
                h.zero(ln, off, flags=fl)
                model[off:off+ln] = bytes(ln)
                for b in range(off // 4096, (off + ln) // 4096): unknown[b] = 0
            except nbd.Error as e:
                if fl == nbd.CMD_FLAG_FAST_ZERO and e.errnum == 95: errs["fastzero-ENOTSUP"] = errs.get("fastzero-ENOTSUP", 0) + 1
                else: raise
        elif op < 0.65:
            h.cache(R, base)
        elif op < 0.95:
            off = base + rnd.randrange(0, 16) * 4096; ln = base + R - off
            d = h.pread(ln, off)
            for b in range(off // 4096, (off + ln) // 4096):
                if unknown[b]: continue
                if d[b*4096-off:(b+1)*4096-off] != model[b*4096:(b+1)*4096]:
                    bad += 1
                    if bad < 10: print(f"conn {i}: WRONG READ block {b} region {b*4096//R}: {'zeros' if d[b*4096-off:(b+1)*4096-off]==bytes(4096) else 'other'}", file=sys.stderr)
        else:
            h.flush()
    except nbd.Error as e:
        errs[str(e)[:80]] = errs.get(str(e)[:80], 0) + 1
h.flush()
open(f"{sys.argv[6]}.{i}", "wb").write(bytes(model)); open(f"{sys.argv[6]}.{i}.unk", "wb").write(bytes(unknown))
print(f"conn {i}: {bad} wrong reads, errors {errs}", file=sys.stderr)
