# Writer for l2: one connection; writes tagged 4 KiB blocks it owns (block % n == i in the first
# half; whole 64 KiB regions r % n == i in the second half), FLUSHes every few writes, and logs
# every write before it is sent and every flush after its reply (fsynced), until an error.
import nbd, os, random, struct, sys
uri, i, n, logp, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
h = nbd.NBD(); h.connect_uri(uri); size = h.get_size()
B, R = 4096, 65536
half = size // 2
rnd = random.Random(seed * 100 + i)
log = open(logp, "a", buffering=1)
def tag(kind, blk, seq, ln):
    return (struct.pack("<4sIIQ", b"TAG!", i, seq, blk) * (ln // 20 + 1))[:ln]
seq = 0
try:
    while True:
        for _ in range(rnd.randint(1, 6)):
            seq += 1
            if rnd.random() < 0.7:
                blk = rnd.randrange(0, half // B // n) * n + i; off = blk * B; ln = B
            else:
                reg = rnd.randrange(half // R, size // R)
                reg = reg - reg % n + i
                if reg * R >= size: continue
                off = reg * R; ln = R
            log.write(f"W {seq} {off} {ln}\n"); log.flush(); os.fsync(log.fileno())
            h.pwrite(tag(0, off, seq, ln), off, flags=(nbd.CMD_FLAG_FUA if rnd.random() < 0.05 else 0))
            log.write(f"A {seq}\n")
        log.write(f"F? {seq}\n")
        h.flush()
        log.write(f"F {seq}\n"); log.flush(); os.fsync(log.fileno())
except Exception as e:
    log.write(f"E {seq} {e}\n"); log.flush()
    print(f"conn {i}: stopped at seq {seq}: {e}", file=sys.stderr)
