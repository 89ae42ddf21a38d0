# plserver.py BACKING SOCKET SEED : NBD server whose writes are volatile until FLUSH/FUA.
# SIGUSR1 = power cut: persist a random subset of unflushed writes (in order), then exit at once.
import os, sys, socket, struct, signal, random, threading
backing, path, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
rnd = random.Random(seed)
fd = os.open(backing, os.O_RDWR); size = os.fstat(fd).st_size
pending = []  # list of (off, bytes)
lock = threading.Lock()
stats = {'w':0,'f':0}
def commit():
    global pending
    for off, data in pending: os.pwrite(fd, data, off)
    pending = []
def powercut(sig, frm):
    with lock:
        kept = 0
        for off, data in pending:
            if rnd.random() < 0.5: os.pwrite(fd, data, off); kept += 1
        sys.stderr.write("POWER CUT: %d unflushed writes, %d persisted; writes %d flushes %d\n" % (len(pending), kept, stats['w'], stats['f'])); sys.stderr.flush()
        os._exit(0)
signal.signal(signal.SIGUSR1, powercut)
def rd(c, n):
    b = bytearray()
    while len(b) < n:
        x = c.recv(n - len(b))
        if not x: raise EOFError
        b += x
    return bytes(b)
def read_range(off, ln):
    buf = bytearray(os.pread(fd, ln, off)); buf += bytes(ln - len(buf))
    for o, d in pending:
        lo, hi = max(o, off), min(o+len(d), off+ln)
        if lo < hi: buf[lo-off:hi-off] = d[lo-o:hi-o]
    return bytes(buf)
TFLAGS = 1 | 4 | 8
def serve(c):
    c.sendall(b'NBDMAGIC' + b'IHAVEOPT' + struct.pack('>H', 3))
    cflags = struct.unpack('>I', rd(c, 4))[0]
    while True:
        magic, opt, ln = struct.unpack('>QII', rd(c, 16)); data = rd(c, ln)
        if opt == 1:
            c.sendall(struct.pack('>QH', size, TFLAGS) + (b'' if cflags & 2 else bytes(124))); break
        elif opt in (6, 7):
            c.sendall(struct.pack('>QIII', 0x3e889045565a9, opt, 3, 12) + struct.pack('>HQH', 0, size, TFLAGS))
            c.sendall(struct.pack('>QIII', 0x3e889045565a9, opt, 1, 0))
            if opt == 7: break
        elif opt == 2:
            c.sendall(struct.pack('>QIII', 0x3e889045565a9, opt, 1, 0)); return
        else:
            c.sendall(struct.pack('>QIII', 0x3e889045565a9, opt, (1<<31)+1, 0))
    while True:
        magic, flags, typ, handle, off, ln = struct.unpack('>IHHQQI', rd(c, 28))
        if typ == 0:
            with lock: d = read_range(off, ln)
            c.sendall(struct.pack('>IIQ', 0x67446698, 0, handle) + d)
        elif typ == 1:
            d = rd(c, ln)
            with lock:
                pending.append((off, d)); stats['w'] += 1
                if flags & 1: commit(); stats['f'] += 1
            c.sendall(struct.pack('>IIQ', 0x67446698, 0, handle))
        elif typ == 3:
            with lock: commit(); stats['f'] += 1
            c.sendall(struct.pack('>IIQ', 0x67446698, 0, handle))
        elif typ == 2:
            return
        else:
            c.sendall(struct.pack('>IIQ', 0x67446698, 22, handle))
try: os.unlink(path)
except FileNotFoundError: pass
s = socket.socket(socket.AF_UNIX); s.bind(path); s.listen(4)
while True:
    c, _ = s.accept()
    threading.Thread(target=lambda: (serve(c) if True else None), daemon=True).start()
