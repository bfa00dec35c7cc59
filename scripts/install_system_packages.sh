#!/usr/bin/env bash
# Installs the Debian packages the project uses, where this machine allows it:
#   dataset-fashion-mnist   the real FashionMNIST files (/usr/share/datasets/fashion-mnist/)
#   chromium chromium-driver  the headless browser of the end-to-end dashboard test
# Without root or apt-get it only says what is missing: the experiment can still
# download FashionMNIST through torchvision, and the browser test is skipped.
set -euo pipefail
need=()
[ -d /usr/share/datasets/fashion-mnist ] || need+=(dataset-fashion-mnist)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "Installing Debian packages: ${need[*]}"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null
else
    echo "Not root or no apt-get: please install ${need[*]} yourself (see README)." >&2
fi
