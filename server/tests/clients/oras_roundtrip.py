"""Pushes an artifact with several files to a registry with the oras Python client (monolithic
and chunked uploads), attaches a referrer, pulls everything back and compares.

Usage: oras_roundtrip.py HOST:PORT WORKDIR
"""
import hashlib
import os
import sys

import oras.client
import oras.provider


def main() -> None:
    host, work = sys.argv[1], sys.argv[2]
    src = os.path.join(work, "src")
    os.makedirs(src, exist_ok=True)
    files = {}
    for name, size in [("small.txt", 100), ("medium.bin", 300_000), ("large.bin", 3_000_000)]:
        data = hashlib.sha256(name.encode()).digest() * (size // 32 + 1)
        data = data[:size]
        with open(os.path.join(src, name), "wb") as f:
            f.write(data)
        files[name] = data
    client = oras.client.OrasClient(hostname=host, insecure=True)
    cwd = os.getcwd()
    os.chdir(src)
    try:
        client.push(target=f"{host}/artifacts/bundle:v1", files=list(files))
        # The same artifact again with chunked uploads (PATCH with Content-Range).
        client.push(target=f"{host}/artifacts/bundle:v1-chunked", files=list(files), do_chunked=True, chunk_size=1 << 20)
    finally:
        os.chdir(cwd)
    for tag in ["v1", "v1-chunked"]:
        out = os.path.join(work, "out-" + tag)
        paths = client.pull(target=f"{host}/artifacts/bundle:{tag}", outdir=out)
        got = {os.path.basename(p): open(p, "rb").read() for p in paths}
        assert got == files, f"{tag}: pulled {sorted(got)} differ from pushed {sorted(files)}"
    print("oras round trip ok")


if __name__ == "__main__":
    main()
