# HexamoeInstall.cmake: what `cmake --install` puts in the prefix, and the
# package configuration that lets another CMake project `find_package(hexamoe)`.
#
#   bin/hexamoe                               the driver (installed by app/)
#   include/hexamoe/{core,parallel,io}/...    headers, included as "core/MoeLayer.hpp"
#   lib/libhexamoe_io.a                       hexamoe::io
#   lib/cmake/hexamoe/hexamoeConfig.cmake     + ConfigVersion, + Targets
#   share/hexamoe/inputs/*.toml               the ready-to-run decks
#   share/hexamoe/slurm/*.sbatch              the Slurm job scripts
#   share/doc/hexamoe/*.md                    the documentation
#
# Exported targets: hexamoe::core (header-only: views, kernels, MoE layer, on
# Kokkos) and hexamoe::io (static: decks, datasets, checkpoints). The small
# interface targets they link (hexamoe::kokkos, hexamoe::hdf5, and the warning
# flags, link-only) are exported with them because CMake needs every target in
# a link interface to be in an export set. A target added to the link of core
# or io must be added to _hexamoe_exported below.
include(CMakePackageConfigHelpers)

set(HEXAMOE_INSTALL_CMAKEDIR "${CMAKE_INSTALL_LIBDIR}/cmake/hexamoe"
    CACHE STRING "Where hexamoeConfig.cmake is installed, relative to the prefix")
set(HEXAMOE_INSTALL_DATADIR "${CMAKE_INSTALL_DATADIR}/hexamoe")

# Headers live under include/hexamoe so that "core/" and "io/" do not land at the
# top of a shared include directory.
target_include_directories(hexamoe_core INTERFACE $<INSTALL_INTERFACE:${CMAKE_INSTALL_INCLUDEDIR}/hexamoe>)
target_include_directories(hexamoe_io PUBLIC $<INSTALL_INTERFACE:${CMAKE_INSTALL_INCLUDEDIR}/hexamoe>)
install(DIRECTORY core/ DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}/hexamoe/core" FILES_MATCHING PATTERN "*.hpp")
install(DIRECTORY io/ DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}/hexamoe/io" FILES_MATCHING PATTERN "*.hpp")
# parallel/: header templates on top of core (MoE groups, the two modes, cache, planner).
install(DIRECTORY parallel/ DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}/hexamoe/parallel" FILES_MATCHING PATTERN "*.hpp")

set_target_properties(hexamoe_core PROPERTIES EXPORT_NAME core)
set_target_properties(hexamoe_io PROPERTIES EXPORT_NAME io)
set_target_properties(hexamoe_kokkos PROPERTIES EXPORT_NAME kokkos)
set_target_properties(hexamoe_hdf5 PROPERTIES EXPORT_NAME hdf5)
set_target_properties(hexamoe_warnings PROPERTIES EXPORT_NAME build_warnings)
set(_hexamoe_exported hexamoe_core hexamoe_io hexamoe_kokkos hexamoe_hdf5 hexamoe_warnings)
install(TARGETS ${_hexamoe_exported} EXPORT hexamoeTargets
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
        LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
)
install(EXPORT hexamoeTargets NAMESPACE hexamoe:: DESTINATION "${HEXAMOE_INSTALL_CMAKEDIR}")

# What the config file needs to find the same dependencies again.
get_filename_component(HEXAMOE_KOKKOS_DIR_HINT "${Kokkos_DIR}" ABSOLUTE)
configure_package_config_file(cmake/hexamoeConfig.cmake.in "${PROJECT_BINARY_DIR}/hexamoeConfig.cmake"
                              INSTALL_DESTINATION "${HEXAMOE_INSTALL_CMAKEDIR}")
# 0.x: a minor release may break the API.
write_basic_package_version_file("${PROJECT_BINARY_DIR}/hexamoeConfigVersion.cmake"
                                 VERSION ${PROJECT_VERSION} COMPATIBILITY SameMinorVersion)
install(FILES "${PROJECT_BINARY_DIR}/hexamoeConfig.cmake" "${PROJECT_BINARY_DIR}/hexamoeConfigVersion.cmake"
        DESTINATION "${HEXAMOE_INSTALL_CMAKEDIR}")

# Decks, job scripts, documentation.
install(DIRECTORY inputs/ DESTINATION "${HEXAMOE_INSTALL_DATADIR}/inputs" FILES_MATCHING PATTERN "*.toml")
install(DIRECTORY slurm/ DESTINATION "${HEXAMOE_INSTALL_DATADIR}/slurm" USE_SOURCE_PERMISSIONS
        FILES_MATCHING PATTERN "*.sbatch")
install(DIRECTORY docs/ DESTINATION "${CMAKE_INSTALL_DOCDIR}" FILES_MATCHING PATTERN "*.md")
