#!/usr/bin/env python3
"""Stand-in for clonectl (planned CLI), talking to fake_hydrationd.py. Test harness only."""
import argparse
import json
import socket
import sys


def main():
    ap = argparse.ArgumentParser(prog="clonectl")
    ap.add_argument("--socket", required=True)
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("start")
    st.add_argument("name")
    st.add_argument("--source", required=True)
    st.add_argument("--dest", required=True)
    st.add_argument("--discard-source", action="store_true")
    st.add_argument("--rate-limit")
    ss = sub.add_parser("status")
    ss.add_argument("name")
    ss.add_argument("--json", action="store_true")
    args = ap.parse_args()

    if args.cmd == "start":
        req = {"method": "start", "name": args.name, "source": args.source, "dest": args.dest,
               "discard_source": args.discard_source, "rate_limit": args.rate_limit}
    else:
        req = {"method": "status", "name": args.name}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(args.socket)
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    reply = json.loads(buf)
    if "error" in reply:
        print(f"clonectl: {reply['error']}", file=sys.stderr)
        return 1
    st = reply["status"]
    if args.cmd == "status" and args.json:
        print(json.dumps(st))
    else:
        print(f"{st['name']}: {st['state']} {st['regions']['hydrated']}/{st['regions']['total']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
