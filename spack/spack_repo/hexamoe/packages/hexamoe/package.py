# package.py: the Spack package of hexamoe (Package API v2, Spack 1.0 and later).
#
# hexamoe has no published source archive yet: build it from a checkout, either
# through an environment in spack/envs/ (they `develop` the checkout they sit in)
# or with `spack develop`; a site with its own git remote sets
#   packages: {hexamoe: {package_attributes: {git: <remote>}}}
# in packages.yaml. docs/CLUSTER.md walks through both.

import os

from spack_repo.builtin.build_systems.cmake import CMakePackage
from spack_repo.builtin.build_systems.cuda import CudaPackage
from spack_repo.builtin.build_systems.rocm import ROCmPackage
from spack_repo.builtin.packages.kokkos.package import Kokkos

from spack.package import *


class Hexamoe(CMakePackage, CudaPackage, ROCmPackage):
    """HEXA-MoE: Mixture-of-Experts training with expert-specific operators
    (no padding, no capacity drops) on Kokkos, MPI and parallel HDF5."""

    version("main", branch="main")
    version("0.1.0", tag="v0.1.0")

    # MPI is not optional: MoE groups are communicators, even of one rank, so
    # there is no ~mpi build to offer and hence no mpi variant.
    variant("hdf5", default=True, description="Parallel HDF5 checkpoints and activation dumps")
    variant("kokkos-kernels", default=True, description="Kokkos Kernels (dense GEMM baseline of `hexamoe bench`)")
    variant("openmp", default=True, description="Kokkos' OpenMP host backend (threads within a rank)")

    # Kokkos builds for one GPU architecture at a time, so hexamoe takes one too
    # (CudaPackage and ROCmPackage declare lists).
    variant(
        "cuda_arch",
        description="CUDA architecture (one; passed to Kokkos)",
        values=("none",) + CudaPackage.cuda_arch_values,
        default="none",
        multi=False,
        sticky=True,
        when="+cuda",
    )
    variant(
        "amdgpu_target",
        description="AMD GPU architecture (one; passed to Kokkos)",
        values=("none",) + ROCmPackage.amdgpu_targets,
        default="none",
        multi=False,
        sticky=True,
        when="+rocm",
    )

    depends_on("c", type="build")  # FindHDF5 needs the C compiler
    depends_on("cxx", type="build")
    depends_on("cmake@3.16:", type="build")

    depends_on("mpi")
    depends_on("kokkos@3.7:")
    depends_on("kokkos-kernels", when="+kokkos-kernels")
    depends_on("hdf5+mpi", when="+hdf5")
    depends_on("tomlplusplus@3:")
    depends_on("cli11@2:")
    depends_on("zlib-api")
    depends_on("googletest", type="test")

    depends_on("kokkos+openmp", when="+openmp")

    # The backend is Kokkos': a GPU build needs a GPU Kokkos of the same
    # architecture, and a host build must not get one (it would need nvcc_wrapper).
    depends_on("kokkos~cuda", when="~cuda")
    depends_on("kokkos~rocm", when="~rocm")
    for _arch in CudaPackage.cuda_arch_values:
        depends_on(f"kokkos +cuda cuda_arch={_arch}", when=f"+cuda cuda_arch={_arch}")
        if _arch not in Kokkos.spack_cuda_arch_map:
            conflicts(f"cuda_arch={_arch}", when="+cuda", msg=f"Kokkos has no CUDA architecture for sm_{_arch}")
    for _target in ROCmPackage.amdgpu_targets:
        depends_on(f"kokkos +rocm amdgpu_target={_target}", when=f"+rocm amdgpu_target={_target}")
        if _target not in Kokkos.amdgpu_arch_map:
            conflicts(f"amdgpu_target={_target}", when="+rocm", msg=f"Kokkos does not support {_target}")

    # nvcc needs extended lambdas for KOKKOS_LAMBDA; Kokkos 5 always enables
    # them and dropped the variant.
    depends_on("kokkos+cuda_lambda", when="+cuda ^kokkos@:4")
    # hexamoe compiles its CUDA code through Kokkos' nvcc_wrapper.
    depends_on("kokkos+wrapper", when="+cuda")

    # Hopper's warpgroup tensor-core instructions (wgmma) need machine code for
    # the architecture-specific target sm_90a, besides the sm_90 code Kokkos'
    # flags give; nvcc adds it from NVCC_APPEND_FLAGS (nvcc_wrapper accepts one
    # architecture flag only). Without it the bf16 expert GEMMs use mma.sync.
    variant("wgmma", default=True, description="Also compile sm_90a code (wgmma path of the bf16 GEMMs)", when="+cuda cuda_arch=90")

    conflicts("+cuda", when="+rocm", msg="Kokkos has one device backend: choose +cuda or +rocm")
    conflicts("+cuda", when="cuda_arch=none", msg="+cuda needs cuda_arch=<sm>, e.g. cuda_arch=90")
    conflicts("+rocm", when="amdgpu_target=none", msg="+rocm needs amdgpu_target=<gfx>, e.g. amdgpu_target=gfx90a")

    def setup_build_environment(self, env):
        if self.spec.satisfies("+cuda cuda_arch=90 +wgmma"):
            env.append_flags("NVCC_APPEND_FLAGS", "-gencode=arch=compute_90a,code=sm_90a")

    def cmake_args(self):
        spec = self.spec
        args = [
            self.define("HEXAMOE_ENABLE_TESTS", self.run_tests),
            # The Slurm test installs Slurm with apt as root: never inside Spack.
            self.define("HEXAMOE_ENABLE_SLURM_TEST", False),
            # Spack picks the target flags; -march=native would tie the build to the build host.
            self.define("HEXAMOE_ENABLE_NATIVE", False),
            self.define_from_variant("HEXAMOE_REQUIRE_HDF5", "hdf5"),
            self.define_from_variant("HEXAMOE_REQUIRE_KOKKOSKERNELS", "kokkos-kernels"),
            self.define("Kokkos_ROOT", spec["kokkos"].prefix),
        ]
        # Variants off: do not let CMake find a system copy behind Spack's back.
        if spec.satisfies("~hdf5"):
            args.append(self.define("CMAKE_DISABLE_FIND_PACKAGE_HDF5", True))
        if spec.satisfies("~kokkos-kernels"):
            args.append(self.define("CMAKE_DISABLE_FIND_PACKAGE_KokkosKernels", True))
        if spec.satisfies("+cuda"):
            args.append(self.define("CMAKE_CXX_COMPILER", spec["kokkos"].kokkos_cxx))
        elif spec.satisfies("+rocm"):
            args.append(self.define("CMAKE_CXX_COMPILER", spec["hip"].hipcc))
        return args

    def test_quick(self):
        """check and train the installed quick deck for a few steps"""
        hexamoe = which(self.prefix.bin.hexamoe, required=True)
        deck = join_path(self.prefix.share.hexamoe.inputs, "quick.toml")

        with test_part(self, "test_quick_version", purpose="hexamoe --version runs"):
            out = hexamoe("--version", output=str.split, error=str.split)
            assert "hexamoe" in out, out

        with test_part(self, "test_quick_check", purpose="hexamoe check accepts quick.toml"):
            hexamoe("check", deck)

        with test_part(self, "test_quick_train", purpose="hexamoe train runs 3 steps of quick.toml"):
            outdir = "quick-out"
            hexamoe(
                "train",
                deck,
                "--set",
                "train.max_steps=3",
                "--set",
                f"run.output_dir={outdir}",
                output=str.split,
                error=str.split,
            )
            summary = join_path(outdir, "summary.json")
            assert os.path.isfile(summary), f"{summary} was not written"
