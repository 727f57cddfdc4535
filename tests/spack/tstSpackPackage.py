#!/usr/bin/env python3
"""tstSpackPackage.py: checks spack/spack_repo/hexamoe/packages/hexamoe/package.py
without Spack.

Spack cannot run here (no network), so the package file is executed against a
small fake of the Spack package API: the directives (version, variant,
depends_on, conflicts, requires, ...) record their calls, the build-system base
classes (CMakePackage, CudaPackage, ROCmPackage) declare what the real ones
declare, and a tiny spec-string parser checks every spec and when-clause. Then:

  * the variants, versions, dependencies, conflicts and when-clauses are the
    ones the package promises (every cuda_arch and amdgpu_target maps to a
    Kokkos dependency of that architecture, ...);
  * every spec string parses, names a known package, and uses variants that
    the package (or the dependency) has, with values it allows;
  * cmake_args() on fake concrete specs gives the expected -D options, and every
    HEXAMOE_* option it sets exists in the project's CMake files;
  * the checks catch mistakes: they are rerun on mutated copies of package.py
    (a misspelt dependency, a missing architecture, ...) and must fail there.

With --prefix PREFIX (an installed hexamoe), the package's smoke test method
is also run for real against that prefix.

Usage: tstSpackPackage.py [--package package.py] [--source-dir DIR] [--prefix PREFIX]
Exit status 0 when every check passes.
"""

import argparse
import contextlib
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import types

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE_DIR = os.path.dirname(os.path.dirname(HERE))


# ----------------------------------------------------------------------------
# A tiny Spack spec-string parser.
# ----------------------------------------------------------------------------
class SpecSyntaxError(Exception):
    pass


class Node:
    """One node of a spec: name (None for anonymous), versions, variants, compiler."""

    def __init__(self, name=None):
        self.name = name
        self.versions = []  # raw version constraints, without '@'
        self.variants = {}  # name -> True/False or tuple of string values
        self.compilers = []

    def __repr__(self):
        return f"Node({self.name!r}, {self.versions}, {self.variants})"


class Spec:
    def __init__(self, text):
        self.text = text
        self.root = Node()
        self.deps = {}  # name -> Node
        self._parse(text)

    _TOKEN = re.compile(
        r"""\s*(?:
          (?P<dep>\^)
        | (?P<version>@=?[A-Za-z0-9_.:,-]+)
        | (?P<bool>[+~][A-Za-z_][A-Za-z0-9_-]*)
        | (?P<kv>[A-Za-z_][A-Za-z0-9_-]*==?[^\s\^%@~]+)
        | (?P<compiler>%[A-Za-z0-9_=.-]+(?:@[A-Za-z0-9_.:,-]+)?)
        | (?P<name>[a-z0-9][a-z0-9-]*(?:\.[a-z0-9][a-z0-9-]*)?)
        )""",
        re.VERBOSE,
    )

    def _parse(self, text):
        if not isinstance(text, str) or not text.strip():
            raise SpecSyntaxError(f"empty spec {text!r}")
        node = self.root
        pos, expect_dep_name, first = 0, False, True
        text = text.rstrip()
        while pos < len(text):
            m = self._TOKEN.match(text, pos)
            if not m or m.end() == pos:
                raise SpecSyntaxError(f"cannot parse {text!r} at {text[pos:]!r}")
            pos = m.end()
            kind = m.lastgroup
            tok = m.group(kind)
            if expect_dep_name:
                if kind != "name":
                    raise SpecSyntaxError(f"'^' must be followed by a package name in {text!r}")
                node = self.deps.setdefault(tok, Node(tok))
                expect_dep_name = False
                continue
            if kind == "dep":
                expect_dep_name = True
            elif kind == "name":
                if not first or node.name is not None:
                    raise SpecSyntaxError(f"unexpected name {tok!r} in {text!r} (a dependency needs '^')")
                node.name = tok
            elif kind == "version":
                node.versions.append(tok[1:])
            elif kind == "bool":
                self._set(node, tok[1:], tok[0] == "+", text)
            elif kind == "kv":
                key, value = re.split(r"==?", tok, maxsplit=1)
                self._set(node, key, tuple(value.split(",")), text)
            elif kind == "compiler":
                node.compilers.append(tok[1:])
            first = False
        if expect_dep_name:
            raise SpecSyntaxError(f"dangling '^' in {text!r}")

    @staticmethod
    def _set(node, key, value, text):
        if key in node.variants and node.variants[key] != value:
            raise SpecSyntaxError(f"variant {key} given twice in {text!r}")
        node.variants[key] = value

    def nodes(self):
        yield self.root
        yield from self.deps.values()


def _vkey(v):
    """Version to a comparable tuple; non-numeric parts (branches) sort above numbers."""
    parts = []
    for p in re.split(r"[.-]", v.lstrip("=")):
        parts.append((0, int(p), "") if p.isdigit() else (1, 0, p))
    return tuple(parts)


