#!/usr/bin/env python3
"""py-spiffe (grpcio, i.e. gRPC C-core) against a running `agentid up`.

Usage:
    SPIFFE_ENDPOINT_SOCKET=unix:///path/workload.sock \
        python3 tests/python/interop.py EXPECTED_SPIFFE_ID \
        [--add-policy SRC DST --expect-pushed-id ID]

Every check uses py-spiffe's public API (`spiffe.*`); `cryptography` is used only to
inspect what py-spiffe returns. One line per check on stdout; on the first failure a
`FAIL` line goes to stderr and the exit status is 1. The last line on success is
`all checks passed`.

With --add-policy, after the X.509 watch delivered its first update the script renames
SRC to DST (a policy file the daemon watches) and expects the open stream to push an
update holding ID as well, with no reconnect.
"""

import argparse
import importlib.metadata
import os
import sys
import threading
import time

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from spiffe import (
    JwtBundleSet,
    JwtSource,
    JwtSvid,
    SpiffeId,
    TrustDomain,
    WorkloadApiClient,
    X509BundleSet,
    X509Source,
)
from spiffe.errors import PySpiffeError
from spiffe.workloadapi.errors import ValidateJwtSvidError

TIMEOUT = 10.0  # seconds, for every call and every wait
AUDIENCE = "payments"


class CheckFailed(Exception):
    pass


def ensure(cond, msg):
    if not cond:
        raise CheckFailed(msg)


def ok(name, detail=""):
    print(f"ok   {name}" + (f": {detail}" if detail else ""), flush=True)


def expect_error(fn, errors, what):
    """Runs fn, which must raise one of `errors`; returns the exception."""
    try:
        got = fn()
    except errors as e:
        return e
    raise CheckFailed(f"{what} was accepted (returned {got!r})")


def invalid_argument(err):
    """The gRPC status behind a py-spiffe error must be INVALID_ARGUMENT (SPIFFE Workload API
    ValidateJWTSVID); returns "CODE: details" for the report."""
    cause = err.__cause__
    code = cause.code() if isinstance(cause, grpc.Call) else None
    ensure(code == grpc.StatusCode.INVALID_ARGUMENT, f"answered {code}, not INVALID_ARGUMENT: {err}")
    return f"{code.name}: {cause.details()}"


def public_der(key):
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def issued_by_bundle(leaf, bundle):
    """Whether `leaf` carries a valid signature from one of the bundle's authorities."""
    for ca in bundle.x509_authorities:
        try:
            leaf.verify_directly_issued_by(ca)
            return True
        except Exception:  # wrong issuer or bad signature
            continue
    return False


def check_x509_svid(client, expected_id, td):
    svid = client.fetch_x509_svid()
    ensure(str(svid.spiffe_id) == expected_id, f"SPIFFE ID {svid.spiffe_id}, expected {expected_id}")
    ensure(svid.spiffe_id == SpiffeId(expected_id), "SpiffeId equality")
    ok("fetch_x509_svid", str(svid.spiffe_id))

    chain = svid.cert_chain
    ensure(len(chain) >= 1, "empty certificate chain")
    ensure(all(isinstance(c, x509.Certificate) for c in chain), "chain holds non-certificates")
    leaf = svid.leaf
    ensure(leaf == chain[0], "leaf is not the first certificate of the chain")
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    ensure(uris == [expected_id], f"leaf URI SANs {uris}")
    now = time.time()
    nb, na = leaf.not_valid_before_utc.timestamp(), leaf.not_valid_after_utc.timestamp()
    ensure(nb <= now + 60 and now < na, f"leaf not valid now ({nb}..{na})")
    ok("x509 chain parses", f"{len(chain)} certificate(s), leaf valid until {leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}")

    key = svid.private_key
    ensure(public_der(key.public_key()) == public_der(leaf.public_key()), "private key does not match the leaf")
    ok("x509 private key matches leaf", type(key).__name__)

    svids = client.fetch_x509_svids()
    ensure(len(svids) >= 1 and svids[0].spiffe_id == svid.spiffe_id, "fetch_x509_svids default differs")
    ok("fetch_x509_svids", ", ".join(str(s.spiffe_id) for s in svids))

    ctx = client.fetch_x509_context()
    ensure(ctx.default_svid.spiffe_id == svid.spiffe_id, "context default SVID differs")
    ctx_bundle = ctx.x509_bundle_set.get_bundle_for_trust_domain(td)
    ensure(ctx_bundle is not None, f"context has no bundle for {td}")
    ensure(issued_by_bundle(ctx.default_svid.leaf, ctx_bundle), "context SVID not signed by context bundle")
    ok("fetch_x509_context", f"SVID verifies against the {td} bundle")
    return svid


