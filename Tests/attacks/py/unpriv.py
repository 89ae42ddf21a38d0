# Run as an unprivileged uid against the NBD socket: every way in to export NAME.
import nbd, socket, struct, sys
sock, name = sys.argv[1], sys.argv[2]
uri = f"nbd+unix:///{name}?socket={sock}"
def t(label, f):
    try: print(f"{label}: ALLOWED -> {f()!r}")
    except Exception as e: print(f"{label}: refused ({str(e)[:120]})")
def lst():
    h = nbd.NBD(); h.set_opt_mode(True); h.connect_uri(f"nbd+unix:///?socket={sock}")
    out = []; h.opt_list(lambda n, d: out.append(n) or 0); h.opt_abort(); return out
t("OPT_LIST", lst)
def info():
    h = nbd.NBD(); h.set_opt_mode(True); h.connect_uri(uri); h.opt_info(); return h.get_size()
t("OPT_INFO", info)
def lmc():
    h = nbd.NBD(); h.set_opt_mode(True); h.connect_uri(uri); out = []
    h.opt_list_meta_context(lambda n: out.append(n) or 0); return out
t("OPT_LIST_META_CONTEXT", lmc)
def go():
    h = nbd.NBD(); h.connect_uri(uri); return h.pread(4096, 0)[:16]
t("OPT_GO + READ", go)
def empty():
    h = nbd.NBD(); h.connect_uri(f"nbd+unix:///?socket={sock}"); return h.get_size()
t("GO default export ''", empty)
# raw EXPORT_NAME, then a raw READ regardless
def raw_exportname():
    s = socket.socket(socket.AF_UNIX); s.connect(sock)
    g = s.recv(18); assert g[:8] == b"NBDMAGIC"
    s.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE|NO_ZEROES
    nm = name.encode(); s.sendall(struct.pack(">QII", 0x49484156454F5054, 1, len(nm)) + nm)
    r = s.recv(10)
    if len(r) < 10: raise Exception(f"closed after EXPORT_NAME ({len(r)} bytes)")
    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, 1, 0, 4096))
    d = s.recv(4096 + 16); return (r, len(d))
t("raw EXPORT_NAME", raw_exportname)
# raw: skip the handshake entirely, send a request at once
def raw_noneg():
    s = socket.socket(socket.AF_UNIX); s.connect(sock); s.recv(18)
    s.sendall(struct.pack(">I", 3) + struct.pack(">IHHQQI", 0x25609513, 0, 0, 1, 0, 4096))
    s.settimeout(3); d = s.recv(100)
    if not d: raise Exception("closed")
    return d[:32]
t("raw request without options", raw_noneg)
