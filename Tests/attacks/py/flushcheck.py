# Checker for l2: image file, source file, n, logs...: every write replied to before a FLUSH that
# replied must be there (or a later write by the same owner); prints violations.
import struct, sys
img, src, n = sys.argv[1], sys.argv[2], int(sys.argv[3]); logs = sys.argv[4:]
data = open(img, "rb").read(); srcd = open(src, "rb").read()
bad = 0; checked = 0
for i, lp in enumerate(logs):
    writes = {}; order = []; flushed = 0; acked = set()
    for line in open(lp):
        p = line.split()
        if p[0] == "W": writes[int(p[1])] = (int(p[2]), int(p[3])); order.append(int(p[1]))
        elif p[0] == "A": acked.add(int(p[1]))
        elif p[0] == "F": flushed = int(p[1])
    # per extent (off,len): list of seqs writing it, in order
    per = {}
    for s in order: per.setdefault(writes[s], []).append(s)
    for (off, ln), seqs in per.items():
        got = data[off:off+ln]
        hdr = got[:20]
        if hdr[:4] == b"TAG!":
            ci, gs, gb = struct.unpack("<IIQ", hdr[4:])
        else:
            ci, gs = None, None
        fl = [s for s in seqs if s <= flushed]
        checked += 1
        if fl:
            need = fl[-1]
            okset = [s for s in seqs if s >= need]
            if ci != i or gs not in okset:
                bad += 1
                if bad < 20: print(f"LOST conn {i} extent {off}+{ln}: flushed seq {need}, found {'tag conn %s seq %s'%(ci,gs) if ci is not None else ('source' if got==srcd[off:off+ln] else 'other bytes')}")
            else:
                # full-extent check: the whole extent must be that write's bytes
                exp = (struct.pack("<4sIIQ", b"TAG!", i, gs, off) * (ln // 20 + 1))[:ln]
                if got != exp:
                    bad += 1
                    if bad < 20: print(f"TORN conn {i} extent {off}+{ln} seq {gs}")
print(f"checked {checked} extents, {bad} bad")
sys.exit(1 if bad else 0)
