"""ops/native/build.py: one kernel source at every instruction-set level this CPU runs, the same values at each,
the level chosen and shown, and a kernel cache that loads nothing it did not build."""

from __future__ import annotations

import os
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

from jetmoe.ops import native
from jetmoe.ops.native import build, elementwise

requires_native = pytest.mark.skipif(native.load() is None, reason="no C compiler here, or kernels switched off")
LEVELS_HERE = build.supported_levels()


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A private cache directory; the cached library is dropped before and after."""
    monkeypatch.setenv("JETMOE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("JETMOE_CPU_ISA", raising=False)
    native.load.cache_clear()
    yield monkeypatch
    monkeypatch.undo()
    native.load.cache_clear()


def _library_path() -> Path:
    return Path(native.load()._name)


def _cache_path(tmp_path: Path) -> Path:
    """Where load() will look for the library, before anything is loaded from there."""
    target = tmp_path / "cache" / "native" / build.library_name(build.compiler(), build.chosen_level())
    target.parent.mkdir(parents=True, mode=0o700)
    return target


def test_levels_are_ordered_and_generic_runs_everywhere():
    assert LEVELS_HERE[0] == "generic" and list(LEVELS_HERE) == sorted(LEVELS_HERE, key=build.LEVELS.index)


@requires_native
@pytest.mark.parametrize("level", LEVELS_HERE)
def test_each_level_this_cpu_runs_builds_and_reports_itself(fresh, level):
    fresh.setenv("JETMOE_CPU_ISA", level)
    assert native.level() == level and f"kernels-{level}-" in _library_path().name


@requires_native
def test_the_best_level_is_chosen_unless_pytorchs_capability_caps_it(fresh):
    assert build.chosen_level() == LEVELS_HERE[-1]
    fresh.setenv("ATEN_CPU_CAPABILITY", "default")
    assert build.chosen_level() == "generic"
    if "avx2" in LEVELS_HERE:
        fresh.setenv("ATEN_CPU_CAPABILITY", "avx2")
        assert build.chosen_level() == "avx2"


def test_a_forced_level_the_cpu_lacks_warns_and_takes_the_best_it_has(fresh):
    fresh.setattr(build, "_cpu_flags", lambda: {"avx2", "fma", "f16c"})
    fresh.setattr(build.platform, "machine", lambda: "x86_64")
    fresh.setenv("JETMOE_CPU_ISA", "avx512bf16")
    with pytest.warns(UserWarning, match="JETMOE_CPU_ISA=avx512bf16 needs instructions this CPU lacks; using avx2"):
        assert build.chosen_level() == "avx2"
    fresh.setattr(build.platform, "machine", lambda: "aarch64")
    assert build.supported_levels() == ("generic",)


def test_an_unknown_level_is_refused_naming_the_choices(fresh):
    fresh.setenv("JETMOE_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="JETMOE_CPU_ISA='sse9': expected one of generic, avx2, avx512, avx512bf16"):
        build.chosen_level()
    if build.compiler() and os.environ.get("JETMOE_NATIVE_KERNELS", "1") != "0":
        with pytest.warns(UserWarning, match="native CPU kernels unavailable.*sse9"):
            assert native.load() is None


def _outputs() -> dict[str, torch.Tensor]:
    """Every kernel family on fixed inputs (no denormals: vdpbf16ps flushes those, the portable product not)."""
    generator = torch.Generator().manual_seed(0)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(5, 96, generator=generator).to(dtype)
        w = torch.randn(3, 40, 96, generator=generator).to(dtype)
        groups = native.slot_groups([2, 0, 1, 2, 0])
        name = str(dtype).split(".")[1]
        out[f"gemv-{name}"] = native.gemv(x, w, groups)
        out[f"norm-{name}"], out[f"inv-rms-{name}"] = elementwise.rms_norm(
            x, torch.randn(96, generator=generator).to(dtype), 1e-6
        )
        h = torch.randn(4, 128, generator=generator).to(dtype) * 4
        out[f"silu-{name}"] = elementwise.silu_mul(h)
        logits = torch.randn(3, 160, generator=generator).to(dtype) * 3
        out[f"lse-{name}"] = elementwise.logsumexp_rows(logits)
    out["transpose"] = elementwise.transposed(torch.randn(70, 45, generator=generator).bfloat16(), padded=80)
    q = torch.randint(-127, 128, (2, 40, 96), generator=generator, dtype=torch.int8)
    scale = torch.rand(2, 40, generator=generator) / 64
    out["int8"] = native.int8_gemv(torch.randn(3, 96, generator=generator).bfloat16(), q, scale.bfloat16(),
                                   native.slot_groups([1, 0, 1]))  # fmt: skip
    return out


@requires_native
@pytest.mark.skipif(len(LEVELS_HERE) < 2, reason="one level runs on this CPU")
def test_every_level_computes_the_same_values_bit_for_bit(fresh):
    results = {}
    for level in LEVELS_HERE:
        fresh.setenv("JETMOE_CPU_ISA", level)
        native.load.cache_clear()
        assert native.level() == level
        results[level] = _outputs()
    best = results[LEVELS_HERE[-1]]
    for level, outputs in results.items():
        for name, value in outputs.items():
            assert torch.equal(value, best[name]), f"{name}: {level} differs from {LEVELS_HERE[-1]}"


# ---- the cache loads only what it built ----


def _compile(source: str, target: Path) -> None:
    c_file = target.with_suffix(".c")
    c_file.write_text(source)
    subprocess.run([build.compiler(), "-shared", "-fPIC", str(c_file), "-o", str(target)], check=True)


def _plant(target: Path, marker: Path) -> None:
    """A library whose constructor leaves `marker`: it ran in the process that loaded it."""
    _compile(
        f'#include <stdio.h>\n__attribute__((constructor)) static void planted(void) {{ fopen("{marker}", "w"); }}\n',
        target,
    )


@requires_native
def test_a_planted_library_is_never_loaded_and_is_rebuilt(fresh, tmp_path):
    target = _cache_path(tmp_path)
    marker = tmp_path / "ran"
    _plant(target, marker)
    with pytest.warns(UserWarning, match="does not match its recorded digest or owner; rebuilding"):
        assert native.load() is not None
    assert not marker.exists() and _library_path() == target
    assert build._verified(target)


@requires_native
def test_a_library_with_a_forged_digest_but_no_kernels_falls_back_with_one_warning(fresh, tmp_path):
    """Bytes that match their record but lack the kernels (an older build, say): PyTorch's path, no traceback."""
    target = _cache_path(tmp_path)
    _compile("int unrelated(void) { return 0; }\n", target)
    target.with_suffix(".sha256").write_text(build._digest(target))
    with pytest.warns(UserWarning, match="native CPU kernels unavailable.*jetmoe_"):
        assert native.load() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.load() is None  # cached: one warning


