#!/usr/bin/env bash
# Install the system packages the tests need, when missing: Chromium and its driver (Debian).
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
if [ "$(id -u)" != "0" ]; then
  echo "Chromium is missing: run 'sudo apt-get install chromium chromium-driver' (browser tests will skip otherwise)." >&2
  exit 0
fi
echo "installing chromium and chromium-driver (Debian packages)…"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core >/dev/null
