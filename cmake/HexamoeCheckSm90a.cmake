# Run at build time (cmake -P) by the hexamoe_check_sm90a target of a Hopper
# build configured with sm_90a code: fail before anything compiles when
# NVCC_APPEND_FLAGS no longer asks for it (docs/GPU.md).
if(NOT "$ENV{NVCC_APPEND_FLAGS}" MATCHES "compute_90a")
  message(FATAL_ERROR
    "hexamoe: this build was configured with sm_90a code "
    "(NVCC_APPEND_FLAGS=${HEXAMOE_CONFIGURED_FLAGS}), but NVCC_APPEND_FLAGS is "
    "'$ENV{NVCC_APPEND_FLAGS}' in this build's environment: nvcc would compile "
    "without the sm_90a pass and the bf16 expert GEMMs would lose wgmma. Export "
    "NVCC_APPEND_FLAGS=\"${HEXAMOE_CONFIGURED_FLAGS}\" again, or reconfigure "
    "without it for a build that uses mma.sync only.")
endif()
