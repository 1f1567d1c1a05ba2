#!/usr/bin/env python3
"""A hostile NBD server for tests/nbd.rs: an attacker, not a mock.

It performs a correct fixed-newstyle handshake (NBD_OPT_GO / NBD_OPT_INFO
with the export's size, flags and block sizes; structured replies accepted
or refused as --structured says) and serves a memory export correctly,
except for READs at or past --trigger: the first --times of them (0: all)
get the misbehaviour --mode names, on whichever connection they arrive.
Later READs, writes and flushes are served correctly, so a client that
reconnects and sends the read again gets the right data.

Modes:
  good          no misbehaviour (the control: the harness itself works)
  wrong-cookie  the reply carries another cookie than the request's, and the
                request itself is never answered on this connection
  short         the reply header and half of the data, then the connection
                is closed
  overlong      a structured OFFSET_DATA chunk longer than the request (one
                extra 4 KiB block); without structured replies, a simple
                reply followed by 4 KiB more data than asked for
  huge          a structured chunk whose length field says 4 GiB - 16 (or,
                without structured replies, as for overlong but with 1 MiB
                of trailing garbage); the connection then stays open
  bad-errno     an error reply with an error number no NBD spec defines
  unsolicited   first a reply to a cookie never sent, then the right reply
  unasked-structured
                a structured OFFSET_DATA chunk with the right data, to a
                client that did not negotiate structured replies
  silent        no reply at all; the connection stays open and later
                requests are answered

--handshake MODE breaks the handshake instead, on every connection (or,
with --handshake-while FILE, only while FILE exists, so that a test can let
a reconnect meet it and then end it):
  bad-magic     the greeting starts with another magic than NBDMAGIC
  close         the greeting, then the connection is closed
  garbage       the reply to the first option has a wrong magic
  huge-reply    an option reply announcing 4 GiB - 1 of payload, then none
  huge-size     the export's size is 2^63 + 512 bytes
  odd-size      the export's size is not a multiple of 512 (16 MiB + 100)
  bad-block     block-size constraints that break the spec (minimum 3)
  block-4k      a minimum block size of 4 KiB (where the export had 1)
  big-block     a minimum block size of 64 KiB (valid, but above any
                sector size a disk can have)
  silent        the greeting, then nothing (the connection stays open)

--file PATH keeps the export in that file (created at --size if missing)
instead of memory, so that its data outlives a restart of the server.

Every event is appended to --log, one line each: "connect N",
"misbehave MODE N", "structured asked" (the client sent
NBD_OPT_STRUCTURED_REPLY), so that the test can see the reconnect and what
the client and the server did. Runs until killed.
"""

import argparse
import mmap
import os
import socket
import socketserver
import struct
import sys
import threading

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8

REP_ACK = 1
REP_INFO = 3
REP_ERR_UNSUP = 0x80000001

INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3

FLAG_HAS_FLAGS = 1 << 0
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_CAN_MULTI_CONN = 1 << 8

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM = 0, 1, 2, 3, 4

REPLY_FLAG_DONE = 1
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_ERROR = 0x8001

EINVAL = 22


class State:
    def __init__(self, args):
        self.args = args
        if args.file:
            fd = os.open(args.file, os.O_RDWR | os.O_CREAT, 0o600)
            if os.fstat(fd).st_size < args.size:
                os.ftruncate(fd, args.size)
            self.data = mmap.mmap(fd, args.size)
            os.close(fd)
        else:
            self.data = bytearray(args.size)
        self.lock = threading.Lock()
        self.connections = 0
        self.misbehaved = 0
        self.log = open(args.log, "a", buffering=1)

    def note(self, line):
        with self.lock:
            self.log.write(line + "\n")

    def handshake_breaks(self, n):
        """Whether connection n's handshake gets the --handshake mode."""
        a = self.args
        if not a.handshake:
            return False
        if a.handshake_while and not os.path.exists(a.handshake_while):
            return False
        self.note(f"handshake-misbehave {a.handshake} {n}")
        return True

    def misbehave_now(self):
        """Whether this trigger read gets the misbehaviour (counts it)."""
        with self.lock:
            a = self.args
            if a.mode == "good":
                return False
            if a.times and self.misbehaved >= a.times:
                return False
            self.misbehaved += 1
            self.log.write(f"misbehave {a.mode} {self.misbehaved}\n")
            return True


def recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


class Handler(socketserver.BaseRequestHandler):
    def handle(self):
        st = self.server.state
        with st.lock:
            st.connections += 1
            n = st.connections
        st.note(f"connect {n}")
        self.structured = False
        self.broken = st.args.handshake if st.handshake_breaks(n) else None
        try:
            if self.handshake():
                self.transmission()
        except (EOFError, ConnectionError, OSError):
            pass
        st.note(f"disconnect {n}")

    # --- handshake -------------------------------------------------------

    def opt_reply(self, opt, kind, data=b""):
        self.request.sendall(
            struct.pack(">QIII", OPT_REPLY_MAGIC, opt, kind, len(data)) + data
        )

    def handshake(self):
        s = self.request
        st = self.server.state
        magic = b"NBDMAGIX" if self.broken == "bad-magic" else NBDMAGIC
        s.sendall(magic + struct.pack(">QH", IHAVEOPT, 1 | 2))
        if self.broken == "close":
            return False
        if self.broken == "silent":
            while s.recv(4096):
                pass
            return False
        (client_flags,) = struct.unpack(">I", recv_exact(s, 4))
        if not client_flags & 1:
            return False
        while True:
            magic, opt, length = struct.unpack(">QII", recv_exact(s, 16))
            if magic != IHAVEOPT or length > 65536:
                return False
            payload = recv_exact(s, length)
            if self.broken == "garbage":
                s.sendall(os.urandom(20))
                continue
            if self.broken == "huge-reply":
                s.sendall(struct.pack(">QIII", OPT_REPLY_MAGIC, opt, REP_ACK, 0xFFFFFFFF))
                continue
            if opt == OPT_STRUCTURED_REPLY:
                st.note("structured asked")
                if st.args.structured == "yes":
                    self.structured = True
                    self.opt_reply(opt, REP_ACK)
                else:
                    self.opt_reply(opt, REP_ERR_UNSUP)
            elif opt in (OPT_INFO, OPT_GO):
                self.export_info(opt)
                self.opt_reply(opt, REP_ACK)
                if opt == OPT_GO:
                    return True
            elif opt == OPT_ABORT:
                self.opt_reply(opt, REP_ACK)
                return False
            elif opt == OPT_EXPORT_NAME:
                return False  # libnbd uses GO; not served
            else:
                self.opt_reply(opt, REP_ERR_UNSUP)

    def export_info(self, opt):
        flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA
        if self.server.state.args.multi_conn == "yes":
            flags |= FLAG_CAN_MULTI_CONN
        size = self.server.state.args.size
        minimum = 1
        if self.broken == "huge-size":
            size = (1 << 63) + 512
        elif self.broken == "odd-size":
            size += 100
        elif self.broken == "bad-block":
            minimum = 3
        elif self.broken == "block-4k":
            minimum = 4096
        elif self.broken == "big-block":
            minimum = 1 << 16
        self.opt_reply(opt, REP_INFO, struct.pack(">HQH", INFO_EXPORT, size, flags))
        self.opt_reply(
            opt,
            REP_INFO,
            struct.pack(">HIII", INFO_BLOCK_SIZE, minimum, max(4096, minimum), 1 << 20),
        )

    # --- transmission ----------------------------------------------------

    def simple(self, cookie, error=0, data=b""):
        self.request.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, error, cookie) + data)

    def chunk(self, cookie, kind, payload, flags=REPLY_FLAG_DONE, length=None):
        if length is None:
            length = len(payload)
        head = struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, flags, kind, cookie, length)
        self.request.sendall(head + payload)

    def done(self, cookie, error=0):
        """The reply to a command without data."""
        if error and self.structured:
            self.chunk(cookie, REPLY_TYPE_ERROR, struct.pack(">IH", error, 0))
        elif self.structured:
            self.chunk(cookie, REPLY_TYPE_NONE, b"")
        else:
            self.simple(cookie, error)

    def read_reply(self, cookie, offset, data):
        if self.structured:
            self.chunk(cookie, REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", offset) + data)
        else:
            self.simple(cookie, 0, data)

    def transmission(self):
        s = self.request
        st = self.server.state
        while True:
            magic, flags, kind, cookie, offset, length = struct.unpack(
                ">IHHQQI", recv_exact(s, 28)
            )
            if magic != REQUEST_MAGIC:
                return
            if kind == CMD_DISC:
                return
            in_range = offset + length <= len(st.data)
            if kind == CMD_WRITE:
                payload = recv_exact(s, length)
                if not in_range:
                    self.done(cookie, EINVAL)
                    continue
                with st.lock:
                    st.data[offset : offset + length] = payload
                self.done(cookie)
            elif kind in (CMD_FLUSH, CMD_TRIM):
                self.done(cookie)
            elif kind == CMD_READ:
                if not in_range:
                    self.done(cookie, EINVAL)
                    continue
                with st.lock:
                    data = bytes(st.data[offset : offset + length])
                if offset >= st.args.trigger and st.misbehave_now():
                    if self.misbehave(cookie, offset, data) == "close":
                        return
                else:
                    self.read_reply(cookie, offset, data)
            else:
                self.done(cookie, EINVAL)

    def misbehave(self, cookie, offset, data):
        mode = self.server.state.args.mode
        s = self.request
        if mode == "wrong-cookie":
            self.read_reply(cookie ^ 0x5A5A000000000000, offset, data)
        elif mode == "short":
            half = data[: len(data) // 2]
            if self.structured:
                head = struct.pack(
                    ">IHHQIQ",
                    STRUCTURED_REPLY_MAGIC,
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_OFFSET_DATA,
                    cookie,
                    8 + len(data),
                    offset,
                )
                s.sendall(head + half)
            else:
                self.simple(cookie, 0, half)
            s.shutdown(socket.SHUT_RDWR)
            return "close"
        elif mode in ("overlong", "huge"):
            extra = 4096 if mode == "overlong" else 1 << 20
            if self.structured:
                if mode == "huge":
                    # 4 GiB - 16 announced; 1 MiB of it sent, and the
                    # connection stays open: a client that believes the
                    # length waits (or allocates) for the rest.
                    self.chunk(
                        cookie,
                        REPLY_TYPE_OFFSET_DATA,
                        struct.pack(">Q", offset) + b"\xa5" * extra,
                        length=0xFFFFFFF0,
                    )
                else:
                    self.read_reply(cookie, offset, data + b"\xa5" * extra)
            else:
                self.simple(cookie, 0, data + b"\xa5" * extra)
        elif mode == "bad-errno":
            # No NBD error has this number (they are small errno values).
            self.done(cookie, 0x7EADBEEF)
        elif mode == "silent":
            pass  # never answered; later requests are
        elif mode == "unsolicited":
            self.done(0xBAD0C0FFEE, 0)
            self.read_reply(cookie, offset, data)
        elif mode == "unasked-structured":
            self.chunk(cookie, REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", offset) + data)
        else:
            raise SystemExit(f"unknown mode {mode}")
        return None


class UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class TcpServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--unix", help="listen on this unix socket")
    where.add_argument("--port", type=int, help="listen on 127.0.0.1:PORT")
    p.add_argument("--mode", default="good")
    p.add_argument("--structured", choices=["yes", "no"], default="no")
    p.add_argument("--multi-conn", choices=["yes", "no"], default="yes")
    p.add_argument("--times", type=int, default=1, help="0: every trigger read")
    p.add_argument("--trigger", type=int, default=8 << 20)
    p.add_argument("--size", type=int, default=16 << 20)
    p.add_argument("--log", required=True)
    p.add_argument("--handshake", help="break the handshake this way")
    p.add_argument("--handshake-while", help="only while this file exists")
    p.add_argument("--file", help="keep the export in this file")
    args = p.parse_args()
    state = State(args)
    if args.unix:
        server = UnixServer(args.unix, Handler)
    else:
        server = TcpServer(("127.0.0.1", args.port), Handler)
    server.state = state
    state.note(f"listening mode={args.mode} structured={args.structured}")
    try:
        server.serve_forever()
    finally:
        if args.unix:
            try:
                os.unlink(args.unix)
            except OSError:
                pass


if __name__ == "__main__":
    sys.exit(main())
