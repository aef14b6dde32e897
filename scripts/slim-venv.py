"""Slim a virtual environment for a container image (run inside the build stage).

- bytecode caches and the packages' own test suites go (the container's filesystem is read-only,
  so Python compiles what it imports in memory; tests never run there);
- ONNX Runtime's offline tooling (model conversion, transformer optimisation, quantisation), which
  the service never imports (``export`` uses it in the training environment, not here);
- ONNX Runtime's C-API library (``capi/libonnxruntime.so.*``), a copy for native programs: the
  Python binding carries its own and does not load it (checked with ``ldd`` before removing);
- byte-identical copies of a shared library in one folder become symlinks: wheels cannot hold
  symlinks, so some (python-gdcm) ship ``libX.so``, ``libX.so.3.2`` and ``libX.so.3.2.6`` as
  three full copies.

    python3 scripts/slim-venv.py /opt/venv
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path


def slim(root: Path) -> int:
    saved = 0
    for folder in sorted(root.rglob("*"), reverse=True):
        if folder.is_dir() and not folder.is_symlink() and folder.name in ("__pycache__", "tests"):
            saved += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            shutil.rmtree(folder)
    for tooling in ("transformers", "tools", "quantization"):
        for folder in root.glob(f"lib/python3*/site-packages/onnxruntime/{tooling}"):
            saved += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            shutil.rmtree(folder)
    for binding in root.glob("lib/python3*/site-packages/onnxruntime/capi/onnxruntime_pybind11_state*.so"):
        needed = subprocess.run(["ldd", str(binding)], capture_output=True, text=True, check=True).stdout
        if "libonnxruntime.so" not in needed:
            for library in binding.parent.glob("libonnxruntime.so.*"):
                saved += library.stat().st_size
                library.unlink()
    groups: dict[tuple[Path, int, str], list[Path]] = defaultdict(list)
    for lib in root.rglob("*.so*"):
        if lib.is_file() and not lib.is_symlink():
            digest = hashlib.sha256(lib.read_bytes()).hexdigest()
            groups[(lib.parent, lib.stat().st_size, digest)].append(lib)
    for (_, size, _), copies in groups.items():
        keep, *others = sorted(copies, key=lambda p: (-len(p.name), p.name))  # the most specific name stays
        for other in others:
            other.unlink()
            other.symlink_to(keep.name)
            saved += size
    return saved


if __name__ == "__main__":
    print(f"slimmed {sys.argv[1]}: {slim(Path(sys.argv[1])) / 2**20:.0f} MiB removed")
