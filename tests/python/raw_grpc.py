#!/usr/bin/env python3
"""Bare grpcio (gRPC C-core, no py-spiffe, no generated code) against a Unix socket.

Usage:
    SPIFFE_ENDPOINT_SOCKET=unix:///path/workload.sock python3 tests/python/raw_grpc.py [--probe]

Dials SPIFFE_ENDPOINT_SOCKET exactly as given with grpc.insecure_channel, which makes
C-core send the socket path as the HTTP/2 :authority, and calls
/grpc.health.v1.Health/Check with hand-serialized messages (grpcio-tools is not needed):

- 100 sequential calls on one channel, alternating 50 distinct unknown methods
  (UNIMPLEMENTED) with Health/Check (SERVING): C-core's HPACK dynamic table fills up and
  evicts while :authority and the other fields are sent as table references;
- 50 concurrent calls on the same channel (interleaved streams);
- the Workload API service's own health entry, and an unknown service (NOT_FOUND).

--probe makes a single call with a short deadline and always exits 0: the caller is a fake
server that only records what the client sends.
"""

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import grpc

CHECK = "/grpc.health.v1.Health/Check"
TIMEOUT = 10.0
SERVING = b"\x08\x01"  # HealthCheckResponse{status: SERVING}


def request(service):
    """HealthCheckRequest{service}: field 1, length-delimited (the empty message is b"")."""
    name = service.encode()
    assert len(name) < 128
    return b"\x0a" + bytes([len(name)]) + name if name else b""


def fail(msg):
    print(f"FAIL {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--probe", action="store_true")
    args = p.parse_args()
    target = os.environ.get("SPIFFE_ENDPOINT_SOCKET") or fail("SPIFFE_ENDPOINT_SOCKET is not set")
    print(f"grpcio {grpc.__version__}, target {target}", flush=True)

    with grpc.insecure_channel(target) as channel:
        # No serializers: requests and responses are raw bytes.
        check = channel.unary_unary(CHECK)
        if args.probe:
            try:
                check(request(""), timeout=2)
            except grpc.RpcError as e:
                print(f"probe: {e.code()}", flush=True)
            return

        # C-core inserts each new :path into its HPACK dynamic table (about 100 octets
        # here), so 50 distinct paths overflow the 4096-octet table: entries, the Check
        # path among them, are evicted and re-inserted while other fields stay references.
        for i in range(50):
            path = f"/agentid.interop.Probe{i:02d}/" + "m" * 40
            try:
                got = channel.unary_unary(path)(b"", timeout=TIMEOUT)
                fail(f"{path} answered {got!r}")
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                    fail(f"call {2 * i + 1}/100 {path}: {e.code()} {e.details()}, expected UNIMPLEMENTED")
            try:
                got = check(request(""), timeout=TIMEOUT)
            except grpc.RpcError as e:
                fail(f"call {2 * i + 2}/100 Health/Check: {e.code()} {e.details()}")
            if got != SERVING:
                fail(f"call {2 * i + 2}/100 Health/Check: response {got!r}, expected {SERVING!r}")
        print("ok   100 sequential calls on one channel (50 unknown methods: UNIMPLEMENTED, "
              "50 Health/Check: SERVING), HPACK table evicting", flush=True)

        def one(i):
            return check.future(request(""), timeout=TIMEOUT)

        with ThreadPoolExecutor(8) as pool:
            futures = list(pool.map(one, range(50)))
        for i, f in enumerate(futures):
            try:
                got = f.result()
            except grpc.RpcError as e:
                fail(f"concurrent call {i + 1}/50: {e.code()} {e.details()}")
            if got != SERVING:
                fail(f"concurrent call {i + 1}/50: response {got!r}")
        print("ok   50 concurrent Health/Check calls on one channel: SERVING", flush=True)

        got = check(request("SpiffeWorkloadAPI"), timeout=TIMEOUT)
        if got != SERVING:
            fail(f"SpiffeWorkloadAPI health: {got!r}")
        print("ok   Health/Check SpiffeWorkloadAPI: SERVING", flush=True)

        try:
            got = check(request("no.such.Service"), timeout=TIMEOUT)
            fail(f"unknown service answered {got!r}")
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                fail(f"unknown service: {e.code()}, expected NOT_FOUND")
        print("ok   Health/Check unknown service: NOT_FOUND", flush=True)
    print("all checks passed", flush=True)


if __name__ == "__main__":
    main()
