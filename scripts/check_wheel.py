"""Wheel helpers for scripts/build_wheels.sh (standard library only).

``retag WHEEL LOCAL OUTDIR``: copy WHEEL with the local version ``+LOCAL`` (e.g.
``cu129``): renames the .dist-info folder, rewrites METADATA's Version and RECORD.

``index DIR``: write DIR/index.html and DIR/<project>/index.html, a PEP 503 simple
index of the wheels in DIR (links with #sha256=), for ``pip --extra-index-url file://DIR``.

``manylinux GLIBC WHEEL`` (``auditwheel show`` output on stdin): fail unless auditwheel finds
the wheel consistent with manylinux_2_Y for a Y <= GLIBC's, and the wheel is tagged so.

``contents WHEEL``: the wheel holds LICENSE, the abi3 module, its variant file and no
other native code.

``check --archs 80;90a;100a --cuda 12.9 --variant cu129 --version 0.1.0 [--torch]``: run
inside the venv where the wheel was installed, from outside the source tree. Checks that
the extension imports (with no GPU) from the installed wheel, that it reports the
expected CUDA version and architectures, that a call without a GPU raises a RuntimeError
naming the op, and (``--cuobjdump PATH``) that the module holds a cubin for every
architecture and the PTX. With ``--torch``, through the package (``moe_kernels._C``,
``__version__``, ``build_variant()``, ``moe-kernels info``); without, the module and its
variant file are loaded directly (no torch needed). Prints one line per check; exits 1
on the first failure.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import html
import importlib.util
import re
import subprocess
import sys
import sysconfig
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
            if name == f"{old_info}/RECORD" or item.is_dir():  # auditwheel writes folder entries
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


def _ok(what: str) -> None:
    print(f"  ok: {what}", flush=True)


def _fail(what: str) -> None:
    print(f"  FAILED: {what}", flush=True)
    raise SystemExit(1)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_index(root: Path) -> None:
    """A PEP 503 index of the wheels in ``root`` (moved into root/<project>/)."""
    projects: dict[str, list[Path]] = {}
    for wheel in sorted(root.glob("*.whl")) + sorted(root.glob("*/*.whl")):
        project = re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
        target = root / project / wheel.name
        if wheel != target:
            target.parent.mkdir(parents=True, exist_ok=True)
            wheel.replace(target)
        projects.setdefault(project, []).append(target)
    if not projects:
        raise SystemExit(f"{root}: no wheels to index")
    page = "<!DOCTYPE html>\n<html><body>\n{}</body></html>\n"
    for project, wheels in projects.items():
        links = "".join(f'<a href="{html.escape(w.name)}#sha256={_sha256(w)}" data-requires-python="&gt;=3.10">'
                        f"{html.escape(w.name)}</a><br>\n" for w in sorted(set(wheels)))
        (root / project / "index.html").write_text(page.format(links))
    (root / "index.html").write_text(page.format("".join(f'<a href="{p}/">{p}</a><br>\n' for p in sorted(projects))))
    print(f"{root}: PEP 503 index of {sum(len(set(w)) for w in projects.values())} wheel(s)")


def check_manylinux(shown: str, glibc: str, wheel: Path) -> None:
    """``auditwheel show`` output: consistent with manylinux_2_Y, Y <= glibc's minor."""
    max_minor = int(glibc.split(".")[1])
    m = re.search(r'consistent with the\s+following platform tag:\s+"manylinux_2_(\d+)_x86_64"', shown)
    if not m:
        _fail(f"auditwheel show gives no manylinux tag: {shown}")
    if int(m.group(1)) > max_minor:
        _fail(f"auditwheel show: needs manylinux_2_{m.group(1)}, newer than glibc {glibc}")
    platform = wheel.name[:-len(".whl")].split("-")[-1]
    tagged = re.findall(r"manylinux_2_(\d+)_x86_64", platform)
    if not tagged or any(int(t) > max_minor for t in tagged) or "linux_x86_64" in platform.split("."):
        _fail(f"{wheel.name}: not tagged manylinux_2_Y with Y <= {max_minor} only")
    _ok(f"auditwheel show: consistent with manylinux_2_{m.group(1)}; tagged manylinux_2_{'/'.join(tagged)}")


