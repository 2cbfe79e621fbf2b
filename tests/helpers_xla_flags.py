"""XLA_FLAGS for the test processes, decided before JAX starts (XLA reads them once, at its first backend)."""

import glob
import importlib.util
import mmap
import os


def xla_knows(flag: str) -> bool:
    """Whether this jaxlib's XLA has the flag ``flag`` (an unknown flag in XLA_FLAGS aborts the process): its name
    in jaxlib's libraries."""
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or spec.origin is None:
        return False
    for path in glob.glob(os.path.join(os.path.dirname(spec.origin), "*.so")):
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data.find(flag.encode()) >= 0:
                return True
    return False


def gpu_plugin_installed() -> bool:
    """Whether a JAX GPU plugin is installed: it carries an XLA of its own that reads XLA_FLAGS too, and may not
    know a flag jaxlib knows (it then ends the process at its first backend, with exit 1 and nothing printed)."""
    try:
        import jax_plugins
    except ImportError:
        return False
    return any("cuda" in name or "rocm" in name for path in jax_plugins.__path__ for name in os.listdir(path))


def suite_xla_flags(environ) -> str:
    """``environ``'s XLA_FLAGS and the suite's: eight host devices, so the sharding tests can build meshes on a
    CPU-only machine (unsharded code still runs on device 0); XLA's CPU code generation through its elemental
    emitters rather than the fusion emitters: a third to half less compile time for every program (same IEEE
    arithmetic, runtime alike), unless JKV_TEST_FULL_OPT=1 asks for programs compiled as users compile them."""
    flags = [environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]
    cpu_only = environ.get("JAX_PLATFORMS") == "cpu" or not gpu_plugin_installed()
    if environ.get("JKV_TEST_FULL_OPT") != "1" and cpu_only and xla_knows("xla_cpu_use_fusion_emitters"):
        flags.append("--xla_cpu_use_fusion_emitters=false")
    return " ".join(flags).strip()
