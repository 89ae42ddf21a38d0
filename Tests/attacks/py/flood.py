# A root client that negotiates GO on export NAME, then sends COUNT requests (READ of LEN bytes, or
# WRITE of LEN bytes) and never reads a reply; stays connected until killed.
import socket, struct, sys, time, os
sock, name, kind, count, ln = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
s = socket.socket(socket.AF_UNIX); s.connect(sock); s.recv(18)
s.sendall(struct.pack(">I", 1))
nm = name.encode()
s.sendall(struct.pack(">QII", 0x49484156454F5054, 7, 4 + len(nm) + 2) + struct.pack(">I", len(nm)) + nm + struct.pack(">H", 0))
buf = b""
while True:
    buf += s.recv(65536)
    # parse option replies until ACK (type 1)
    ok = False; p = 0
    while len(buf) - p >= 20:
        magic, opt, typ, l = struct.unpack(">QIII", buf[p:p+20])
        if len(buf) - p < 20 + l: break
        p += 20 + l
        if typ == 1: ok = True
        elif typ & 0x80000000: print("refused", typ, file=sys.stderr); sys.exit(1)
    if ok: break
size = None
s.setblocking(True)
payload = os.urandom(ln) if kind == "write" else b""
sent = 0
t0 = time.time()
for i in range(count):
    cmd = 1 if kind == "write" else 0
    off = (i * ln) % (1 << 24)
    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, cmd, i, off, ln) + payload)
    sent += 1
    if i % 1000 == 0: print(f"sent {sent} in {time.time()-t0:.1f}s", file=sys.stderr, flush=True)
print(f"all {sent} sent", file=sys.stderr, flush=True)
time.sleep(3600)
