#!/usr/bin/env bash
# System packages Duet needs beyond Python wheels: espeak-ng (speech for the
# synthetic world), ffmpeg (the naive PySceneDetect chain in bench/curation) and
# chromium (the serving web page's browser test drives the system browser).
set -euo pipefail
need=()
command -v espeak-ng >/dev/null 2>&1 || need+=(espeak-ng)
command -v ffmpeg >/dev/null 2>&1 || need+=(ffmpeg)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO=sudo; else
    echo "missing system packages: ${need[*]} (install them, or run as root)" >&2; exit 1; fi
else SUDO=""; fi
echo "installing system packages: ${need[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
