"""BLOCK_STATUS flood: N connections to export bs, both contexts, 256 requests of 256 MiB each,
replies never read. Prints 'flooding' once every request is sent, then holds the connections."""
import socket, struct, sys, time


def opt(s, code, data=b""):
    s.sendall(struct.pack(">QII", 0x49484156454F5054, code, len(data)) + data)


def replies(s):
    while True:
        h = s.recv(20, socket.MSG_WAITALL)
        _, _, t, n = struct.unpack(">QIII", h)
        if n:
            s.recv(n, socket.MSG_WAITALL)
        if t == 1 or t & 0x80000000:
            return t


conns = []
for c in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    s.recv(18, socket.MSG_WAITALL)
    s.sendall(b"\0\0\0\3")
    opt(s, 8)
    replies(s)
    q = [b"base:allocation", b"x-hydrationd:state"]
    data = struct.pack(">I", 2) + b"bs" + struct.pack(">I", len(q)) + b"".join(struct.pack(">I", len(x)) + x for x in q)
    opt(s, 10, data)
    replies(s)
    opt(s, 7, struct.pack(">I", 2) + b"bs" + struct.pack(">H", 0))
    replies(s)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.setblocking(False)
    sent = 0
    reqs = b"".join(struct.pack(">IHHQQI", 0x25609513, 0, 7, i, 0, 256 << 20) for i in range(256))
    # The server stops reading once its budget is held: send what it takes, do not block on it.
    deadline = time.time() + 10
    while sent < len(reqs) and time.time() < deadline:
        try:
            sent += s.send(reqs[sent:])
        except BlockingIOError:
            time.sleep(0.05)
    conns.append(s)
print("flooding", flush=True)
time.sleep(600)
