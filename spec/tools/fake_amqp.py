#!/usr/bin/env python3
"""spec/tools/fake_amqp.py -- a hostile AMQP 0-9-1 "broker" for spec/review_amqp_spec.lua.

    python3 spec/tools/fake_amqp.py MODE PORTFILE

Listens on 127.0.0.1 (a free port, written to PORTFILE once it listens),
takes one client, plays the handshake, channel.open, basic.qos and
basic.consume as RabbitMQ would, then sends what MODE says: frames a real
broker never sends, to check that the client fails the connection with a
reason instead of crashing.  Exits when the client goes (or after 20 s).

MODE slow:MS is a slow but honest broker instead: it takes any number of
clients, each on a thread of its own, waits MS ms before it answers the
protocol header, then plays the login and opens channels when asked, until
the client goes; it exits after 20 s (or when killed).
"""
import signal
import socket
import struct
import time
import sys

signal.alarm(20)
MODE, PORTFILE = sys.argv[1], sys.argv[2]
FRAME_MAX = 131072


def shortstr(s):
    return struct.pack(">B", len(s)) + s


def longstr(s):
    return struct.pack(">I", len(s)) + s


def frame(ftype, ch, payload):
    return struct.pack(">BHI", ftype, ch, len(payload)) + payload + b"\xce"


def method(ch, cls, mid, args=b""):
    return frame(1, ch, struct.pack(">HH", cls, mid) + args)


def header(ch, cls, size, flags, props=b""):
    return frame(2, ch, struct.pack(">HHQH", cls, 0, size, flags) + props)


def body(ch, data):
    return frame(3, ch, data)


def deliver(ch, tag):
    return method(ch, 60, 60, shortstr(b"ctag") + struct.pack(">QB", tag, 0) + shortstr(b"") + shortstr(b"q"))


class Conn:
    def __init__(self, sock):
        self.s = sock
        self.buf = b""

    def read(self, n):
        while len(self.buf) < n:
            more = self.s.recv(65536)
            if not more:
                raise EOFError
            self.buf += more
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def frame(self):
        """The next frame from the client: (type, channel, class, method) for methods."""
        ftype, ch, size = struct.unpack(">BHI", self.read(7))
        payload = self.read(size)
        self.read(1)
        if ftype == 1:
            cls, mid = struct.unpack(">HH", payload[:4])
            return ftype, ch, cls, mid
        return ftype, ch, None, None

    def expect(self, cls, mid):
        """Reads frames until method cls.mid comes (heartbeats and acks are skipped)."""
        while True:
            ftype, ch, c, m = self.frame()
            if (c, m) == (cls, mid):
                return ch

    def send(self, data):
        self.s.sendall(data)


def login(c, delay_ms=0):
    """The protocol header read, then (after delay_ms) start, tune and open answered."""
    assert c.read(8) == b"AMQP\x00\x00\x09\x01"
    if delay_ms:
        time.sleep(delay_ms / 1000.0)
    c.send(method(0, 10, 10, b"\x00\x09" + struct.pack(">I", 0) + longstr(b"PLAIN") + longstr(b"en_US")))
    c.expect(10, 11)                                              # start-ok
    c.send(method(0, 10, 30, struct.pack(">HIH", 2047, FRAME_MAX, 0)))
    c.expect(10, 31)                                              # tune-ok
    c.expect(10, 40)                                              # open
    c.send(method(0, 10, 41, shortstr(b"")))


def handshake(c):
    login(c)
    ch = c.expect(20, 10)                                         # channel.open
    c.send(method(ch, 20, 11, longstr(b"")))
    c.expect(60, 10)                                              # basic.qos
    c.send(method(ch, 60, 11))
    c.expect(60, 20)                                              # basic.consume
    c.send(method(ch, 60, 21, shortstr(b"ctag")))
    return ch


def nested_table(depth):
    """A field table nested `depth` levels: { a = { a = { ... } } }."""
    inner = b""
    for _ in range(depth):
        entry = shortstr(b"a") + b"F" + struct.pack(">I", len(inner)) + inner
        inner = entry
    return struct.pack(">I", len(inner)) + inner