def version_satisfies(version, constraint):
    """Spack's rules, enough for us: '3.7:' '@:4' '3:4.2' '=main' 'main' '4.5.01'."""
    for alt in constraint.split(","):
        if alt.startswith("="):
            if version == alt[1:]:
                return True
            continue
        if ":" in alt:
            lo, hi = alt.split(":", 1)
            v = _vkey(version)
            if lo and v < _vkey(lo):
                continue
            if hi and v > _vkey(hi) and v[: len(_vkey(hi))] != _vkey(hi):
                continue
            return True
        if version == alt or _vkey(version)[: len(_vkey(alt))] == _vkey(alt):
            return True
    return False


def node_satisfies(concrete, constraint):
    """concrete: a Node with exact values; constraint: a Node (abstract)."""
    if constraint.name and concrete.name and constraint.name != concrete.name:
        return False
    for c in constraint.versions:
        if not concrete.versions or not version_satisfies(concrete.versions[0].lstrip("="), c):
            return False
    for key, want in constraint.variants.items():
        if key not in concrete.variants:
            return False
        have = concrete.variants[key]
        if isinstance(want, bool) or isinstance(have, bool):
            if have != want:
                return False
        elif not set(want) <= set(have):
            return False
    return True


# ----------------------------------------------------------------------------
# The fake Spack package API.
# ----------------------------------------------------------------------------
class Directive:
    def __init__(self, kind, args, kwargs, when):
        self.kind, self.args, self.kwargs, self.when = kind, args, kwargs, when

    def __repr__(self):
        return f"{self.kind}{self.args} when={self.when!r}"


_pending = []  # directives of the class body being executed
_when_stack = []
_default_args = []


def _record(kind, args, kwargs):
    when = kwargs.pop("when", None)
    conditions = [w for w in _when_stack] + ([when] if when else [])
    for d in _default_args:
        for k, v in d.items():
            kwargs.setdefault(k, v)
    _pending.append(Directive(kind, args, kwargs, " ".join(conditions) if conditions else None))


class _Meta(type):
    def __new__(mcs, name, bases, attrs):
        global _pending
        own, _pending = _pending, []
        cls = super().__new__(mcs, name, bases, attrs)
        inherited = []
        for b in reversed(cls.__mro__[1:]):
            inherited += b.__dict__.get("_own_directives", [])
        cls._own_directives = own
        cls.directives = inherited + own
        return cls


class AnyCombinationOf:
    def __init__(self, *values):
        self.values = ("none",) + tuple(values)


def any_combination_of(*values):
    return AnyCombinationOf(*values)


@contextlib.contextmanager
def when(condition):
    _when_stack.append(condition)
    try:
        yield
    finally:
        _when_stack.pop()


@contextlib.contextmanager
def default_args(**kwargs):
    _default_args.append(kwargs)
    try:
        yield
    finally:
        _default_args.pop()


def _directive(kind):
    def f(*args, **kwargs):
        _record(kind, args, dict(kwargs))

    f.__name__ = kind
    return f


version = _directive("version")
variant = _directive("variant")
depends_on = _directive("depends_on")
conflicts = _directive("conflicts")
requires = _directive("requires")
provides = _directive("provides")
patch = _directive("patch")
resource = _directive("resource")
maintainers = _directive("maintainers")
license = _directive("license")  # noqa: A001 (Spack's name)


class InstallError(Exception):
    pass


class SkipTest(Exception):
    pass


