"""Checks that this Python can run the benchmarks before any figure is measured, and records what it runs with.

`benchmarks/gpu.sh` runs it first, on a machine whose packages came partly from carried wheels: a package that does
not import stops the run at once, with what to do, instead of minutes into a timed step; a requirement of the stack
that the installed versions miss is named (the run goes on: every result records the versions it ran with).

    python benchmarks/check_env.py --device cuda --out env.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

# distribution -> module; the first five must import, the peer's rows are skipped without it
REQUIRED = {"torch": "torch", "accelerate": "accelerate", "diffusers": "diffusers", "datasets": "datasets",
            "punkdiff": "punkdiff"}
OPTIONAL = {"denoising-diffusion-pytorch": "denoising_diffusion_pytorch"}
# whose declared requirements are checked against what is installed
CHECKED = ("punkdiff", "diffusers", "datasets", "accelerate", "denoising-diffusion-pytorch")
# recorded beside them: what the stack runs on
RECORDED = ("torchvision", "triton", "huggingface_hub", "safetensors", "numpy", "pyarrow", "fsspec", "transformers")


def unmet_requirements(distribution: str) -> list[str]:
    """The requirements of an installed distribution (extras left out) that the installed versions do not meet."""
    from packaging.requirements import Requirement

    problems = []
    for line in metadata.requires(distribution) or []:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        try:
            installed = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{distribution} needs {requirement}: {requirement.name} is not installed")
            continue
        if not requirement.specifier.contains(installed, prereleases=True):
            problems.append(f"{distribution} needs {requirement}: {requirement.name} {installed} is installed")
    return problems


def import_versions(modules: dict[str, str]) -> tuple[dict[str, str | None], dict[str, str]]:
    """`(version of each distribution, error of each module that does not import)`."""
    versions: dict[str, str | None] = {}
    errors: dict[str, str] = {}
    for distribution, module in modules.items():
        try:
            importlib.import_module(module)
            versions[distribution] = metadata.version(distribution)
        except Exception as error:  # any import failure is reported, whatever its kind
            versions[distribution] = None
            errors[distribution] = f"{type(error).__name__}: {error}"
    return versions, errors


def accelerator(device: str) -> dict[str, Any]:
    """What torch sees: the CUDA build and, where one is visible, the GPU."""
    import torch

    info: dict[str, Any] = {"requested": device, "torch_cuda": torch.version.cuda,
                            "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(name=props.name, memory_gib=props.total_memory / 2**30,
                    capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count)
    return info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cuda: also require a visible GPU")
    p.add_argument("--out", type=Path, help="also write the findings here as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    versions, errors = import_versions({**REQUIRED, **OPTIONAL})
    for name, error in errors.items():
        print(f"{name} does not import: {error}", file=sys.stderr)
    missing = sorted(set(errors) & set(REQUIRED))
    if missing:
        print(f"missing {', '.join(missing)}: run `make gpu-bundle` and carry .whl (docs/gpu.md), or install "
              "punkdiff with pip install -e '.[bench]'", file=sys.stderr)
        return 1
    unmet = [problem for name in CHECKED if versions.get(name) for problem in unmet_requirements(name)]
    for problem in unmet:
        print(f"warning: {problem}", file=sys.stderr)
    for name in RECORDED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    found = {"python": platform.python_version(), "executable": sys.executable, "versions": versions,
             "import_errors": errors, "unmet_requirements": unmet, "accelerator": accelerator(args.device)}
    print(json.dumps(found, indent=2))
    if args.out:
        from punkdiff.files import write_json

        write_json(args.out, found)
    if args.device == "cuda" and not found["accelerator"]["cuda_available"]:
        print("no CUDA device is visible to torch: the GPU figures cannot run here (--device cpu for a dry run)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
