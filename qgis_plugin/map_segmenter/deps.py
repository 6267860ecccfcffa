"""Optional speed-ups for QGIS's Python, installed into a folder of the plugin's own.

QGIS's Python has numpy and GDAL's bindings but, as a rule, neither ``onnxruntime`` (the fast network
backend) nor ``threadpoolctl`` (which lets the numpy backend run windows in parallel). This module
installs both with QGIS's own Python's pip into a private folder::

    python -m pip install --target DIR --no-deps --only-binary=:all: onnxruntime threadpoolctl

``--no-deps`` is deliberate: pip would otherwise pull a numpy into DIR, shadowing QGIS's own numpy
(which GDAL's bindings and QGIS's other plugins are built against). onnxruntime's declared
dependencies (flatbuffers, packaging, protobuf; sympy for an extra) are not needed to run a model:
``import onnxruntime`` and ``InferenceSession.run`` use none of them (they serve its conversion and
quantisation tools), so they are not installed.

The folder is ``<QGIS profile>/python/map_segmenter_deps/pyX.Y`` (``MAPSEG_QGIS_DEPS`` overrides it):

* in the profile, not in the plugin's folder, because QGIS deletes and rewrites the plugin's folder on
  every update or reinstall of the plugin: a 28 MB download would be lost each time;
* one folder per Python version (``pyX.Y``), because onnxruntime is a compiled wheel for one Python
  ABI: after a QGIS upgrade to another Python, the old folder is left alone and ``missing()`` asks again;
* ``activate()`` (called when the plugin loads, from runtime.py) *appends* it to ``sys.path``, so it can
  never shadow a package QGIS's Python already has.

An install goes into a fresh sibling folder, is checked in a separate interpreter (onnxruntime imports
and runs, numpy is still QGIS's own) and only then replaces DIR: a failed or interrupted install
leaves the previous state.
"""
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys

PACKAGES = ("onnxruntime", "threadpoolctl")
ENV_DIR = "MAPSEG_QGIS_DEPS"
_PYVER = f"py{sys.version_info[0]}.{sys.version_info[1]}"


class DepsError(Exception):
    """An install that could not be done; the message says why and what to do."""


def deps_dir():
    """The private folder (see the module's docstring); ``MAPSEG_QGIS_DEPS`` overrides it."""
    if os.environ.get(ENV_DIR):
        return os.path.abspath(os.environ[ENV_DIR])
    try:
        from qgis.core import QgsApplication
        profile = QgsApplication.qgisSettingsDirPath()
    except ImportError:  # outside QGIS (a plain Python using the plugin's runtime)
        profile = ""
    if not profile:
        profile = os.path.join(os.path.expanduser("~"), ".local", "share", "QGIS", "QGIS3", "profiles", "default")
    return os.path.join(profile, "python", "map_segmenter_deps", _PYVER)


def activate(path=None):
    """Append the private folder to ``sys.path`` (if it exists and is not there yet); True if it is on it."""
    path = os.path.abspath(path or deps_dir())
    if not os.path.isdir(path):
        return False
    if path not in sys.path:
        sys.path.append(path)
        importlib.invalidate_caches()
    return True


def missing():
    """Those of ``PACKAGES`` that QGIS's Python cannot import (the private folder included)."""
    activate()
    importlib.invalidate_caches()
    return [name for name in PACKAGES if importlib.util.find_spec(name) is None]


def where(name):
    """(version, folder it is imported from) of an importable package, else None."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin:
        return None
    try:
        version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    module = os.path.abspath(spec.origin)   # a package's __init__.py, or a single module's file
    return version, os.path.dirname(os.path.dirname(module) if spec.submodule_search_locations else module)


def status_text():
    """One line for the user: the backend the algorithm's 'auto' will take, and where its packages come from."""
    activate()
    private = os.path.abspath(deps_dir())
    ort = where("onnxruntime")
    tpc = where("threadpoolctl")

    def origin(found):
        return f"installed in {private}" if os.path.abspath(found[1]) == private else f"from {found[1]}"

    if ort:
        text = f"backend: onnx (onnxruntime {ort[0]} {origin(ort)})"
    else:
        text = ("backend: numpy, one window at a time (onnxruntime is not installed: "
                "install it for a several times faster run)" if not tpc
                else "backend: numpy (onnxruntime is not installed: install it for a faster run)")
    if tpc and not ort:
        text += f"; threadpoolctl {tpc[0]} {origin(tpc)}"
    return text


# ------------------------------------------------------------------ which Python, which pip


def _probe(exe):
    """(major, minor, prefix) of an interpreter, or None if it does not run."""
    try:
        r = subprocess.run([exe, "-c", "import sys, json; print(json.dumps([*sys.version_info[:2], sys.prefix]))"],
                           capture_output=True, text=True, timeout=60, env=_clean_env())
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0:
        return None
    try:
        major, minor, prefix = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None
    return major, minor, prefix


def python_executable():
    """The interpreter QGIS's Python *is*, as a program pip can run under.

    Inside QGIS ``sys.executable`` is not to be trusted: in QGIS desktop or qgis_process (Python embedded
    in a C++ program) it is whatever ``python3`` comes first on PATH (here a pyenv shim of another Python),
    or QGIS's own program. The candidates below are checked to have this Python's version and prefix."""
    major, minor = sys.version_info[:2]
    names = [f"python{major}.{minor}", f"python{major}", "python"]
    candidates = []
    for base in dict.fromkeys((sys.exec_prefix, sys.prefix, getattr(sys, "base_exec_prefix", sys.exec_prefix))):
        for name in names:
            candidates += [os.path.join(base, "bin", name), os.path.join(base, name + ".exe")]
    candidates.append(sys.executable)
    want = (major, minor, os.path.realpath(sys.prefix))
    for exe in dict.fromkeys(candidates):
        if not exe or not os.path.isfile(exe):
            continue
        got = _probe(exe)
        if got and (got[0], got[1], os.path.realpath(got[2])) == want:
            return exe
    raise DepsError(f"cannot find the Python interpreter of this QGIS (Python {major}.{minor} in {sys.prefix}); "
                    f"install the packages by hand: {manual_command()}")