def attack(c, ch):
    if MODE == "class_header":
        # A first, well-formed message whose content_type fills the channel's
        # memory with words of 16; then a message whose content header names
        # class 10 (connection) with every basic property's flag set: the
        # decoder gives an 8-byte struct for it, and a client that reads it
        # as basic properties reads those words as lengths and pointers.
        word = struct.pack("<Q", 16)
        ctype = (b"\x00" * 10 + word * 32)[:255]
        c.send(deliver(ch, 1) + header(ch, 60, 2, 0x8000, shortstr(ctype)) + body(ch, b"ok"))
        c.expect(60, 80)                                          # its ack
        c.send(deliver(ch, 2) + header(ch, 10, 2, 0xfff8) + body(ch, b"no"))
    elif MODE == "body_overrun":
        c.send(deliver(ch, 1) + header(ch, 60, 5, 0) + body(ch, b"0123456789"))
    elif MODE == "stray_header":
        c.send(header(ch, 60, 5, 0) + body(ch, b"01234"))
    elif MODE == "stray_body":
        c.send(body(ch, b"01234"))
    elif MODE == "huge_frame":
        c.send(struct.pack(">BHI", 3, ch, 0x7ffffff0) + b"x" * 64)
    elif MODE == "bad_frame_end":
        c.send(deliver(ch, 1)[:-1] + b"\x00")
    elif MODE == "unknown_frame_type":                             # skipped, as rabbitmq-c does
        c.send(frame(9, ch, b"abc") + deliver(ch, 1) + header(ch, 60, 2, 0) + body(ch, b"ok"))
    elif MODE == "deep_headers":
        props = nested_table(4000)
        c.send(deliver(ch, 1) + header(ch, 60, 2, 0x2000, props) + body(ch, b"ok"))
    elif MODE == "channel_65535":
        c.send(deliver(65535, 1) + header(65535, 60, 2, 0) + body(65535, b"no")
               + deliver(ch, 1) + header(ch, 60, 2, 0) + body(ch, b"ok"))
    elif MODE == "huge_body_size":                                # more than TIDE_AMQP_BODY_MAX
        c.send(deliver(ch, 1) + header(ch, 60, 600 << 20, 0) + body(ch, b"x" * 100))
    elif MODE == "truncated_method":                              # a deliver whose routing key runs past its frame
        c.send(method(ch, 60, 60, shortstr(b"ctag") + struct.pack(">QB", 1, 0) + shortstr(b"") + b"\x40q"))
    elif MODE == "interleaved":
        # A message on a channel the client never opened begins, a message
        # on the consuming channel comes whole in the middle, then the first
        # one ends in two body frames and a heartbeat between them.
        c.send(deliver(7, 1) + header(7, 60, 6, 0x8000, shortstr(b"text/plain"))
               + deliver(ch, 1) + header(ch, 60, 2, 0) + body(ch, b"ok")
               + body(7, b"abc") + frame(8, 0, b"") + body(7, b"def")
               + deliver(ch, 2) + header(ch, 60, 3, 0) + body(ch, b"ok2"))
    elif MODE.startswith("random:"):                               # random:SEED: frames of random shapes
        import random
        rnd = random.Random(int(MODE.split(":")[1]))
        methods = [(60, 60), (60, 80), (60, 120), (20, 40), (20, 41), (60, 30), (10, 60), (60, 71), (85, 11)]
        out = b""
        for _ in range(rnd.randint(1, 30)):
            kind = rnd.choice(["deliver", "method", "header", "body", "garbage", "heartbeat"])
            fch = rnd.choice([0, ch, ch, ch, 2, 65535])
            if kind == "deliver":
                out += deliver(fch, rnd.randint(0, 5)) + header(fch, 60, 3, rnd.choice([0, 0x8000, 0x2000, 0xfffc]),
                        bytes(rnd.getrandbits(8) for _ in range(rnd.randint(0, 40)))) + body(fch, b"abc")
            elif kind == "method":
                cls, mid = rnd.choice(methods)
                out += method(fch, cls, mid, bytes(rnd.getrandbits(8) for _ in range(rnd.randint(0, 40))))
            elif kind == "header":
                out += header(fch, rnd.choice([60, 60, 10, 90]), rnd.randint(0, 10), rnd.getrandbits(16),
                              bytes(rnd.getrandbits(8) for _ in range(rnd.randint(0, 40))))
            elif kind == "body":
                out += body(fch, bytes(rnd.getrandbits(8) for _ in range(rnd.randint(0, 20))))
            elif kind == "heartbeat":
                out += frame(8, 0, b"")
            else:
                out += bytes(rnd.getrandbits(8) for _ in range(rnd.randint(1, 30)))
        c.send(out)
    elif MODE == "silent":
        # One delivery, then nothing at all: no heartbeat, no reading (a
        # broker stopped with SIGSTOP, a network that drops everything).
        c.send(deliver(ch, 1) + header(ch, 60, 2, 0) + body(ch, b"ok"))
        import time
        time.sleep(15)
        raise EOFError
    else:
        raise SystemExit("unknown mode " + MODE)


def slow_client(s, delay_ms):
    """A login answered after delay_ms, then channel.open and close answered, until the client goes."""
    c = Conn(s)
    try:
        login(c, delay_ms)
        while True:
            ftype, fch, cls, mid = c.frame()
            if (cls, mid) == (20, 10):
                c.send(method(fch, 20, 11, longstr(b"")))
            elif (cls, mid) == (10, 50):
                c.send(method(0, 10, 51))
    except (EOFError, ConnectionError, AssertionError):
        pass
    finally:
        s.close()


def main():
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    with open(PORTFILE + ".tmp", "w") as f:
        f.write(str(ls.getsockname()[1]))
    import os
    os.rename(PORTFILE + ".tmp", PORTFILE)
    if MODE.startswith("slow:"):
        import threading
        delay_ms = int(MODE.split(":")[1])
        while True:
            s, _ = ls.accept()
            threading.Thread(target=slow_client, args=(s, delay_ms), daemon=True).start()
    s, _ = ls.accept()
    c = Conn(s)
    try:
        ch = handshake(c)
        attack(c, ch)
        while True:                                               # until the client goes
            ftype, fch, cls, mid = c.frame()
            if (cls, mid) == (20, 40):
                c.send(method(fch, 20, 41))
            elif (cls, mid) == (10, 50):
                c.send(method(0, 10, 51))
    except (EOFError, ConnectionError):
        pass


main()
