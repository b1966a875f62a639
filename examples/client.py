#!/usr/bin/env python3
"""A minimal client for rankd's Unix-socket protocol (see docs/protocol.md).

Usage: python3 examples/client.py [SOCKET] [USER_ID] [K]
       (defaults: ./rankd.sock, user 42, k 10)

Needs only the `msgpack` package (pip install msgpack).

A user rankd has never seen has no history and zero features, so every item
scores 0 and the smallest ids come first; give the user a history first, e.g.
RankdClient(path).call("upsert_user", user_id=42, history=[1, 2, 3]).
"""

import itertools
import socket
import struct
import sys

import msgpack

HEADER = struct.Struct(">I")  # 4-byte big-endian payload length


class RankdError(Exception):
    """An answer with ok = false; `type` is one of the error types of the protocol."""

    def __init__(self, type_, message):
        super().__init__(f"{type_}: {message}")
        self.type = type_
        self.message = message


class RankdClient:
    """One connection. Requests may be pipelined: send several with
    send_request(), then collect them with wait(id) in any order; answers
    that arrive for other ids are kept until asked for."""

    def __init__(self, path="./rankd.sock", timeout=10.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.rfile = self.sock.makefile("rb")
        self.ids = itertools.count(1)  # id 0 is the daemon's "no id" answer
        self.pending = {}  # id -> response already read but not yet claimed

    def send_request(self, op, **fields):
        """Sends one request frame and returns its id."""
        req_id = next(self.ids)
        payload = msgpack.packb({"id": req_id, "op": op, **fields})
        self.sock.sendall(HEADER.pack(len(payload)) + payload)
        return req_id

    def read_response(self):
        """Reads the next response frame, whatever its id."""
        header = self.rfile.read(HEADER.size)
        if len(header) < HEADER.size:
            raise ConnectionError("rankd closed the connection")
        (length,) = HEADER.unpack(header)
        payload = self.rfile.read(length)
        if len(payload) < length:
            raise ConnectionError("rankd closed the connection mid-frame")
        return msgpack.unpackb(payload)

    def wait(self, req_id):
        """Returns the result of request `req_id`, or raises RankdError."""
        while req_id not in self.pending:
            resp = self.read_response()
            if resp["id"] == 0 and not resp["ok"]:
                # An answer that belongs to no request (oversized frame, or a
                # request whose id could not be read): report it right away.
                err = resp["error"]
                raise RankdError(err["type"], err["message"])
            self.pending[resp["id"]] = resp
        resp = self.pending.pop(req_id)
        if not resp["ok"]:
            raise RankdError(resp["error"]["type"], resp["error"]["message"])
        return resp["result"]

    def call(self, op, **fields):
        return self.wait(self.send_request(op, **fields))

    def close(self):
        self.rfile.close()
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "./rankd.sock"
    user_id = int(sys.argv[2]) if len(sys.argv) > 2 else 42
    k = int(sys.argv[3]) if len(sys.argv) > 3 else 10
    try:
        with RankdClient(path) as client:
            result = client.call("recommend", model="demo", user_id=user_id, k=k)
    except RankdError as e:
        sys.exit(f"rankd answered with an error: {e}")
    except OSError as e:
        sys.exit(f"cannot talk to rankd at {path}: {e}")
    print(f"model {result['model']} v{result['version']}, user {user_id}, top {k}:")
    for rank, item in enumerate(result["items"], 1):
        print(f"{rank:3}. item {item['id']:>8}  score {item['score']:.4f}")


if __name__ == "__main__":
    main()
