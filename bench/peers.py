"""Carry the benchmark peers (trifast, cuEquivariance, boltz) to a GPU machine that has no network.

The peers are benchmark-only: never project dependencies, never committed. Their wheels
(cuEquivariance's two op wheels alone are ~73 MB) are over what one device call carries
(64 MiB), so they travel unpacked and re-packed as one ``.tar.xz`` (~30 MB):

    # here, where pip reaches PyPI (the GPU machine runs CPython 3.12):
    python -m bench.peers download          # wheels into ./.whl (ignored)
    python -m bench.peers pack              # ./.whl/*.whl -> ./.peers/peers.tar.xz (ignored)
    # there, in the device command (carry .peers):
    python -m bench.peers unpack && export PYTHONPATH=/tmp/peers:$PYTHONPATH

A wheel is a zip of the files an install puts in site-packages, so extracting each one into
one folder and putting that folder on ``PYTHONPATH`` is what ``pip install --target`` does
(without console scripts, which no benchmark uses).
"""
from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile

WHEELS = "trifast==0.1.13 platformdirs cuequivariance==0.13.0 cuequivariance-torch==0.13.0 " \
         "cuequivariance-ops-cu13==0.13.0 cuequivariance-ops-torch-cu13==0.13.0 boltz==2.2.1".split()
ARCHIVE = os.path.join(".peers", "peers.tar.xz")
SITE = "/tmp/peers"


def download(folder: str = ".whl") -> None:
    subprocess.check_call([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                           "--python-version", "3.12", "--implementation", "cp",
                           *[f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64",
                                                         "manylinux_2_17_x86_64", "manylinux2014_x86_64")],
                           "-d", folder, *WHEELS])


def pack(folder: str = ".whl", archive: str = ARCHIVE) -> None:
    wheels = sorted(glob.glob(os.path.join(folder, "*.whl")))
    if not wheels:
        raise SystemExit(f"no wheels in {folder}: run `python -m bench.peers download` first")
    os.makedirs(os.path.dirname(archive), exist_ok=True)
    with tempfile.TemporaryDirectory() as site:
        for w in wheels:
            with zipfile.ZipFile(w) as z:
                z.extractall(site)
        with tarfile.open(archive, "w:xz", preset=6) as tar:
            tar.add(site, arcname=".")
    print(f"{archive}: {os.path.getsize(archive) / 2**20:.1f} MiB from {len(wheels)} wheels")


def unpack(archive: str = ARCHIVE, site: str = SITE) -> None:
    os.makedirs(site, exist_ok=True)
    with tarfile.open(archive, "r:xz") as tar:
        tar.extractall(site)
    print(f"peers in {site}: export PYTHONPATH={site}:$PYTHONPATH")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", choices=("download", "pack", "unpack"))
    args = p.parse_args()
    {"download": download, "pack": pack, "unpack": unpack}[args.step]()