def _clean_env():
    env = dict(os.environ)
    for name in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PIP_TARGET", "PIP_PREFIX", "PIP_USER",
                 "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV"):
        env.pop(name, None)
    env["PYTHONNOUSERSITE"] = "1"  # pip and the check see QGIS's Python as QGIS does, not ~/.local
    return env


def manual_command(python="python3", target=None):
    return (f"{python} -m pip install --target \"{target or deps_dir()}\" --no-deps --only-binary=:all: "
            + " ".join(PACKAGES))


def pip_missing_message(python):
    """What to do when QGIS's Python has no pip."""
    if os.path.isfile("/etc/debian_version"):
        how = ("on Debian/Ubuntu: sudo apt install python3-pip (then press Install again; QGIS's numpy is "
               "not touched)")
    elif sys.platform == "win32":
        how = f"in the OSGeo4W Shell: \"{python}\" -m ensurepip --upgrade"
    else:
        how = f"{python} -m ensurepip --upgrade --user (or install pip with your system's package manager)"
    return (f"QGIS's Python ({python}) has no pip, so onnxruntime cannot be installed from QGIS. Install pip "
            f"{how}; or install the packages by hand with any pip for Python "
            f"{sys.version_info[0]}.{sys.version_info[1]}: {manual_command(python)}. Until then Map Segmenter "
            f"runs with its numpy backend (slower, same result).")


def has_pip(python):
    try:
        r = subprocess.run([python, "-m", "pip", "--version"], capture_output=True, text=True, timeout=120,
                           env=_clean_env())
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0


_CHECK = r"""
import json, sys
sys.path.append(sys.argv[1])
import numpy
out = {"numpy": [numpy.__version__, numpy.__file__]}
for name in sys.argv[2:]:
    mod = __import__(name)
    out[name] = [getattr(mod, "__version__", "?"), mod.__file__]
if "onnxruntime" in sys.argv[2:]:
    import onnxruntime as ort
    out["providers"] = ort.get_available_providers()
print(json.dumps(out))
"""


def _check(python, folder, packages):
    r = subprocess.run([python, "-c", _CHECK, folder, *packages], capture_output=True, text=True, timeout=300,
                       env=_clean_env())
    if r.returncode != 0:
        raise DepsError(f"the installed packages do not import in QGIS's Python: "
                        f"{(r.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def install(wheel_dir=None, log=print, target=None, python=None, packages=PACKAGES, timeout=1800):
    """Install ``packages`` into the private folder with QGIS's own Python's pip; returns a report dict.

    Blocking (pip's download and install: seconds to a minute): from the GUI, call it in a QgsTask's run().
    When it returns, the folder is on sys.path and the algorithm's 'auto' backend is onnx, no restart needed.

    ``wheel_dir``: a folder of wheels to install from, offline (``--no-index --find-links``).
    ``log``: called with each line of pip's output and with what is done.
    Raises DepsError with a message saying what to do (no pip, no network, no wheel for this Python ...)."""
    python = python or python_executable()
    target = os.path.abspath(target or deps_dir())
    if not has_pip(python):
        raise DepsError(pip_missing_message(python))
    before = _check(python, os.devnull, [])["numpy"]
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    fresh, old = target + ".new", target + ".old"
    for leftover in (fresh, old):  # from an interrupted install
        shutil.rmtree(leftover, ignore_errors=True)
    cmd = [python, "-m", "pip", "install", "--target", fresh, "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "--no-warn-script-location"]
    if wheel_dir:
        cmd += ["--no-index", "--find-links", os.path.abspath(wheel_dir)]
    cmd += list(packages)
    log("running: " + " ".join(cmd))
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_clean_env())
    except OSError as exc:
        raise DepsError(f"cannot run {python}: {exc}") from exc
    lines = []
    try:
        for line in proc.stdout:
            line = line.rstrip()
            lines.append(line)
            log(line)
        rc = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    try:
        if rc != 0:
            tail = " | ".join(line for line in lines[-6:] if line.strip())
            hint = ("; no wheel for this Python/platform in " + wheel_dir if wheel_dir
                    else "; is the network (PyPI) reachable from this computer?")
            raise DepsError(f"pip failed (exit {rc}): {tail}{hint}. By hand: {manual_command(python, target)}")
        if os.path.isdir(os.path.join(fresh, "numpy")):
            raise DepsError(f"pip put a numpy into {fresh}; refusing it (QGIS's own numpy must stay)")
        after = _check(python, fresh, list(packages))
        if after["numpy"] != before:
            raise DepsError(f"numpy changed from {before} to {after['numpy']}; refusing the install")
        try:
            if os.path.isdir(target):
                os.replace(target, old)
            os.replace(fresh, target)
        except OSError as exc:  # Windows: the old onnxruntime's DLLs are loaded by this QGIS
            raise DepsError(f"cannot replace {target} ({exc}): restart QGIS and install again") from exc
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(fresh, ignore_errors=True)
    activate(target)
    report = {"target": target, "python": python, "numpy": before, "providers": after.get("providers"),
              **{name: [after[name][0], target + after[name][1][len(fresh):]] for name in packages}}
    log("installed " + ", ".join(f"{name} {after[name][0]}" for name in packages) + f" in {target}; "
        f"numpy {before[0]} unchanged ({os.path.dirname(before[1])})")
    return report