def check_x509_bundles(client, td, svid):
    bundles = client.fetch_x509_bundles()
    ensure(isinstance(bundles, X509BundleSet), f"got {type(bundles).__name__}")
    bundle = bundles.get_bundle_for_trust_domain(td)
    ensure(bundle is not None, f"no X.509 bundle for {td}")
    ensure(bundle.trust_domain == td, "bundle trust domain differs")
    cas = bundle.x509_authorities
    ensure(len(cas) >= 1, "X.509 bundle is empty")
    for ca in cas:
        bc = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
        ensure(bc.ca, f"bundle authority {ca.subject.rfc4514_string()} is not a CA")
    ensure(issued_by_bundle(svid.leaf, bundle), "X509-SVID is not signed by any bundle authority")
    ok("fetch_x509_bundles", f"{len(cas)} authority(ies) for {td}, SVID verifies")


def check_jwt_bundles(client, td):
    bundles = client.fetch_jwt_bundles()
    ensure(isinstance(bundles, JwtBundleSet), f"got {type(bundles).__name__}")
    bundle = bundles.get_bundle_for_trust_domain(td)
    ensure(bundle is not None, f"no JWT bundle for {td}")
    ensure(len(bundle.jwt_authorities) >= 1, "JWT bundle has no keys")
    ok("fetch_jwt_bundles", f"{td}: kid {', '.join(sorted(bundle.jwt_authorities))}")
    return bundle


def check_jwt(client, expected_id, jwt_bundle):
    svid = client.fetch_jwt_svid({AUDIENCE})
    ensure(str(svid.spiffe_id) == expected_id, f"JWT-SVID subject {svid.spiffe_id}")
    ensure(set(svid.audience) == {AUDIENCE}, f"audience {svid.audience}")
    ensure(svid.expiry > time.time(), f"expired: exp {svid.expiry}")
    token = svid.token
    ensure(token.count(".") == 2, "token is not a JWS compact serialization")
    ok("fetch_jwt_svid", f"sub {svid.spiffe_id}, aud {AUDIENCE}, expires in {int(svid.expiry - time.time())} s")

    validated = client.validate_jwt_svid(token, AUDIENCE)
    ensure(str(validated.spiffe_id) == expected_id, f"validated subject {validated.spiffe_id}")
    ok("validate_jwt_svid (Workload API)", str(validated.spiffe_id))

    local = JwtSvid.parse_and_validate(token, jwt_bundle, {AUDIENCE})
    ensure(str(local.spiffe_id) == expected_id, f"locally validated subject {local.spiffe_id}")
    ensure(local.token == token, "local validation returned another token")
    ok("JwtSvid.parse_and_validate (JWT bundle)", "signature verified locally")

    e = expect_error(lambda: client.validate_jwt_svid(token, "not-" + AUDIENCE), ValidateJwtSvidError,
                     "wrong audience through the Workload API")
    ok("wrong audience rejected by validate_jwt_svid", invalid_argument(e))
    e = expect_error(lambda: JwtSvid.parse_and_validate(token, jwt_bundle, {"not-" + AUDIENCE}), PySpiffeError,
                     "wrong audience locally")
    ok("wrong audience rejected locally", type(e).__name__)

    # Flip a signature character: both validators must refuse it.
    head, payload, sig = token.split(".")
    forged = ".".join([head, payload, ("A" if sig[0] != "A" else "B") + sig[1:]])
    e = expect_error(lambda: client.validate_jwt_svid(forged, AUDIENCE), ValidateJwtSvidError,
                     "bad signature through the Workload API")
    ok("bad signature rejected by validate_jwt_svid", invalid_argument(e))
    e = expect_error(lambda: JwtSvid.parse_and_validate(forged, jwt_bundle, {AUDIENCE}), PySpiffeError,
                     "bad signature locally")
    ok("bad signature rejected locally", type(e).__name__)

    multi = client.fetch_jwt_svid({"a", "b"})
    ensure(set(multi.audience) == {"a", "b"}, f"audience {multi.audience}")
    ensure(str(client.validate_jwt_svid(multi.token, "b").spiffe_id) == expected_id, "second audience")
    ok("multi-audience JWT-SVID", "validates for each audience")


class Watch:
    """Collects callbacks from a py-spiffe stream."""

    def __init__(self):
        self.cond = threading.Condition()
        self.updates = []
        self.errors = []

    def on_success(self, update):
        with self.cond:
            self.updates.append(update)
            self.cond.notify_all()

    def on_error(self, err):
        with self.cond:
            self.errors.append(err)
            self.cond.notify_all()

    def wait_for(self, pred, what):
        deadline = time.monotonic() + TIMEOUT
        with self.cond:
            while not pred(self.updates):
                if self.errors:
                    raise CheckFailed(f"stream error while waiting for {what}: {self.errors[0]}")
                left = deadline - time.monotonic()
                ensure(left > 0, f"no {what} within {TIMEOUT} s ({len(self.updates)} update(s) so far)")
                self.cond.wait(left)
            if self.errors:
                raise CheckFailed(f"stream error: {self.errors[0]}")


