# g++ (C++20), used by evaluator/tests/test_kernels_metal_emu.py to compile and run the Metal kernel
# bodies on the CPU through tilewise/kernels/metal_emu. Those tests fail (not skip) without it, so a
# machine without root/sudo gets a loud message here.
set -uo pipefail
[ "$(uname -s)" = Linux ] || exit 0
command -v g++ >/dev/null && exit 0
command -v apt-get >/dev/null || { echo "g++ missing and no apt-get: install g++ (C++20) by hand, or the Metal emulation tests fail"; exit 0; }
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
if $SUDO true 2>/dev/null; then
  $SUDO apt-get install -y -q --no-install-recommends g++ >/dev/null \
    || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q --no-install-recommends g++ >/dev/null; } \
    || echo "apt-get install g++ failed: the Metal emulation tests will fail until g++ is installed"
else
  echo "g++ missing and no root/sudo: install g++, or the Metal emulation tests will fail"
fi
exit 0
