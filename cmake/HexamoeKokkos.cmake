# HexamoeKokkos.cmake: find Kokkos (and, optionally, Kokkos Kernels) and expose
# them as hexamoe::kokkos and hexamoe::kokkoskernels.
#
# This is the one place that knows about the quirks of Debian's Trilinos-built
# Kokkos 3.4: its Kokkos::kokkos target lists a non-existent include directory
# (<prefix>/include instead of <prefix>/include/trilinos) and its kernels target
# is called trilinos_kokkoskernels. A standalone Kokkos 4.x/5.x (Spack, CUDA,
# HIP) needs none of this and is used exactly as installed.

find_package(Kokkos REQUIRED)

add_library(hexamoe_kokkos INTERFACE)
add_library(hexamoe::kokkos ALIAS hexamoe_kokkos)
target_link_libraries(hexamoe_kokkos INTERFACE Kokkos::kokkos)

if(Kokkos_INCLUDE_DIRS AND EXISTS "${Kokkos_INCLUDE_DIRS}/Kokkos_Core.hpp")
  # Trilinos' config exports the real header directory in Kokkos_INCLUDE_DIRS;
  # drop the stale directory from the imported target so that consumers (and
  # our install's exported targets) do not carry a path that does not exist.
  get_filename_component(_hexamoe_kokkos_inc "${Kokkos_INCLUDE_DIRS}" REALPATH)
  get_target_property(_hexamoe_kokkos_dirs Kokkos::kokkos INTERFACE_INCLUDE_DIRECTORIES)
  if(_hexamoe_kokkos_dirs)
    set(_hexamoe_kept "")
    foreach(_d IN LISTS _hexamoe_kokkos_dirs)
      if(EXISTS "${_d}" OR _d MATCHES "^\\$<")
        list(APPEND _hexamoe_kept "${_d}")
      endif()
    endforeach()
    set_target_properties(Kokkos::kokkos PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${_hexamoe_kept}")
  endif()
  target_include_directories(hexamoe_kokkos SYSTEM INTERFACE "${_hexamoe_kokkos_inc}")
endif()

# Kokkos Kernels: used when found (GEMM baseline of the benchmark).
set(HEXAMOE_REQUIRE_KOKKOSKERNELS OFF CACHE BOOL "Fail if Kokkos Kernels is not found")
find_package(KokkosKernels QUIET)
set(HEXAMOE_ENABLE_KOKKOSKERNELS OFF)
add_library(hexamoe_kokkoskernels INTERFACE)
add_library(hexamoe::kokkoskernels ALIAS hexamoe_kokkoskernels)
if(TARGET Kokkos::kokkoskernels)
  target_link_libraries(hexamoe_kokkoskernels INTERFACE Kokkos::kokkoskernels)
  set(HEXAMOE_ENABLE_KOKKOSKERNELS ON)
elseif(TARGET trilinos_kokkoskernels)
  target_link_libraries(hexamoe_kokkoskernels INTERFACE trilinos_kokkoskernels hexamoe::kokkos)
  set(HEXAMOE_ENABLE_KOKKOSKERNELS ON)
endif()
if(HEXAMOE_REQUIRE_KOKKOSKERNELS AND NOT HEXAMOE_ENABLE_KOKKOSKERNELS)
  message(FATAL_ERROR "HEXAMOE_REQUIRE_KOKKOSKERNELS is ON but Kokkos Kernels was not found")
endif()
if(HEXAMOE_ENABLE_KOKKOSKERNELS)
  target_compile_definitions(hexamoe_kokkoskernels INTERFACE HEXAMOE_ENABLE_KOKKOSKERNELS)
endif()

# The backends follow the installed Kokkos; report them.
set(HEXAMOE_KOKKOS_BACKENDS "")
foreach(_b SERIAL OPENMP THREADS CUDA HIP SYCL)
  if(Kokkos_ENABLE_${_b})
    list(APPEND HEXAMOE_KOKKOS_BACKENDS ${_b})
  endif()
endforeach()
if(NOT HEXAMOE_KOKKOS_BACKENDS)
  # Trilinos' config does not set Kokkos_ENABLE_<backend>; read the header.
  find_file(_hexamoe_kcfg KokkosCore_config.h HINTS ${Kokkos_INCLUDE_DIRS} NO_DEFAULT_PATH)
  if(_hexamoe_kcfg)
    file(STRINGS "${_hexamoe_kcfg}" _lines REGEX "^#define KOKKOS_ENABLE_(SERIAL|OPENMP|THREADS|CUDA|HIP|SYCL)$")
    foreach(_l IN LISTS _lines)
      string(REGEX REPLACE "^#define KOKKOS_ENABLE_" "" _b "${_l}")
      list(APPEND HEXAMOE_KOKKOS_BACKENDS ${_b})
    endforeach()
  endif()
endif()
message(STATUS "hexamoe: Kokkos ${Kokkos_VERSION} backends: ${HEXAMOE_KOKKOS_BACKENDS}; Kokkos Kernels: ${HEXAMOE_ENABLE_KOKKOSKERNELS}")

# Hopper: the bf16 expert GEMMs use wgmma where the build also generates
# sm_90a machine code. Kokkos' arch flag (sm_90) is its own and nvcc_wrapper
# takes one, so the extra target comes from nvcc's NVCC_APPEND_FLAGS, which
# must be set when building (docs/GPU.md); say which path this build gets.
# A build configured with it checks, before anything compiles, that the
# variable is still set: nvcc reads it per compile, so a later build from a
# shell without it would silently drop the sm_90a code of every file it
# recompiles (the bf16 GEMMs back on mma.sync: the layer's bf16 forward
# 13% slower on an H100, docs/PERFORMANCE.md).
if(Kokkos_ENABLE_CUDA AND "HOPPER90" IN_LIST Kokkos_ARCH)
  if("$ENV{NVCC_APPEND_FLAGS}" MATCHES "compute_90a")
    message(STATUS "hexamoe: sm_90a code requested (NVCC_APPEND_FLAGS): bf16 expert GEMMs with wgmma")
    add_custom_target(hexamoe_check_sm90a ALL
      COMMAND ${CMAKE_COMMAND} "-DHEXAMOE_CONFIGURED_FLAGS=$ENV{NVCC_APPEND_FLAGS}"
              -P "${CMAKE_CURRENT_LIST_DIR}/HexamoeCheckSm90a.cmake"
      COMMENT "hexamoe: checking NVCC_APPEND_FLAGS for the sm_90a code this build was configured with"
      VERBATIM)
    set(HEXAMOE_SM90A_CHECK hexamoe_check_sm90a)
  else()
    message(STATUS "hexamoe: Hopper build without sm_90a code: bf16 expert GEMMs with mma.sync; for wgmma set "
                   "NVCC_APPEND_FLAGS=-gencode=arch=compute_90a,code=sm_90a when building (docs/GPU.md)")
  endif()
endif()