# The CUDA extension and the CPU kernels (a plain C library for ctypes), both abi3-named.
NATIVE = ["moe_kernels/_C.abi3.so", "moe_kernels/_cpu_kernels.abi3.so"]


def check_contents(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        metadata = next(z.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    licenses = [n for n in names if re.search(r"\.dist-info/(licenses/)?LICENSE$", n)]
    native = sorted(n for n in names if re.search(r"\.so(\.|$)", n))
    if not licenses:
        _fail(f"{wheel.name}: no LICENSE in the .dist-info")
    if native != NATIVE:
        _fail(f"{wheel.name}: native code {native}, expected {' and '.join(NATIVE)} only")
    if "moe_kernels/_build_variant.py" not in names:
        _fail(f"{wheel.name}: no moe_kernels/_build_variant.py")
    if not re.search(r"^License-Expression: Apache-2.0$", metadata, re.M):
        _fail(f"{wheel.name}: METADATA has no License-Expression: Apache-2.0")
    _ok(f"{wheel.name}: {licenses[0]}, {', '.join(native)}, _build_variant.py, License-Expression Apache-2.0")


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_cpu_kernels(installed: Path, with_torch: bool) -> None:
    """The CPU kernels load and answer their ABI number; with torch, run once against the twin."""
    import ctypes

    lib = ctypes.CDLL(str(installed / "_cpu_kernels.abi3.so"))
    abi = lib.moe_cpu_kernels_abi()
    if not with_torch:
        _ok(f"_cpu_kernels.abi3.so: loads, ABI {abi}")
        return
    import torch

    from moe_kernels import cpu_kernel

    if not cpu_kernel.available():
        _fail(f"the CPU kernels do not load: {cpu_kernel.unavailable_reason()}")
    x, w = torch.randn(5, 40), torch.randn(3, 24, 40)
    rows, ex = torch.tensor([0, 1, 2, 3, 4, 4], dtype=torch.int32), torch.tensor([2, 0, 2, 1, 3, 0], dtype=torch.int32)
    err = (cpu_kernel.expert_linear(x, rows, ex, w) - cpu_kernel.expert_linear_reference(x, rows, ex, w)).abs().max()
    if not float(err) < 1e-4:
        _fail(f"the CPU kernel disagrees with its twin: max error {float(err)}")
    _ok(f"_cpu_kernels.abi3.so: ABI {abi}, {cpu_kernel.threading_model()} threads, matches its twin ({float(err):.1e})")


def check(archs: str, cuda: str, variant: str, version: str, cuobjdump: str | None, with_torch: bool) -> None:
    ok, fail = _ok, _fail
    installed = Path(sysconfig.get_paths()["platlib"]) / "moe_kernels"
    if not (installed / "_C.abi3.so").is_file():
        fail(f"no {installed / '_C.abi3.so'}: the wheel did not install its extension")
    py = f"Python {sys.version_info[0]}.{sys.version_info[1]}"
    if with_torch:
        import torch

        import moe_kernels

        if Path(moe_kernels.__file__).parent != installed:
            fail(f"moe_kernels imported from {moe_kernels.__file__}, not from the installed wheel")
        want_version = f"{version}+{variant}"
        if moe_kernels.__version__ != want_version:
            fail(f"moe_kernels.__version__ is {moe_kernels.__version__!r}, expected {want_version!r}")
        ok(f"{py}: import moe_kernels {moe_kernels.__version__} from {installed} (torch {torch.__version__}, "
           f"cuda available: {torch.cuda.is_available()})")
        C = moe_kernels._C  # the lazy attribute
        variant_info = moe_kernels.build_variant()
        cli = subprocess.run([sys.executable, "-m", "moe_kernels", "info"], capture_output=True, text=True)
        line = next((ln for ln in cli.stdout.splitlines() if variant in ln and cuda in ln), None)
        if cli.returncode != 0 or line is None:
            fail(f"moe-kernels info does not name {variant} / CUDA {cuda} (rc {cli.returncode}):\n{cli.stdout}"
                 f"{cli.stderr}")
        ok(f"moe-kernels info: {line.strip()}")
    else:
        C = _load("moe_kernels._C", installed / "_C.abi3.so")
        variant_info = vars(_load("moe_kernels._build_variant", installed / "_build_variant.py"))
        variant_info = {k.lower(): v for k, v in variant_info.items() if k.isupper()}
        ok(f"{py} (no torch): loaded {installed / '_C.abi3.so'} and its variant file directly")
    _check_cpu_kernels(installed, with_torch)
    if Path(C.__file__).resolve() != (installed / "_C.abi3.so").resolve():
        fail(f"moe_kernels._C is {C.__file__}, not the installed module")
    info = {"path": C.__file__, **C.build_info()}
    ok(f"moe_kernels._C: {Path(info['path']).name}, {info['device_compiler']}, runtime {info['cuda_runtime']}, "
       f"{info['python_abi']}")
    if info["cuda_version"] != cuda:
        fail(f"CUDA version {info['cuda_version']}, expected {cuda}")
    real = [a for a in re.split(r"[;,]", archs) if a]
    if info["archs"] != real:
        fail(f"archs {info['archs']}, expected {real}")
    want_variant = {"variant": variant, "cuda_version": cuda, "archs": tuple(real), "ptx": tuple(info["ptx"])}
    got_variant = {k: variant_info.get(k) for k in want_variant}
    if got_variant != want_variant:
        fail(f"the variant file says {got_variant}, expected {want_variant}")
    ok(f"variant {variant}: CUDA {info['cuda_version']}, archs {info['archs']}, PTX {info['ptx']}")
    spills = [int(v) for v in re.findall(r"(\d+) bytes spill", C.ptxas_log())]
    if not spills or max(spills) != 0:
        fail(f"ptxas log: spill bytes {sorted(set(spills))}")
    ok(f"ptxas log: {len(spills)} spill counts, all 0")
    try:
        C.permute_rows(16, 16, 16, 16, 4, 8, 2, 4, 4, 16, 0, 0)
    except RuntimeError as exc:
        if "moe_kernels._C.permute_rows" not in str(exc):
            fail(f"the no-GPU error does not name the op: {exc}")
        ok(f"a call without a GPU raises RuntimeError: {str(exc)[:110]}...")
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
    sub.add_parser("index").add_argument("dir", type=Path)
    m = sub.add_parser("manylinux")
    m.add_argument("glibc", help="the newest glibc allowed, e.g. 2.28")
    m.add_argument("wheel", type=Path)
    sub.add_parser("contents").add_argument("wheel", type=Path)
    c = sub.add_parser("check")
    c.add_argument("--archs", required=True)
    c.add_argument("--cuda", required=True, help="expected CUDA version, e.g. 12.9")
    c.add_argument("--variant", required=True, help="expected variant, e.g. cu129")
    c.add_argument("--version", required=True, help="the package version without the local part, e.g. 0.1.0")
    c.add_argument("--cuobjdump")
    c.add_argument("--torch", action="store_true", help="torch is installed: check through the package")
    args = ap.parse_args()
    if args.cmd == "retag":
        print(retag(args.wheel, args.local, args.outdir))
    elif args.cmd == "index":
        write_index(args.dir)
    elif args.cmd == "manylinux":
        check_manylinux(sys.stdin.read(), args.glibc, args.wheel)
    elif args.cmd == "contents":
        check_contents(args.wheel)
    else:
        check(args.archs, args.cuda, args.variant, args.version, args.cuobjdump, args.torch)


if __name__ == "__main__":
    main()