class Prefix(str):
    """A path whose attributes are subdirectories, as Spack's Prefix."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return Prefix(os.path.join(self, name))


def join_path(*parts):
    return os.path.join(*parts)


class Executable:
    def __init__(self, path):
        self.path = path
        self.calls = []

    def __call__(self, *args, output=None, error=None, fail_on_error=True):
        self.calls.append(args)
        proc = subprocess.run([self.path, *args], capture_output=True, text=True, timeout=600)
        if fail_on_error and proc.returncode != 0:
            raise RuntimeError(f"{self.path} {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
        if output is str.split or output is str:
            return proc.stdout + (proc.stderr if error in (str, str.split) else "")
        return None


def which(*names, required=False, path=None):
    for n in names:
        p = n if os.path.isabs(n) else None
        if p and os.access(p, os.X_OK):
            return Executable(p)
    if required:
        raise RuntimeError(f"required executable not found: {names}")
    return None


_test_parts = []


@contextlib.contextmanager
def test_part(pkg, test_name, purpose="", work_dir=".", verbose=False):
    if not test_name.startswith("test_"):
        raise AssertionError(f"test part name {test_name!r} must start with 'test_'")
    _test_parts.append((test_name, purpose))
    yield


def run_after(*phases, when=None):
    return lambda f: f


run_before = run_after


class PackageBase(metaclass=_Meta):
    run_tests = False

    def __init__(self, spec, prefix="/fake/prefix/hexamoe"):
        self.spec = spec
        self.prefix = Prefix(prefix)

    @staticmethod
    def define(cmake_var, value):
        # As Spack's CMakeBuilder.define.
        if isinstance(value, bool):
            kind, value = "BOOL", ("ON" if value else "OFF")
        else:
            kind = "STRING"
            if isinstance(value, (list, tuple)):
                value = ";".join(str(v) for v in value)
            else:
                value = str(value)
        return f"-D{cmake_var}:{kind}={value}"

    def define_from_variant(self, cmake_var, variant=None):
        variant = variant or cmake_var.lower()
        if variant not in declared_variants(type(self)):
            raise KeyError(f"{variant!r} is not a variant of {type(self).__name__}")
        if variant not in self.spec.root.variants:
            return ""
        value = self.spec.root.variants[variant]
        if not isinstance(value, bool):
            value = list(value) if len(value) > 1 else value[0]
        return self.define(cmake_var, value)


class CMakePackage(PackageBase):
    build_system_class = "CMakePackage"
    depends_on("cmake", type="build")


# Values as in Spack's builtin build_systems/cuda.py and rocm.py.
_CUDA_ARCHS = (
    "10 11 12 13 20 21 30 32 35 37 50 52 53 60 61 62 70 72 75 80 86 87 89 90 90a "
    "100 100a 100f 101 101a 101f 103 103a 103f 110 110a 110f 120 120a 120f 121 121a 121f"
).split()
_AMDGPU_TARGETS = (
    "gfx701 gfx801 gfx802 gfx803 gfx900 gfx900:xnack- gfx902 gfx904 gfx906 gfx906:xnack- "
    "gfx908 gfx908:xnack- gfx909 gfx90a gfx90a:xnack- gfx90a:xnack+ gfx90c gfx940 gfx941 "
    "gfx942 gfx950 gfx1010 gfx1011 gfx1012 gfx1013 gfx1030 gfx1031 gfx1032 gfx1033 gfx1034 "
    "gfx1035 gfx1036 gfx1100 gfx1101 gfx1102 gfx1103 gfx1150 gfx1151 gfx1152 gfx1153 gfx1200 "
    "gfx1201 gfx1250 gfx1251"
).split()


class CudaPackage(PackageBase):
    cuda_arch_values = tuple(_CUDA_ARCHS)
    variant("cuda", default=False, description="Build with CUDA")
    variant("cuda_arch", description="CUDA architecture", values=any_combination_of(*_CUDA_ARCHS),
            sticky=True, when="+cuda")
    depends_on("cuda", when="+cuda")


class ROCmPackage(PackageBase):
    amdgpu_targets = tuple(_AMDGPU_TARGETS)
    variant("rocm", default=False, description="Enable ROCm support")
    variant("amdgpu_target", description="AMD GPU architecture", values=any_combination_of(*_AMDGPU_TARGETS),
            sticky=True, when="+rocm")
    depends_on("hip-lang", type="build", when="+rocm")
    conflicts("amdgpu_target=none", when="+rocm")


class Kokkos:
    """What hexamoe reads of Spack's Kokkos package (its architecture maps)."""

    spack_cuda_arch_map = {
        "30": "kepler30", "32": "kepler32", "35": "kepler35", "37": "kepler37", "50": "maxwell50",
        "52": "maxwell52", "53": "maxwell53", "60": "pascal60", "61": "pascal61", "70": "volta70",
        "72": "volta72", "75": "turing75", "80": "ampere80", "86": "ampere86", "87": "ampere87",
        "89": "ada89", "90": "hopper90", "100": "blackwell100", "120": "blackwell120",
    }
    amdgpu_arch_map = {
        "gfx900": "vega900", "gfx906": "vega906", "gfx908": "vega908", "gfx90a": "vega90A",
        "gfx940": "amd_gfx940", "gfx942": "amd_gfx942", "gfx1030": "navi1030", "gfx1100": "navi1100",
    }


# Variants of the dependencies that hexamoe constrains (from Spack's builtin
# packages); a constraint on a variant not listed here is a mistake.
KNOWN_PACKAGES = {
    "kokkos": {
        "cuda": None, "rocm": None, "openmp": None, "serial": None, "threads": None, "sycl": None,
        "wrapper": None, "cuda_lambda": "@:4", "cuda_constexpr": None, "cuda_uvm": "@:4",
        "cuda_relocatable_device_code": None, "cmake_lang": None, "shared": None, "pic": None,
        "cuda_arch": ("none",) + tuple(_CUDA_ARCHS), "amdgpu_target": ("none",) + tuple(_AMDGPU_TARGETS),
        "cxxstd": ("14", "17", "20", "23"), "debug": None, "hwloc": None,
    },
    "kokkos-kernels": {"shared": None, "openmp": None, "cuda": None},
    "hdf5": {"mpi": None, "cxx": None, "fortran": None, "hl": None, "shared": None, "threadsafe": None},
    "mpi": {}, "openmpi": {"cuda": None, "rocm": None, "schedulers": None}, "mpich": {},
    "tomlplusplus": {}, "cli11": {}, "zlib-api": {}, "googletest": {}, "cmake": {},
    "cuda": {}, "hip": {}, "hip-lang": {}, "c": {}, "cxx": {}, "llvm-amdgpu": {},
}


