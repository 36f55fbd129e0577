# tests/stubs/install/sandbox.sh: sourced by the sandbox's stand-ins for system commands
# (bin/*). They act on $KVC_SYSROOT only, append what they were asked to $KVC_SYSROOT/.sandbox/log
# ("name arg arg ..."), and never touch this machine's modules: kmod's real depmod and modinfo
# run with the sandbox as their base directory, modprobe only as --dry-run --show-depends, and
# loading and unloading are simulated in $KVC_SYSROOT/sys/module.
set -euo pipefail
: "${KVC_SYSROOT:?the sandbox commands need KVC_SYSROOT}"
: "${KVC_TEST_KMOD:?the sandbox commands need KVC_TEST_KMOD (the sbin directory of kmod)}"
case $KVC_SYSROOT in /|"") echo "sandbox: KVC_SYSROOT=$KVC_SYSROOT is not a sandbox" >&2; exit 99 ;; esac
SANDBOX=$KVC_SYSROOT/.sandbox
STUBS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

record() {
    local IFS=' '
    echo "$*" >> "$SANDBOX/log"
}

running_kernel() { cat "$SANDBOX/running-kernel"; }

# Every module file name and option that identifies the sandbox's kmod configuration.
kmod_modprobe() {
    "$KVC_TEST_KMOD/modprobe" -d "$KVC_SYSROOT" -C "$KVC_SYSROOT/etc/modprobe.d" "$@"
}