def check_streams(client, expected_id, td, add_policy, pushed_id):
    w = Watch()
    handle = client.stream_x509_contexts(w.on_success, w.on_error, retry_connect=False)
    try:
        w.wait_for(lambda u: len(u) >= 1, "first X.509 context")
        first = w.updates[0]
        ensure(str(first.default_svid.spiffe_id) == expected_id, f"streamed SVID {first.default_svid.spiffe_id}")
        ensure(first.x509_bundle_set.get_bundle_for_trust_domain(td) is not None, "streamed context lacks bundle")
        ok("stream_x509_contexts first update", str(first.default_svid.spiffe_id))

        if add_policy:
            src, dst = add_policy
            os.rename(src, dst)
            w.wait_for(lambda u: any(pushed_id in {str(s.spiffe_id) for s in c.x509_svids} for c in u),
                       f"pushed update with {pushed_id}")
            last = w.updates[-1]
            ids = [str(s.spiffe_id) for s in last.x509_svids]
            ensure(ids[0] == expected_id, f"default SVID changed to {ids[0]}")
            ok("stream_x509_contexts pushed policy change", " + ".join(ids))
    finally:
        handle.cancel()
    time.sleep(0.3)
    if w.errors:
        raise CheckFailed(f"cancelling the X.509 watch reported an error: {w.errors[0]}")
    ok("stream_x509_contexts closed", f"{len(w.updates)} update(s), no error after cancel")

    w = Watch()
    handle = client.stream_jwt_bundles(w.on_success, w.on_error, retry_connect=False)
    try:
        w.wait_for(lambda u: len(u) >= 1, "first JWT bundle set")
        ensure(w.updates[0].get_bundle_for_trust_domain(td) is not None, "streamed JWT bundles lack own domain")
    finally:
        handle.cancel()
    time.sleep(0.3)
    if w.errors:
        raise CheckFailed(f"cancelling the JWT bundle watch reported an error: {w.errors[0]}")
    ok("stream_jwt_bundles", "first update received, closed cleanly")

    with X509Source(timeout_in_seconds=TIMEOUT) as source:
        svid = source.get_x509_context().default_svid
        ensure(str(svid.spiffe_id) == expected_id, f"X509Source SVID {svid.spiffe_id}")
        ensure(source.get_bundle_for_trust_domain(td) is not None, "X509Source lacks own bundle")
    ensure(source.is_closed(), "X509Source not closed")
    ok("X509Source", "initialised from the stream, closed")

    with JwtSource(timeout_in_seconds=TIMEOUT) as source:
        bundle = source.get_bundle_for_trust_domain(td)
        ensure(bundle is not None, "JwtSource lacks own bundle")
        jwt = source.fetch_svid({AUDIENCE}, timeout=TIMEOUT)
        JwtSvid.parse_and_validate(jwt.token, bundle, {AUDIENCE})
    ensure(source.is_closed(), "JwtSource not closed")
    ok("JwtSource", "token validates against the streamed bundle, closed")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("expected_id")
    p.add_argument("--add-policy", nargs=2, metavar=("SRC", "DST"))
    p.add_argument("--expect-pushed-id")
    args = p.parse_args()
    if bool(args.add_policy) != bool(args.expect_pushed_id):
        p.error("--add-policy and --expect-pushed-id go together")

    endpoint = os.environ.get("SPIFFE_ENDPOINT_SOCKET")
    ensure(endpoint, "SPIFFE_ENDPOINT_SOCKET is not set")
    versions = {m: importlib.metadata.version(m) for m in ("spiffe", "grpcio", "cryptography")}
    ok("environment", f"{endpoint}; " + ", ".join(f"{k} {v}" for k, v in versions.items()))

    td = SpiffeId(args.expected_id).trust_domain
    ensure(isinstance(td, TrustDomain), "trust domain")
    # No socket argument: py-spiffe reads SPIFFE_ENDPOINT_SOCKET itself.
    with WorkloadApiClient(default_timeout=TIMEOUT) as client:
        ensure(client.get_spiffe_endpoint_socket() == endpoint, "client did not pick up SPIFFE_ENDPOINT_SOCKET")
        svid = check_x509_svid(client, args.expected_id, td)
        check_x509_bundles(client, td, svid)
        jwt_bundle = check_jwt_bundles(client, td)
        check_jwt(client, args.expected_id, jwt_bundle)
        check_streams(client, args.expected_id, td, args.add_policy, args.expect_pushed_id)
    print("all checks passed", flush=True)


if __name__ == "__main__":
    try:
        main()
    except CheckFailed as e:
        print(f"FAIL {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    except Exception as e:  # py-spiffe or grpc errors: name the type, keep the traceback
        import traceback

        traceback.print_exc()
        print(f"FAIL unexpected {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