def _make_fake_modules():
    spack = types.ModuleType("spack")
    spack.__path__ = []
    pkg = types.ModuleType("spack.package")
    exported = dict(
        PackageBase=PackageBase, version=version, variant=variant, depends_on=depends_on,
        conflicts=conflicts, requires=requires, provides=provides, patch=patch, resource=resource,
        maintainers=maintainers, license=license, when=when, default_args=default_args,
        any_combination_of=any_combination_of, InstallError=InstallError, SkipTest=SkipTest,
        join_path=join_path, which=which, test_part=test_part, run_after=run_after,
        run_before=run_before, Prefix=Prefix, Executable=Executable,
    )
    pkg.__dict__.update(exported)
    pkg.__all__ = list(exported)
    spack.package = pkg
    mods = {"spack": spack, "spack.package": pkg}

    def module(name, **attrs):
        m = types.ModuleType(name)
        m.__path__ = []
        m.__dict__.update(attrs)
        mods[name] = m
        return m

    module("spack_repo")
    module("spack_repo.builtin")
    module("spack_repo.builtin.build_systems")
    module("spack_repo.builtin.build_systems.cmake", CMakePackage=CMakePackage)
    module("spack_repo.builtin.build_systems.cuda", CudaPackage=CudaPackage)
    module("spack_repo.builtin.build_systems.rocm", ROCmPackage=ROCmPackage)
    module("spack_repo.builtin.packages")
    module("spack_repo.builtin.packages.kokkos")
    module("spack_repo.builtin.packages.kokkos.package", Kokkos=Kokkos)
    return mods


