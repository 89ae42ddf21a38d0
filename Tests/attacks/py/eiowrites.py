# For l5: partial writes, reads and whole-region writes on a live clone whose source fails reads
# at random; logs which writes succeeded (S) or failed (X) and which reads returned what.
import nbd, random, sys, hashlib
uri, logp, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
h = nbd.NBD(); h.connect_uri(uri); size = h.get_size(); R = 65536
src = open(sys.argv[4], "rb").read(); model = bytearray(src); unsure = set()
rnd = random.Random(7); log = open(logp, "w")
badreads = 0
for k in range(n):
    op = rnd.random()
    off = rnd.randrange(0, size // 4096) * 4096
    if op < 0.5:
        data = bytes([rnd.randrange(1, 256)]) * 4096
        try: h.pwrite(data, off); log.write(f"S {off} {data[0]}\n"); model[off:off+4096] = data; unsure.discard(off)
        except nbd.Error as e: log.write(f"X {off} {data[0]} {e.errnum}\n"); unsure.add(off)
    else:
        ln = rnd.choice([4096, 65536, 200000 // 4096 * 4096])
        ln = min(ln, size - off)
        try:
            d = h.pread(ln, off)
        except nbd.Error as e:
            log.write(f"RX {off} {ln} {e.errnum}\n"); continue
        log.write(f"R {off} {ln}\n")
        for b in range(off, off + ln, 4096):
            if b in unsure: continue
            if d[b-off:b-off+4096] != model[b:b+4096]:
                badreads += 1; print(f"WRONG READ block {b} region {b//R}", "zeros" if d[b-off:b-off+4096] == bytes(4096) else "", file=sys.stderr)
    if k % 50 == 0:
        try: h.flush()
        except nbd.Error as e: log.write(f"FX {e.errnum}\n")
h.flush()
print(f"done, {badreads} wrong reads", file=sys.stderr)