@requires_native
def test_a_cache_directory_others_can_write_is_not_used(fresh, tmp_path):
    directory = tmp_path / "cache" / "native"
    directory.mkdir(parents=True)
    directory.chmod(0o777)
    with pytest.warns(UserWarning, match="not using the kernel cache .* others can write to it"):
        assert native.load() is not None
    assert _library_path().parent != directory and not list(directory.glob("*.so"))
    assert build._private_dir(_library_path().parent)


@requires_native
def test_the_cache_directory_and_library_are_private_to_the_user(fresh, tmp_path):
    target = _library_path()
    assert target.parent == tmp_path / "cache" / "native"
    assert (target.parent.stat().st_mode & 0o777) == 0o700 and not target.stat().st_mode & 0o022


@requires_native
@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_files_owned_by_another_user_are_not_trusted(fresh, tmp_path):
    target = _library_path()
    native.load.cache_clear()
    os.chown(target, 65534, 65534)
    with pytest.warns(UserWarning, match="rebuilding"):
        assert native.load() is not None
    assert target.stat().st_uid == os.getuid()
    native.load.cache_clear()
    os.chown(target.parent, 65534, 65534)
    with pytest.warns(UserWarning, match="not using the kernel cache"):
        assert native.load() is not None
    assert _library_path().parent != target.parent


CROSS_COMPILERS = {"aarch64": "aarch64-linux-gnu-gcc"}


@pytest.mark.parametrize("arch", sorted(CROSS_COMPILERS))
def test_the_kernels_compile_for_other_architectures(arch, tmp_path):
    """The portable level is plain C: Debian's cross compiler builds it for aarch64 (NEON) where it is installed
    (.ci/run installs it)."""
    compiler = shutil.which(CROSS_COMPILERS[arch])
    if compiler is None:
        pytest.skip(f"{CROSS_COMPILERS[arch]} is not installed (Debian's gcc-{arch}-linux-gnu)")
    for source in build.SOURCES:
        command = [compiler, *build._BASE_FLAGS, "-Werror", "-c", str(source), "-o", str(tmp_path / f"{source.stem}.o")]
        result = subprocess.run([c for c in command if c != "-shared"], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
    symbols = subprocess.run(["nm", str(tmp_path / "gemv.o")], capture_output=True, text=True).stdout
    assert " T jetmoe_gemv" in symbols and " T jetmoe_level" in symbols