def load_package(path):
    """Executes package.py against the fakes; returns the Hexamoe class."""
    global _pending
    _pending = []
    _when_stack.clear()
    _default_args.clear()
    saved = {k: sys.modules.get(k) for k in _make_fake_modules()}
    sys.modules.update(_make_fake_modules())
    try:
        spec = importlib.util.spec_from_file_location("fake_hexamoe_package", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    if _when_stack or _default_args:
        raise AssertionError("when()/default_args() context left open")
    return mod.Hexamoe


# ----------------------------------------------------------------------------
# Checks.
# ----------------------------------------------------------------------------
def declared_variants(cls):
    """variant name -> (kwargs, when); the last declaration wins (as in Spack)."""
    out = {}
    for d in cls.directives:
        if d.kind == "variant":
            out[d.args[0]] = (d.kwargs, d.when)
    return out


def variant_values(kwargs):
    values = kwargs.get("values")
    if values is None:
        return None  # boolean
    if isinstance(values, AnyCombinationOf):
        return values.values
    return tuple(values)


class Checker:
    def __init__(self, cls):
        self.cls = cls
        self.failures = []
        self.variants = declared_variants(cls)
        self.by_kind = {}
        for d in cls.directives:
            self.by_kind.setdefault(d.kind, []).append(d)

    def fail(self, msg):
        self.failures.append(msg)

    def check(self, cond, msg):
        if not cond:
            self.fail(msg)
        return cond

    # -- spec strings -------------------------------------------------------
    def parse(self, text, where):
        try:
            return Spec(text)
        except SpecSyntaxError as e:
            self.fail(f"{where}: {e}")
            return None

    def check_own_node(self, node, where):
        """An anonymous or 'hexamoe' node: its variants must be hexamoe's, with allowed values."""
        for key, value in node.variants.items():
            if key not in self.variants:
                self.fail(f"{where}: hexamoe has no variant {key!r}")
                continue
            allowed = variant_values(self.variants[key][0])
            if allowed is None:
                self.check(isinstance(value, bool), f"{where}: {key} is a boolean variant")
            elif isinstance(value, bool):
                self.fail(f"{where}: {key} takes a value, not +/~")
            else:
                bad = [v for v in value if v not in allowed]
                self.check(not bad, f"{where}: {key}={','.join(bad)} is not an allowed value")

    def check_dep_node(self, node, where):
        if node.name not in KNOWN_PACKAGES:
            self.fail(f"{where}: unknown package {node.name!r}")
            return
        known = KNOWN_PACKAGES[node.name]
        for key, value in node.variants.items():
            if key not in known:
                self.fail(f"{where}: {node.name} has no variant {key!r}")
                continue
            rule = known[key]
            if isinstance(rule, tuple) and not isinstance(value, bool):
                bad = [v for v in value if v not in rule]
                self.check(not bad, f"{where}: {node.name} {key}={','.join(bad)} is not allowed")

    def check_when(self, when, where):
        if when is None:
            return None
        spec = self.parse(when, f"{where} when={when!r}")
        if spec is None:
            return None
        self.check(spec.root.name in (None, "hexamoe"), f"{where}: when={when!r} must constrain hexamoe")
        self.check_own_node(spec.root, f"{where} when={when!r}")
        for dep in spec.deps.values():
            self.check_dep_node(dep, f"{where} when={when!r}")
        return spec

    def check_all_spec_strings(self):
        for d in self.cls._own_directives:
            where = repr(d)
            if d.kind == "depends_on":
                spec = self.parse(d.args[0], where)
                if spec:
                    self.check(spec.root.name is not None, f"{where}: a dependency needs a package name")
                    self.check_dep_node(spec.root, where)
                    for dep in spec.deps.values():
                        self.check_dep_node(dep, where)
                types_ = d.kwargs.get("type", ("build", "link"))
                types_ = (types_,) if isinstance(types_, str) else types_
                self.check(set(types_) <= {"build", "link", "run", "test"}, f"{where}: bad dependency type {types_}")
            elif d.kind in ("conflicts", "requires"):
                for text in d.args:
                    spec = self.parse(text, where)
                    if spec:
                        self.check(spec.root.name in (None, "hexamoe"), f"{where}: must constrain hexamoe")
                        self.check_own_node(spec.root, where)
                        for dep in spec.deps.values():
                            self.check_dep_node(dep, where)
            elif d.kind == "variant":
                kw = d.kwargs
                self.check(isinstance(kw.get("description"), str) and kw["description"], f"{where}: no description")
                allowed = variant_values(kw)
                if allowed is not None and "default" in kw:
                    self.check(kw["default"] in allowed, f"{where}: default {kw['default']!r} not in values")
            self.check_when(d.when, where)

    # -- what the package promises -------------------------------------------
    def deps(self, name=None):
        out = []
        for d in self.by_kind.get("depends_on", []):
            try:
                s = Spec(d.args[0])
            except SpecSyntaxError:
                continue
            if name is None or s.root.name == name:
                out.append((s, d))
        return out

    def has_dep(self, text, when=None, type_=None):
        want = Spec(text)
        for s, d in self.deps(want.root.name):
            if not node_satisfies(s.root, want.root) or not node_satisfies(want.root, s.root):
                continue
            if (d.when or None) != when and not (when and d.when and _same_when(d.when, when)):
                continue
            if type_ is not None:
                t = d.kwargs.get("type")
                t = (t,) if isinstance(t, str) else tuple(t or ())
                if type_ not in t:
                    continue
            return True
        return False

    def has_conflict(self, a, when):
        for d in self.by_kind.get("conflicts", []):
            pair = {_norm(d.args[0]), _norm(d.when or "")}
            if pair == {_norm(a), _norm(when)}:
                return True
        return False

    def check_promises(self):
        c = self.check
        cls = self.cls
        names = [b.__name__ for b in cls.__mro__]
        for base in ("CMakePackage", "CudaPackage", "ROCmPackage"):
            c(base in names, f"Hexamoe must derive from {base}")

        versions = {d.args[0]: d.kwargs for d in self.by_kind.get("version", [])}
        c(versions.get("main", {}).get("branch") == "main", "version('main', branch='main') missing")
        c("0.1.0" in versions, "version 0.1.0 missing")

        v = self.variants
        for name, default in (("hdf5", True), ("kokkos-kernels", True)):
            c(name in v and v[name][0].get("default") is default, f"variant {name} must default to {default}")
        # MPI cannot be turned off: either no mpi variant, or one whose ~mpi conflicts.
        if "mpi" in v:
            c(self.has_conflict("~mpi", ""), "an mpi variant must conflict with ~mpi (hexamoe needs MPI)")
        c(self.has_dep("mpi"), "depends_on('mpi') (unconditional) missing")

        c(v.get("cuda_arch", ({}, None))[0].get("multi") is False, "cuda_arch must be single-valued (Kokkos)")
        c(v.get("amdgpu_target", ({}, None))[0].get("multi") is False, "amdgpu_target must be single-valued")

        for arch in CudaPackage.cuda_arch_values:
            c(self.has_dep(f"kokkos +cuda cuda_arch={arch}", when=f"+cuda cuda_arch={arch}"),
              f"no kokkos +cuda cuda_arch={arch} dependency when +cuda cuda_arch={arch}")
            if arch not in Kokkos.spack_cuda_arch_map:
                c(self.has_conflict(f"cuda_arch={arch}", "+cuda"), f"cuda_arch={arch} (not in Kokkos) must conflict")
        for tgt in ROCmPackage.amdgpu_targets:
            c(self.has_dep(f"kokkos +rocm amdgpu_target={tgt}", when=f"+rocm amdgpu_target={tgt}"),
              f"no kokkos +rocm amdgpu_target={tgt} dependency when +rocm amdgpu_target={tgt}")
            if tgt not in Kokkos.amdgpu_arch_map:
                c(self.has_conflict(f"amdgpu_target={tgt}", "+rocm"), f"amdgpu_target={tgt} must conflict")

        # cuda_lambda: only for Kokkos 4 and older (the variant is gone in 5).
        lam = [(s, d) for s, d in self.deps("kokkos") if "cuda_lambda" in s.root.variants]
        c(lam, "kokkos+cuda_lambda dependency missing")
        for s, d in lam:
            w = Spec(d.when) if d.when else None
            kv = w.deps.get("kokkos").versions if w and "kokkos" in w.deps else []
            c(w is not None and w.root.variants.get("cuda") is True, f"{d}: cuda_lambda only when +cuda")
            c(kv and all(version_satisfies("4.7.01", x) and not version_satisfies("5.0.0", x) for x in kv),
              f"{d}: cuda_lambda must be limited to ^kokkos@:4")

        c(self.has_dep("kokkos+wrapper", when="+cuda"), "kokkos+wrapper (nvcc_wrapper) when +cuda missing")
        c(self.has_dep("kokkos~cuda", when="~cuda"), "kokkos~cuda when ~cuda missing")
        c(self.has_dep("hdf5+mpi", when="+hdf5"), "hdf5+mpi when +hdf5 missing")
        c(self.has_dep("kokkos-kernels", when="+kokkos-kernels"), "kokkos-kernels when +kokkos-kernels missing")
        for name in ("tomlplusplus", "cli11", "zlib-api", "kokkos"):
            c(any(d.when is None for _, d in self.deps(name)), f"unconditional depends_on({name!r}) missing")
        c(self.has_dep("googletest", type_="test"), "googletest as a test dependency missing")
        c(self.has_dep("c", type_="build") and self.has_dep("cxx", type_="build"), "c and cxx build deps missing")

        c(self.has_conflict("+cuda", "+rocm"), "conflicts('+cuda', when='+rocm') missing")
        c(self.has_conflict("+cuda", "cuda_arch=none"), "conflicts('+cuda', when='cuda_arch=none') missing")
        c(self.has_conflict("+rocm", "amdgpu_target=none"), "conflicts('+rocm', when='amdgpu_target=none') missing")

        tests = [n for n in vars(cls) if n.startswith("test_") and callable(getattr(cls, n))]
        c(tests, "no smoke test method (test_*)")
        for n in tests:
            c(getattr(cls, n).__doc__, f"{n} needs a docstring (spack test list shows it)")


def _norm(text):
    return " ".join(sorted(text.replace("+", " +").replace("~", " ~").split()))


def _same_when(a, b):
    return _norm(a) == _norm(b)


# ----------------------------------------------------------------------------
# cmake_args on fake concrete specs.
# ----------------------------------------------------------------------------
class FakeDep:
    def __init__(self, node):
        self.node = node
        self.prefix = Prefix(f"/fake/{node.name}")
        if node.name == "kokkos":
            self.kokkos_cxx = ("/fake/kokkos-nvcc-wrapper/bin/nvcc_wrapper" if node.variants.get("wrapper")
                               else "/fake/gcc/bin/g++")
        if node.name == "hip":
            self.hipcc = "/fake/hip/bin/hipcc"


class ConcreteSpec(Spec):
    """A 'concrete' spec for cmake_args: every hexamoe variant given, deps listed."""

    def __init__(self, text):
        super().__init__(text)
        self.variants = {k: types.SimpleNamespace(value=v) for k, v in self.root.variants.items()}

    def satisfies(self, constraint):
        want = Spec(constraint)
        if not node_satisfies(self.root, want.root):
            return False
        return all(n in self.deps and node_satisfies(self.deps[n], w) for n, w in want.deps.items())

    def __contains__(self, constraint):
        return self.satisfies(constraint)

    def __getitem__(self, name):
        if name not in self.deps:
            raise KeyError(f"{name} is not a dependency of {self.text!r}")
        return FakeDep(self.deps[name])


def cmake_defs(args):
    out = {}
    for a in args:
        if not a:
            continue
        m = re.match(r"-D([A-Za-z0-9_]+):(BOOL|STRING|PATH|FILEPATH)=(.*)$", a)
        assert m, f"malformed cmake argument {a!r}"
        out[m.group(1)] = m.group(3)
    return out


def check_cmake_args(cls, checker, source_dir):
    base = "+hdf5 +kokkos-kernels +openmp ~cuda ~rocm"
    cases = {
        "cpu": (f"hexamoe@=main {base} ^kokkos@=4.5.01+openmp~cuda ^hdf5+mpi ^kokkos-kernels",
                {"HEXAMOE_ENABLE_NATIVE": "OFF", "HEXAMOE_REQUIRE_HDF5": "ON",
                 "HEXAMOE_REQUIRE_KOKKOSKERNELS": "ON", "HEXAMOE_ENABLE_TESTS": "OFF",
                 "HEXAMOE_ENABLE_SLURM_TEST": "OFF", "Kokkos_ROOT": "/fake/kokkos"},
                ("CMAKE_CXX_COMPILER", "CMAKE_DISABLE_FIND_PACKAGE_HDF5")),
        "no-hdf5": ("hexamoe@=main ~hdf5 ~kokkos-kernels +openmp ~cuda ~rocm ^kokkos@=4.5.01+openmp~cuda",
                    {"HEXAMOE_REQUIRE_HDF5": "OFF", "CMAKE_DISABLE_FIND_PACKAGE_HDF5": "ON",
                     "HEXAMOE_REQUIRE_KOKKOSKERNELS": "OFF", "CMAKE_DISABLE_FIND_PACKAGE_KokkosKernels": "ON"},
                    ("CMAKE_CXX_COMPILER",)),
        "cuda": ("hexamoe@=main +hdf5 +kokkos-kernels +openmp +cuda cuda_arch=90 ~rocm "
                 "^kokkos@=4.5.01+cuda+wrapper+cuda_lambda cuda_arch=90 ^hdf5+mpi ^kokkos-kernels",
                 {"CMAKE_CXX_COMPILER": "/fake/kokkos-nvcc-wrapper/bin/nvcc_wrapper", "HEXAMOE_ENABLE_NATIVE": "OFF"},
                 ()),
        "rocm": ("hexamoe@=main +hdf5 +kokkos-kernels +openmp ~cuda +rocm amdgpu_target=gfx90a "
                 "^kokkos@=4.5.01+rocm amdgpu_target=gfx90a ^hip ^hdf5+mpi ^kokkos-kernels",
                 {"CMAKE_CXX_COMPILER": "/fake/hip/bin/hipcc"}, ()),
    }
    seen = set()
    for label, (text, want, absent) in cases.items():
        pkg = cls(ConcreteSpec(text))
        try:
            defs = cmake_defs(pkg.cmake_args())
        except Exception as e:  # noqa: BLE001 (report any failure of the package code)
            checker.fail(f"cmake_args() on the {label} spec raised {type(e).__name__}: {e}")
            continue
        seen |= set(defs)
        for k, v in want.items():
            checker.check(defs.get(k) == v, f"cmake_args() [{label}]: {k} = {defs.get(k)!r}, expected {v!r}")
        for k in absent:
            checker.check(k not in defs, f"cmake_args() [{label}]: {k} must not be set")

    # The build environment: sm_90a machine code (the wgmma path) for
    # cuda_arch=90 with +wgmma only.
    class FakeEnv:
        def __init__(self):
            self.vars = {}

        def append_flags(self, name, value, sep=" "):
            self.vars[name] = (self.vars[name] + sep if name in self.vars else "") + value

        def set(self, name, value):
            self.vars[name] = value

    gpu = "hexamoe@=main +hdf5 +kokkos-kernels +openmp +cuda ~rocm"
    env_cases = {
        "cuda 90 +wgmma": (f"{gpu} cuda_arch=90 +wgmma ^kokkos@=4.5.01+cuda+wrapper cuda_arch=90", True),
        "cuda 90 ~wgmma": (f"{gpu} cuda_arch=90 ~wgmma ^kokkos@=4.5.01+cuda+wrapper cuda_arch=90", False),
        "cuda 80": (f"{gpu} cuda_arch=80 ^kokkos@=4.5.01+cuda+wrapper cuda_arch=80", False),
        "cpu": (cases["cpu"][0], False),
    }
    for label, (text, want) in env_cases.items():
        env = FakeEnv()
        pkg = cls(ConcreteSpec(text))
        if hasattr(pkg, "setup_build_environment"):
            try:
                pkg.setup_build_environment(env)
            except Exception as e:  # noqa: BLE001
                checker.fail(f"setup_build_environment() on the {label} spec raised {type(e).__name__}: {e}")
                continue
        got = "-gencode=arch=compute_90a,code=sm_90a" in env.vars.get("NVCC_APPEND_FLAGS", "").split()
        checker.check(got == want, f"setup_build_environment() [{label}]: sm_90a code {'added' if got else 'not added'}, "
                                   f"expected {'added' if want else 'not added'}")

    # Every HEXAMOE_* cache variable the package sets must exist in the project.
    cmake_text = ""
    for root, _, files in os.walk(source_dir):
        rel = os.path.relpath(root, source_dir)
        if rel != "." and any(part.startswith(("build", ".")) for part in rel.split(os.sep)):
            continue
        for f in files:
            if f == "CMakeLists.txt" or f.endswith(".cmake"):
                with open(os.path.join(root, f), encoding="utf-8") as fh:
                    cmake_text += fh.read()
    for k in sorted(seen):
        if k.startswith("HEXAMOE_"):
            checker.check(re.search(r"\b" + k + r"\b", cmake_text) is not None,
                          f"cmake_args() sets {k}, which no CMake file of the project defines")


def check_package(path, source_dir):
    """All checks on one package file; returns the list of failures."""
    try:
        cls = load_package(path)
    except Exception as e:  # noqa: BLE001
        return [f"package.py does not load: {type(e).__name__}: {e}"]
    checker = Checker(cls)
    checker.check_all_spec_strings()
    checker.check_promises()
    check_cmake_args(cls, checker, source_dir)
    return checker.failures


# Mistakes the checks must catch: (description, old, new).
MUTATIONS = [
    ("misspelt dependency", 'depends_on("tomlplusplus@3:")', 'depends_on("toml-plus-plus@3:")'),
    ("unknown Kokkos variant", 'depends_on("kokkos+wrapper", when="+cuda")', 'depends_on("kokkos+wraper", when="+cuda")'),
    ("cuda_lambda for every Kokkos", 'when="+cuda ^kokkos@:4"', 'when="+cuda"'),
    ("one architecture dropped", 'for _arch in CudaPackage.cuda_arch_values:',
     'for _arch in CudaPackage.cuda_arch_values[:-1]:'),
    ("when-clause on an undeclared variant", 'when="+hdf5"', 'when="+hdf"'),
    ("unparsable spec", 'depends_on("hdf5+mpi"', 'depends_on("hdf5 +mpi ^"'),
    ("hdf5 variant ignored by cmake_args", 'self.define_from_variant("HEXAMOE_REQUIRE_HDF5", "hdf5")',
     'self.define("HEXAMOE_REQUIRE_HDF5", True)'),
    ("wrong compiler on CUDA", 'spec["kokkos"].kokkos_cxx', 'self.compiler.cxx if False else "c++"'),
    ("conflict dropped", 'conflicts("+cuda", when="+rocm"', 'conflicts("+cuda", when="+openmp"'),
]


def run_mutations(path, source_dir):
    with open(path, encoding="utf-8") as f:
        original = f.read()
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, old, new in MUTATIONS:
            if old not in original:
                problems.append(f"mutation '{label}': {old!r} not found in package.py (update MUTATIONS)")
                continue
            mutated = os.path.join(tmp, "package.py")
            with open(mutated, "w", encoding="utf-8") as f:
                f.write(original.replace(old, new, 1))
            if not check_package(mutated, source_dir):
                problems.append(f"mutation '{label}' was not caught")
    return problems


def run_smoke_test(path, prefix):
    """Runs the package's test_* methods against an installed prefix."""
    cls = load_package(path)
    pkg = cls(ConcreteSpec("hexamoe@=main +hdf5 ~cuda ~rocm"), prefix=prefix)
    failures = []
    with tempfile.TemporaryDirectory() as work:
        cwd = os.getcwd()
        os.chdir(work)
        try:
            for name in sorted(n for n in vars(cls) if n.startswith("test_")):
                try:
                    getattr(pkg, name)()
                    print(f"smoke test {name}: passed ({', '.join(p[0] for p in _test_parts)})")
                except Exception as e:  # noqa: BLE001
                    failures.append(f"smoke test {name} failed: {type(e).__name__}: {e}")
        finally:
            os.chdir(cwd)
    return failures


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--package", default=os.path.join(SOURCE_DIR, "spack", "spack_repo", "hexamoe", "packages",
                                                      "hexamoe", "package.py"))
    ap.add_argument("--source-dir", default=SOURCE_DIR)
    ap.add_argument("--prefix", help="an installed hexamoe: also run the package's smoke test against it")
    args = ap.parse_args()

    failures = check_package(args.package, args.source_dir)
    if not failures:
        failures += run_mutations(args.package, args.source_dir)
    if not failures and args.prefix:
        failures += run_smoke_test(args.package, args.prefix)
    for f in failures:
        print("FAIL:", f)
    if failures:
        print(f"0 passed, {len(failures)} failed")
        return 1
    cls = load_package(args.package)
    n_dep = sum(1 for d in cls.directives if d.kind == "depends_on")
    n_con = sum(1 for d in cls.directives if d.kind == "conflicts")
    print(f"package.py: {len(declared_variants(cls))} variants, {n_dep} depends_on, {n_con} conflicts checked; "
          f"{len(MUTATIONS)} mutations caught")
    return 0


if __name__ == "__main__":
    sys.exit(main())
