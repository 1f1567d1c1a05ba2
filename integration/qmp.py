#!/usr/bin/env python3
"""One QMP command to a QEMU monitor socket: prints the command's "return"
value as JSON, or the error's description on stderr with exit status 1.

    python3 integration/qmp.py SOCKET COMMAND ['{"arg": ...}']

Asynchronous events that arrive before the answer are skipped."""
import json
import socket
import sys


def main() -> int:
    path, command = sys.argv[1], sys.argv[2]
    arguments = json.loads(sys.argv[3]) if len(sys.argv) > 3 else None
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(path)
    stream = s.makefile("rw")

    def call(name, args=None):
        msg = {"execute": name}
        if args is not None:
            msg["arguments"] = args
        stream.write(json.dumps(msg) + "\n")
        stream.flush()
        while True:
            line = stream.readline()
            if not line:
                raise SystemExit(f"qmp: {path} closed the connection")
            reply = json.loads(line)
            if "return" in reply or "error" in reply:
                return reply

    json.loads(stream.readline())  # the greeting
    call("qmp_capabilities")
    reply = call(command, arguments)
    if "error" in reply:
        print(f"qmp {command}: {reply['error'].get('desc', reply['error'])}", file=sys.stderr)
        return 1
    print(json.dumps(reply["return"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
