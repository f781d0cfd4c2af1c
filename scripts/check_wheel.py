"""Wheel helpers for scripts/build_wheels.sh (standard library only).

``retag WHEEL LOCAL OUTDIR``: copy WHEEL with the local version ``+LOCAL`` (e.g.
``cu129``): renames the .dist-info folder, rewrites METADATA's Version and RECORD.

``check --archs 80;90a;100a --cuda 12.9``: run inside the venv where the wheel was
installed, from outside the source tree. Checks that moe_kernels and its extension
import (with no GPU), that the extension reports the expected CUDA version and
architectures, that a call without a GPU raises a RuntimeError naming the op, and
(``--cuobjdump PATH``) that the module holds a cubin for every architecture and the
PTX. Prints one line per check; exits 1 on the first failure.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import re
import subprocess
import zipfile
from pathlib import Path


def retag(wheel: Path, local: str, outdir: Path) -> Path:
    m = re.match(r"^([^-]+)-([^-]+)-(.+)\.whl$", wheel.name)
    if not m:
        raise SystemExit(f"{wheel}: not a wheel file name")
    dist, version, tags = m.groups()
    new_version = f"{version.split('+')[0]}+{local}"
    old_info, new_info = f"{dist}-{version}.dist-info", f"{dist}-{new_version}.dist-info"
    out = outdir / f"{dist}-{new_version}-{tags}.whl"
    records = []
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            name = item.filename
            if name == f"{old_info}/RECORD":
                continue
            data = src.read(item)
            if name.startswith(old_info + "/"):
                name = new_info + name[len(old_info):]
            if name == f"{new_info}/METADATA":
                data = re.sub(rb"^Version: .*$", f"Version: {new_version}".encode(), data, count=1, flags=re.M)
            info = zipfile.ZipInfo(name, date_time=item.date_time)
            info.external_attr = item.external_attr
            info.compress_type = zipfile.ZIP_DEFLATED
            dst.writestr(info, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            records.append(f"{name},sha256={digest},{len(data)}")
        records.append(f"{new_info}/RECORD,,")
        dst.writestr(f"{new_info}/RECORD", "\n".join(records) + "\n")
    return out


def check(archs: str, cuda: str, cuobjdump: str | None) -> None:
    def ok(what: str) -> None:
        print(f"  ok: {what}", flush=True)

    def fail(what: str) -> None:
        print(f"  FAILED: {what}", flush=True)
        raise SystemExit(1)

    import torch

    import moe_kernels
    from moe_kernels import cuda_backend, cuda_ops

    if "site-packages" not in Path(moe_kernels.__file__).parts:
        fail(f"moe_kernels imported from {moe_kernels.__file__}, not from the installed wheel")
    ok(f"import moe_kernels {moe_kernels.__version__} from {Path(moe_kernels.__file__).parent} "
       f"(torch {torch.__version__}, cuda available: {torch.cuda.is_available()})")
    info = cuda_backend.extension_info()
    if not info["built"]:
        fail(f"the extension does not import: {info['error']}")
    ok(f"import moe_kernels._C: {Path(info['path']).name}, {info['device_compiler']}, runtime {info['cuda_runtime']}")
    if info["cuda_version"] != cuda:
        fail(f"CUDA version {info['cuda_version']}, expected {cuda}")
    ok(f"CUDA version {info['cuda_version']}")
    real = [a for a in re.split(r"[;,]", archs) if a]
    if info["archs"] != real:
        fail(f"archs {info['archs']}, expected {real}")
    ok(f"archs {info['archs']}, PTX {info['ptx']}, max spill bytes {info['max_spill_bytes']}")
    if info["max_spill_bytes"] != 0:
        fail("ptxas reported spills")
    if not torch.cuda.is_available():
        try:
            cuda_ops._C.permute_rows(16, 16, 16, 16, 4, 8, 2, 0, 0)
        except RuntimeError as exc:
            if "moe_kernels._C.permute_rows" not in str(exc):
                fail(f"the no-GPU error does not name the op: {exc}")
            ok(f"a call without a GPU raises RuntimeError: {exc}")
        else:
            fail("a call without a GPU did not raise")
    if cuobjdump:
        out = subprocess.run([cuobjdump, "--list-elf", "--list-ptx", info["path"]], capture_output=True, text=True,
                             check=True).stdout
        elf = sorted(set(re.findall(r"\.(sm_\w+)\.cubin", out)))
        ptx = sorted(set(re.findall(r"\.(sm_\w+)\.ptx", out)))
        want = sorted(f"sm_{a}" for a in real)
        if elf != want:
            fail(f"cuobjdump --list-elf shows {elf}, expected {want}")
        ok(f"cuobjdump --list-elf: {len(re.findall('ELF file', out))} cubins, archs {elf}; --list-ptx: {ptx}")
        if ptx != sorted(f"sm_{p}" for p in info["ptx"]):
            fail(f"cuobjdump --list-ptx shows {ptx}, expected PTX for {info['ptx']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("retag")
    r.add_argument("wheel", type=Path)
    r.add_argument("local")
    r.add_argument("outdir", type=Path)
    c = sub.add_parser("check")
    c.add_argument("--archs", required=True)
    c.add_argument("--cuda", required=True, help="expected CUDA version, e.g. 12.9")
    c.add_argument("--cuobjdump")
    args = ap.parse_args()
    if args.cmd == "retag":
        print(retag(args.wheel, args.local, args.outdir))
    else:
        check(args.archs, args.cuda, args.cuobjdump)


if __name__ == "__main__":
    main()
