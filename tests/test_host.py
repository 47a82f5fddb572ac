"""How vdit sets up a CPU host: the command's restart on huge-page malloc, and XLA CPU devices from the config."""

import os
import subprocess
import sys
import warnings

import jax
import pytest

from vdit import cli
from vdit.sharding import request_cpu_devices

needs_glibc_hugepages = pytest.mark.skipif(not cli.hugepage_malloc_available(),
                                           reason="not Linux with glibc >= 2.35 and transparent huge pages")


def _python(code: str, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", "GLIBC_TUNABLES", "VDIT_HUGEPAGES")}
    out = subprocess.run([sys.executable, "-c", code], env={**base, "JAX_PLATFORMS": "cpu", **env},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@needs_glibc_hugepages
def test_the_command_restarts_once_with_huge_page_malloc_keeping_its_arguments():
    # The child prints its pid and tunables at every start, then runs the real entry point.
    code = ("import os, sys; print(os.getpid(), os.environ.get('GLIBC_TUNABLES'), sys.argv[1:]);"
            "from vdit.cli import main; sys.exit(main())")
    out = subprocess.run([sys.executable, "-c", code, "info", "--config", "tiny"],
                         env={k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "VDIT_HUGEPAGES")},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    first, second, *rest = out.stdout.splitlines()
    assert first.split(" ", 2) == [second.split()[0], "None", "['info', '--config', 'tiny']"]  # same process
    assert second.split(" ", 2)[1:] == [cli.HUGEPAGE_TUNABLE, "['info', '--config', 'tiny']"]
    assert rest[0].startswith("config tiny") and len(rest) > 1  # the command ran once, after the restart


def test_no_restart_when_the_user_chose_or_opted_out(monkeypatch):
    monkeypatch.setenv("VDIT_HUGEPAGES", "0")
    assert cli.hugepage_reexec_args() is None
    monkeypatch.delenv("VDIT_HUGEPAGES")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")
    assert cli.hugepage_reexec_args() is None


@needs_glibc_hugepages
def test_restart_keeps_the_users_other_tunables(monkeypatch):
    monkeypatch.delenv("VDIT_HUGEPAGES", raising=False)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=4")
    argv, env = cli.hugepage_reexec_args()
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=4:" + cli.HUGEPAGE_TUNABLE
    assert argv[0] == sys.executable and argv[1:] == sys.orig_argv[1:]


def test_main_with_arguments_never_restarts(monkeypatch, capsys):
    # Library callers (tests, notebooks) pass argv; only the console command restarts.
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("main(argv) restarted the process"))
    assert cli.main(["info", "--config", "tiny"]) == 0
    assert "config tiny" in capsys.readouterr().out


def test_cpu_devices_from_the_config_split_the_host():
    code = ("from vdit.sharding import request_cpu_devices; request_cpu_devices(2);"
            "import jax; print(jax.device_count())")
    assert _python(code).split() == ["2"]
    assert _python(code, JAX_NUM_CPU_DEVICES="3").split() == ["3"]  # the user's setting wins
    assert _python(code.replace("(2)", "(0)")).split() == ["1"]  # 0: JAX's default


def test_cpu_devices_on_a_started_backend_warn_and_keep_its_devices(monkeypatch):
    count = jax.device_count()
    monkeypatch.delenv("JAX_NUM_CPU_DEVICES", raising=False)
    with pytest.warns(RuntimeWarning, match=r"cpu_devices=3 not applied: .* set JAX_NUM_CPU_DEVICES=3"):
        request_cpu_devices(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        request_cpu_devices(jax.config.jax_num_cpu_devices)  # what it already has: nothing to say
    assert jax.device_count() == count
