#!/usr/bin/env bash
# Install hexamoe's build and run dependencies from Debian 12 packages.
set -euo pipefail
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends \
  build-essential cmake ninja-build pkg-config \
  libtrilinos-kokkos-dev libtrilinos-kokkos-kernels-dev \
  libopenmpi-dev openmpi-bin libhdf5-openmpi-dev hdf5-tools \
  libgtest-dev libtomlplusplus-dev libcli11-dev libfmt-dev zlib1g-dev \
  libopenblas0-pthread dataset-fashion-mnist python3 >/dev/null
echo "hexamoe: dependencies installed"
