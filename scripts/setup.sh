#!/usr/bin/env bash
# Creates .venv with everything the demo and the tests need; reruns only when setup.cfg or this
# script changes. torch and torchvision are pinned as a pair and taken from the package registry
# (PIP_FIND_LINKS emptied, --isolated): the machine's local CPU-only torch wheel cannot import the
# registry's torchvision, which timm, lpips and torch-fidelity all need.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${RECTOK_VENV:-.venv}
STAMP="$VENV/.rectok-setup"
want=$( (cat setup.cfg scripts/setup.sh; echo "no_ffcv=${RECTOK_NO_FFCV:-0}") | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then exit 0; fi
echo "setup: creating $VENV (first time: about three minutes)"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
PIP_FIND_LINKS= "$VENV/bin/python" -m pip install -q --isolated torch==2.13.0 torchvision==0.28.0
# DeepSpeed's setup.py imports torch, so it builds against the venv's torch (no build isolation); its
# CUDA ops are not prebuilt (DS_BUILD_OPS=0): the trainer uses torch's AdamW, and the CPU comm op is
# JIT-built once (~40 s) into ~/.cache/torch_extensions on first use.
"$VENV/bin/python" -m pip install -q setuptools wheel
DS_BUILD_OPS=0 "$VENV/bin/python" -m pip install -q --no-build-isolation deepspeed==0.19.8
as_root() {  # root, or password-less sudo; otherwise say so and return 1
  if [ "$(id -u)" = 0 ]; then "$@"; elif sudo -n true 2>/dev/null; then sudo "$@"; else return 1; fi
}
apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get install -y -q "$@" >/dev/null || { as_root apt-get update -q >/dev/null &&
    as_root apt-get install -y -q "$@" >/dev/null; }
}
# FFCV (the default loader) compiles against libturbojpeg and OpenCV from the system (~40-70 s once).
# RECTOK_NO_FFCV=1 skips it: then only data.loader=pil works and the FFCV tests fail.
extras=test
if [ "${RECTOK_NO_FFCV:-0}" != 1 ]; then
  extras=test,ffcv
  if ! pkg-config --exists libturbojpeg opencv4 2>/dev/null; then
    pkgs="pkg-config libturbojpeg0-dev libopencv-dev"
    echo "setup: installing $pkgs for FFCV"
    apt_install $pkgs || { echo "setup: FFCV needs the system packages: $pkgs (apt) and root or sudo to" \
      "install them. Install them, or run with RECTOK_NO_FFCV=1 and train with data.loader=pil" >&2; exit 1; }
  fi
fi
# Slurm and munge (Debian's slurm-wlm), for the tests that start a one-node cluster
# (scripts/slurm_cluster.sh). Without root they are skipped, and the trainer does not need them.
if ! command -v sbatch >/dev/null || [ ! -x /usr/sbin/munged ]; then
  echo "setup: installing slurm-wlm and munge for the Slurm tests"
  apt_install slurm-wlm munge || echo "setup: no root or sudo: Slurm not installed, its tests will be skipped" >&2
fi
"$VENV/bin/python" -m pip install -q -e ".[$extras]"
echo "$want" > "$STAMP"
echo "setup: $VENV ready"
