#!/usr/bin/env bash
# run_install_test.sh: the install tree of hexamoe, tested as a user gets it.
#
#   run_install_test.sh tree BUILD_DIR PREFIX [PYTHON SOURCE_DIR]
#       cmake --install BUILD_DIR --prefix PREFIX (PREFIX emptied first), check
#       the files, run the installed binary: --version, `check` on the
#       installed quick deck (0) and on a broken deck (2), `train` for 3 steps;
#       with PYTHON, also the Spack package's smoke test against PREFIX.
#   run_install_test.sh downstream BUILD_DIR PREFIX CMAKE GENERATOR CC CXX
#       configure, build and run tests/install/downstream against PREFIX
#       (find_package(hexamoe), hexamoe::core and hexamoe::io).
#
# Every step prints what it does; the first failure stops with status 1.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
mode="${1:?usage: run_install_test.sh tree|downstream BUILD_DIR PREFIX ...}"
build="$(cd "${2:?build dir}" && pwd)"
prefix="${3:?prefix}"

fail() { echo "FAIL: $*" >&2; exit 1; }
step() { echo "--- $*"; }

# Run a command with a time bound; print its output on failure.
run() {
  local log
  log="$(mktemp)"
  if ! timeout 300 "$@" >"$log" 2>&1; then
    cat "$log"
    rm -f "$log"
    return 1
  fi
  cat "$log"
  rm -f "$log"
}

case "$mode" in
tree)
  python="${4:-}"
  source_dir="${5:-}"
  rm -rf "$prefix"
  step "cmake --install $build --prefix $prefix"
  run cmake --install "$build" --prefix "$prefix" >/dev/null || fail "cmake --install failed"

  libdir=lib
  [ -d "$prefix/lib64/cmake/hexamoe" ] && libdir=lib64
  for f in bin/hexamoe share/hexamoe/inputs/quick.toml share/hexamoe/inputs/fashion-mnist.toml \
    share/hexamoe/slurm/hexamoe-cpu.sbatch share/hexamoe/slurm/hexamoe-gpu.sbatch \
    share/doc/hexamoe/DECK.md share/doc/hexamoe/CLUSTER.md \
    "$libdir/cmake/hexamoe/hexamoeConfig.cmake" "$libdir/cmake/hexamoe/hexamoeConfigVersion.cmake" \
    "$libdir/cmake/hexamoe/hexamoeTargets.cmake" "$libdir/libhexamoe_io.a" \
    include/hexamoe/core/RoutingIndex.hpp include/hexamoe/core/MoeLayer.hpp include/hexamoe/io/Deck.hpp; do
    [ -e "$prefix/$f" ] || fail "$f is not in the install tree"
  done
  [ -x "$prefix/bin/hexamoe" ] || fail "bin/hexamoe is not executable"
  ls "$prefix"/include/hexamoe/parallel/*.hpp >/dev/null 2>&1 || fail "no parallel/ headers in include/hexamoe"
  echo "install tree: all expected files present"

  hexamoe="$prefix/bin/hexamoe"
  deck="$prefix/share/hexamoe/inputs/quick.toml"
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  cd "$work"

  step "hexamoe --version"
  run "$hexamoe" --version | grep -q "^hexamoe " || fail "--version does not print 'hexamoe <version>'"

  step "hexamoe check (installed quick.toml)"
  run "$hexamoe" check "$deck" || fail "hexamoe check rejected the installed quick.toml"
  printf '[moe]\ntop_kk = 1\n' >bad.toml
  set +e
  timeout 120 "$hexamoe" check bad.toml >bad.log 2>&1
  rc=$?
  set -e
  cat bad.log
  [ "$rc" -eq 2 ] || fail "hexamoe check on an invalid deck exited $rc, expected 2"
  grep -q "top_kk" bad.log || fail "the error for the invalid deck does not name the key"

  step "hexamoe train (installed quick.toml, 3 steps)"
  run "$hexamoe" train "$deck" --set train.max_steps=3 --set run.output_dir="$work/out" ||
    fail "hexamoe train failed"
  [ -f "$work/out/summary.json" ] || fail "train wrote no summary.json"
  [ -f "$work/out/metrics.jsonl" ] || fail "train wrote no metrics.jsonl"
  nsteps="$(grep -c '"step"' "$work/out/metrics.jsonl" || true)"
  [ "$nsteps" -ge 1 ] || fail "metrics.jsonl has no step records"
  echo "train: summary.json and $nsteps metrics records written"

  if [ -n "$python" ]; then
    step "Spack package smoke test (test_quick) against the install tree"
    run "$python" "$source_dir/tests/spack/tstSpackPackage.py" --source-dir "$source_dir" --prefix "$prefix" ||
      fail "the Spack package's smoke test failed against the install tree"
  fi
  echo "1 passed, 0 failed"
  ;;
downstream)
  cmake_cmd="${4:?cmake}"
  generator="${5:?generator}"
  cc="${6:?C compiler}"
  cxx="${7:?C++ compiler}"
  [ -f "$prefix/bin/hexamoe" ] || fail "no install tree at $prefix (the install_tree test sets it up)"
  bdir="$prefix-downstream"
  rm -rf "$bdir"
  trap 'rm -rf "$bdir"' EXIT
  step "configure the downstream project against $prefix"
  run "$cmake_cmd" -S "$here/downstream" -B "$bdir" -G "$generator" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_C_COMPILER="$cc" -DCMAKE_CXX_COMPILER="$cxx" -DCMAKE_PREFIX_PATH="$prefix" ||
    fail "find_package(hexamoe) from the install tree failed"
  grep -q "^hexamoe_DIR:PATH=$prefix/" "$bdir/CMakeCache.txt" ||
    fail "hexamoe was not found in the install tree ($(grep '^hexamoe_DIR' "$bdir/CMakeCache.txt"))"
  step "build it"
  run "$cmake_cmd" --build "$bdir" || fail "the downstream project does not build against the install tree"
  step "run it"
  run "$bdir/downstream" | grep -q "downstream: ok" || fail "the downstream program failed"
  echo "1 passed, 0 failed"
  ;;
*)
  fail "unknown mode $mode"
  ;;
esac
