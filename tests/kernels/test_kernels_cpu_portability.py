"""The CPU kernel on every CPU users have: it compiles for every ATen capability whatever the host, runs under
every capability the host can execute, and falls back (with a warning that names the fix) where it cannot build."""

from __future__ import annotations

import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from diffusion_accel.kernels import BlockSparseMask, block_sparse_attention, cpu_ext, reference_attention
from diffusion_accel.kernels import dispatch as dispatch_mod

X86 = platform.machine().lower() in ("x86_64", "amd64")
HAS_COMPILER = shutil.which("c++") is not None
needs_x86_compiler = pytest.mark.skipif(not (X86 and HAS_COMPILER), reason="needs an x86-64 host with a C++ compiler")


def _host_capabilities() -> list[str]:
    """Capabilities this host can execute: every one up to what ATen dispatches to here."""
    host = torch.backends.cpu.get_cpu_capability()
    order = cpu_ext.CAPABILITY_ORDER
    return list(order[: order.index(host) + 1]) if host in order else ["DEFAULT"]


def test_capability_table_covers_what_torch_reports_on_x86():
    assert set(cpu_ext.CAPABILITY_ORDER) == set(cpu_ext.CAPABILITY_FLAGS)
    assert cpu_ext.capability() in cpu_ext.CAPABILITY_FLAGS
    with pytest.raises(ValueError, match="unknown CPU capability"):
        cpu_ext.compiler_flags("AVX1024")


@needs_x86_compiler
@pytest.mark.parametrize("capability", cpu_ext.CAPABILITY_ORDER)
def test_source_compiles_for_every_capability_on_any_x86_host(capability):
    result = cpu_ext.compile_only(capability)
    assert result.returncode == 0, f"{capability} build fails:\n{result.stderr[-3000:]}"


@needs_x86_compiler
def test_compile_check_catches_an_isa_specific_error(tmp_path, monkeypatch):
    # a call that only the AVX-512 headers reject (their vec_reduce_all overload takes other argument types)
    broken = tmp_path / "broken.cpp"
    broken.write_text(cpu_ext.SOURCE.read_text().replace(
        "float mx = reduce_max(vmax);",
        "float mx = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);"))
    monkeypatch.setattr(cpu_ext, "SOURCE", broken)
    assert cpu_ext.compile_only("AVX2").returncode == 0
    assert cpu_ext.compile_only("AVX512").returncode != 0


_RUN_UNDER_CAPABILITY = textwrap.dedent("""
    import json, torch
    from diffusion_accel.kernels import BlockSparseMask, block_sparse_attention, cpu_ext, reference_attention
    g = torch.Generator().manual_seed(0)
    errors = []
    for lq, lk, bs, d in ((300, 260, 64, 64), (77, 130, 32, 40)):  # ragged lengths; D not a multiple of 16
        q, k, v = (torch.randn(2, 2, n, d, generator=g) for n in (lq, lk, lk))
        dense = torch.rand(2, 2, -(-lq // bs), -(-lk // bs), generator=g) < 0.5
        dense[..., 0, :] = False  # a query block that keeps nothing
        dense[..., -1, -1] = True
        mask = BlockSparseMask.from_dense(dense, bs, lq, lk)
        out, lse = block_sparse_attention(q, k, v, mask, backend="cpp", return_lse=True)
        ref, ref_lse = reference_attention(q.double(), k.double(), v.double(), mask)
        fin = torch.isfinite(ref_lse)
        lse_error = float((lse.double()[fin] - ref_lse[fin]).abs().max())
        errors.append(max(float((out.double() - ref).abs().max()), lse_error))
        assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "built_for": cpu_ext.capability(),
                      "error": max(errors)}))
""")


