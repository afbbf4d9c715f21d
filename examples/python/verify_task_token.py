"""Verify an agentid task token with PyJWT, as a relying party would.

    python3 verify_task_token.py --jwks bundle.json --trust-domain agentid.local \
        --audience ledger --presenter spiffe://agentid.local/agent/reader TOKEN

`bundle.json` is the trust domain's JWT bundle: a JWK Set, as `FetchJWTBundles` returns it
(py-spiffe: `WorkloadApiClient().fetch_jwt_bundles()`), or a SPIFFE bundle document.
`--presenter` is the SPIFFE ID the token came with: the mTLS peer's URI SAN, or the `sub` of
the JWT-SVID presented alongside. Prints the verified claims as JSON; exits 1 with the reason
on stderr if the token must be refused.

Needs `pip install "PyJWT[crypto]"`.
"""

import argparse
import json
import sys

import jwt

TYP = "txntoken+jwt"
MAX_DEPTH = 16


class Refused(Exception):
    pass


def verify_task_token(token, jwks, trust_domain, audience, presenter):
    header = jwt.get_unverified_header(token)
    # Only ES256, and only task tokens: a JWT-SVID is not a task token and vice versa.
    if header.get("alg") != "ES256":
        raise Refused(f"alg {header.get('alg')!r} is not ES256")
    if header.get("typ") != TYP:
        raise Refused(f"typ {header.get('typ')!r} is not {TYP}")
    keys = {
        k["kid"]: k
        for k in jwks["keys"]
        if k.get("use") in (None, "jwt-svid") and "kid" in k
    }
    if header.get("kid") not in keys:
        raise Refused(f"kid {header.get('kid')!r} is not in the bundle")
    key = jwt.PyJWK.from_dict(keys[header["kid"]], algorithm="ES256")
    claims = jwt.decode(
        token,
        key.key,
        algorithms=["ES256"],
        audience=audience,
        issuer=f"spiffe://{trust_domain}",
        leeway=30,
        options={"require": ["exp", "iat", "nbf", "iss", "aud", "jti", "sub"]},
    )
    # The outermost actor holds the token: it must be whoever presented it.
    holder = claims["act"]["sub"]
    if holder != presenter:
        raise Refused(f"presenter {presenter} is not the token's holder {holder}")
    chain = []
    actor = claims["act"]
    while actor is not None:
        chain.append(actor["sub"])
        actor = actor.get("act")
    if not chain[-1].startswith(f"spiffe://{trust_domain}/"):
        raise Refused(f"root actor {chain[-1]} is not in {trust_domain}")
    tctx = claims["tctx"]
    if tctx["max_depth"] > MAX_DEPTH or len(chain) - 1 + tctx["depth"] > tctx["max_depth"]:
        raise Refused("the delegation chain is longer than its depth allows")
    return claims


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jwks", required=True)
    p.add_argument("--trust-domain", required=True)
    p.add_argument("--audience", required=True)
    p.add_argument("--presenter", required=True)
    p.add_argument("token")
    a = p.parse_args()
    with open(a.jwks) as f:
        jwks = json.load(f)
    try:
        claims = verify_task_token(a.token, jwks, a.trust_domain, a.audience, a.presenter)
    except (Refused, jwt.PyJWTError) as e:
        print(f"refused: {e}", file=sys.stderr)
        sys.exit(1)
    # Authorize on sub (the principal), the holder and scope; inner actors are provenance.
    print(json.dumps(claims, indent=2))


if __name__ == "__main__":
    main()
