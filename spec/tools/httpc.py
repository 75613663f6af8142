#!/usr/bin/python3
"""spec/tools/httpc.py -- HTTP clients for spec/http_spec.lua (standard library only).

  httpc.py raw PORT TEXT [SECONDS]     sends TEXT (Python escapes like \\r\\n allowed) to
                                       127.0.0.1:PORT, prints what comes back until the
                                       server closes or SECONDS (default 2) pass
  httpc.py trickle PORT SECONDS        sends a request head a byte every 50 ms; prints
                                       "closed after S" or "still open after S"
  httpc.py load PORT CONNS REQS SEED   CONNS connections at once, each sending REQS
                                       requests for /echo/<conn>/<i>, some pipelined
                                       in bursts of up to 4; checks every answer is
                                       200 with the body "echo /echo/<conn>/<i>", in
                                       order; prints {"ok": n, "bad": [...]} as JSON
  httpc.py pipeline PORT N PAUSE       sends N pipelined GET / without reading for PAUSE
                                       seconds, then reads; prints how many complete 200
                                       answers came back
  httpc.py leave PORT CONNS REQS       CONNS times: sends REQS pipelined GET / and closes
                                       at once, reading nothing
  httpc.py halfclose PORT              sends GET / then shuts its sending side (FIN), waits
                                       0.5 s, reads; prints "head N body M" (M: bytes
                                       after the head, N: its Content-Length)
  httpc.py hoard PORT N SECONDS        opens N connections that send nothing, holds them
                                       SECONDS, then prints "open K": how many the server
                                       had not closed
  httpc.py slowread PORT RATE          sends GET / with a small receive buffer, then reads
                                       at about RATE bytes a second until the server
                                       closes; prints "head N body M" as halfclose
  httpc.py bodies PORT SIZE            two connections each send a POST of SIZE bytes but
                                       the last 100, and hold it; then a third sends one
                                       whole; then the first finishes, then a fourth sends
                                       one whole; prints the four status lines, in that
                                       order (the third's before the first's)
"""
import json
import random
import socket
import sys
import threading
import time


def read_response(f):
    status = f.readline()
    if not status:
        raise EOFError("connection closed")
    length = 0
    while True:
        line = f.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.decode().partition(":")
        if name.lower() == "content-length":
            length = int(value)
    return status.decode().strip(), f.read(length).decode()


def raw(port, text, seconds):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(text.encode().decode("unicode_escape").encode("latin-1"))
    s.settimeout(seconds)
    out = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    except socket.timeout:
        out += b"\n[timeout]"
    sys.stdout.write(out.decode("latin-1"))


def load(port, conns, reqs, seed):
    result = {"ok": 0, "bad": []}
    lock = threading.Lock()

    def one(c):
        rng = random.Random(seed * 1000 + c)
        try:
            s = socket.create_connection(("127.0.0.1", port))
            f = s.makefile("rb")
            i = 0
            while i < reqs:
                burst = min(rng.randint(1, 4), reqs - i)
                paths = ["/echo/%d/%d" % (c, i + k) for k in range(burst)]
                s.sendall(b"".join(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % p.encode() for p in paths))
                for p in paths:
                    status, body = read_response(f)
                    with lock:
                        if status.startswith("HTTP/1.1 200") and body == "echo " + p:
                            result["ok"] += 1
                        else:
                            result["bad"].append([p, status, body])
                i += burst
            s.close()
        except Exception as e:
            with lock:
                result["bad"].append(["connection %d" % c, type(e).__name__, str(e)])

    threads = [threading.Thread(target=one, args=(c,)) for c in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    print(json.dumps(result))


def trickle(port, seconds):
    """Sends a request head one byte every 50 ms; prints how long until the server closed."""
    s = socket.create_connection(("127.0.0.1", port))
    t = time.time()
    try:
        s.sendall(b"GET / HTTP/1.1\r\nX-Slow: ")
        while time.time() - t < seconds:
            s.sendall(b"x")
            time.sleep(0.05)
        print("still open after %.1f" % (time.time() - t))
    except OSError:
        print("closed after %.1f" % (time.time() - t))


def pipeline(port, n, pause):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)   # (before connect: the window it announces)
    s.connect(("127.0.0.1", port))
    req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    sender = threading.Thread(target=lambda: s.sendall(req * n))
    sender.start()
    time.sleep(pause)
    s.settimeout(10)
    f = s.makefile("rb")
    got = 0
    try:
        for _ in range(n):
            status, body = read_response(f)
            if status.startswith("HTTP/1.1 200"):
                got += 1
    except Exception as e:
        print("error after %d: %s" % (got, e))
    sender.join(10)
    print("answers %d" % got)


def leave(port, conns, reqs):
    for _ in range(conns):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * reqs)
        s.close()


def print_answer(out):
    head, _, body = out.partition(b"\r\n\r\n")
    length = -1
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.decode().partition(":")
        if name.lower() == "content-length":
            length = int(value)
    print("head %d body %d" % (length, len(body)))


def hoard(port, n, seconds):
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
    time.sleep(seconds)
    open_ = 0
    for s in socks:
        s.setblocking(False)
        try:
            open_ += 1 if s.recv(1) else 0      # (b"": closed by the server)
        except BlockingIOError:
            open_ += 1
        except OSError:
            pass
    print("open %d" % open_)


def slowread(port, rate):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    s.connect(("127.0.0.1", port))
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    s.settimeout(10)
    out, step, t0 = b"", 8192, time.time()
    while True:
        chunk = s.recv(step)
        if not chunk:
            break
        out += chunk
        ahead = len(out) / rate - (time.time() - t0)
        if ahead > 0:
            time.sleep(ahead)
    print_answer(out)


def halfclose(port):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    s.shutdown(socket.SHUT_WR)
    time.sleep(0.5)
    s.settimeout(10)
    out = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        out += chunk
    print_answer(out)


def bodies(port, size):
    head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size
    body = b"y" * size

    def status_of(s):
        s.settimeout(10)
        f = s.makefile("rb")
        try:
            return read_response(f)[0]
        except (EOFError, OSError) as e:
            return "closed: %s" % e

    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
    for s in held:
        s.sendall(head + body[:-100])
    time.sleep(0.3)                              # (the server has read them)
    third = socket.create_connection(("127.0.0.1", port))
    third.sendall(head + body)
    out = [status_of(third)]
    held[0].sendall(body[-100:])
    out.insert(0, status_of(held[0]))
    fourth = socket.create_connection(("127.0.0.1", port))
    fourth.sendall(head + body)
    out.append(status_of(fourth))
    held[1].sendall(body[-100:])
    out.insert(1, status_of(held[1]))
    print("\n".join(out))


if __name__ == "__main__":
    if sys.argv[1] == "trickle":
        trickle(int(sys.argv[2]), float(sys.argv[3]))
    elif sys.argv[1] == "pipeline":
        pipeline(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
    elif sys.argv[1] == "leave":
        leave(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    elif sys.argv[1] == "hoard":
        hoard(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
    elif sys.argv[1] == "slowread":
        slowread(int(sys.argv[2]), float(sys.argv[3]))
    elif sys.argv[1] == "halfclose":
        halfclose(int(sys.argv[2]))
    elif sys.argv[1] == "bodies":
        bodies(int(sys.argv[2]), int(sys.argv[3]))
    elif sys.argv[1] == "raw":
        raw(int(sys.argv[2]), sys.argv[3], float(sys.argv[4]) if len(sys.argv) > 4 else 2)
    else:
        load(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