@needs_x86_compiler
@pytest.mark.parametrize("capability", cpu_ext.CAPABILITY_ORDER)
def test_kernel_runs_under_every_capability_the_host_executes(capability):
    if capability not in _host_capabilities():
        pytest.skip(f"this CPU cannot execute {capability} code (compile-only test above covers it)")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability.lower()}
    env.pop("DIFFUSION_ACCEL_NO_CPU_KERNEL", None)
    result = subprocess.run([sys.executable, "-c", _RUN_UNDER_CAPABILITY], capture_output=True, text=True,
                            env=env, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["capability"] == capability and report["built_for"] == capability
    assert report["error"] < 1e-4


def _fresh_kernel_loader(monkeypatch):
    """A cpu_kernel with an empty cache (the process's real one, and its loaded op, are restored afterwards)."""
    monkeypatch.setattr(cpu_ext, "cpu_kernel", functools.lru_cache(maxsize=1)(cpu_ext.cpu_kernel.__wrapped__))
    monkeypatch.setattr(cpu_ext, "_BUILD_ERROR", [])
    monkeypatch.setattr(cpu_ext, "_WARNED", [])
    monkeypatch.setattr(dispatch_mod, "_FLEX_BROKEN", {})


def _inputs():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 96, 16, generator=g) for _ in range(3))
    dense = torch.rand(1, 2, 3, 3, generator=g) < 0.6
    dense[..., -1, -1] = True
    return q, k, v, BlockSparseMask.from_dense(dense, 32, 96, 96)


def test_failed_build_warns_once_with_the_reason_and_the_fix_then_uses_flex(monkeypatch):
    import torch.utils.cpp_extension as cpp_extension

    _fresh_kernel_loader(monkeypatch)
    monkeypatch.delenv("DIFFUSION_ACCEL_NO_CPU_KERNEL", raising=False)

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: c++: command not found")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    q, k, v, mask = _inputs()
    with torch.inference_mode():
        with pytest.warns(RuntimeWarning, match=r"c\+\+: command not found.*Fix: install a C\+\+ compiler"):
            out = block_sparse_attention(q, k, v, mask)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the second call is silent
            again = block_sparse_attention(q, k, v, mask)
    ref = reference_attention(q, k, v, mask)[0]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, ref, atol=1e-5, rtol=1e-5)
    status = cpu_ext.status()
    assert status["backend"] == "flex" and "command not found" in status["why"] and "ninja" in status["why"]


def test_other_architectures_fall_back_without_a_warning(monkeypatch, recwarn):
    _fresh_kernel_loader(monkeypatch)
    monkeypatch.delenv("DIFFUSION_ACCEL_NO_CPU_KERNEL", raising=False)
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    q, k, v, mask = _inputs()
    with torch.inference_mode():
        out = block_sparse_attention(q, k, v, mask)
    torch.testing.assert_close(out, reference_attention(q, k, v, mask)[0], atol=1e-5, rtol=1e-5)
    assert cpu_ext.cpu_kernel() is None and "x86-64 only" in cpu_ext.build_error()
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    status = cpu_ext.status()
    assert status["backend"] == "flex" and "aarch64" in status["why"] and "none on this architecture" in status["why"]


def test_disabled_kernel_says_how_to_enable_it(monkeypatch):
    _fresh_kernel_loader(monkeypatch)
    monkeypatch.setenv("DIFFUSION_ACCEL_NO_CPU_KERNEL", "1")
    assert cpu_ext.status() == {"backend": "flex", "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                                "why": "C++ kernel unavailable: disabled by DIFFUSION_ACCEL_NO_CPU_KERNEL; "
                                       "fix: unset DIFFUSION_ACCEL_NO_CPU_KERNEL"}


def test_cli_info_names_the_attention_backend_and_why(capsys, monkeypatch):
    from diffusion_accel.cli import main

    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    expected = "cpp" if cpu_ext.cpu_kernel() is not None else "flex"
    assert info["attention (cpu)"].startswith(f"{expected}: ")
    assert torch.backends.cpu.get_cpu_capability() in info["attention (cpu)"]
    _fresh_kernel_loader(monkeypatch)
    monkeypatch.setenv("DIFFUSION_ACCEL_NO_CPU_KERNEL", "1")
    assert main(["info", "--json"]) == 0
    assert "flex: C++ kernel unavailable: disabled" in json.loads(capsys.readouterr().out)["attention (cpu)"]
