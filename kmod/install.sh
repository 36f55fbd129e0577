#!/bin/bash
# kmod/install.sh install|uninstall: put the KVC-patched nvidia-uvm.ko in place of the installed
# one (root only), or restore the original.
#
# install:
#   1. refuses unless: root, an NVIDIA driver is installed, its version is supported by
#      driver-patch/series, and headers for the running kernel exist;
#   2. builds nvidia-uvm.ko for that exact driver version and the running kernel (kvc.sh);
#   3. backs up the module modprobe would load today (/var/lib/pyvattn-kvc/);
#   4. DKMS present: registers /usr/src/nvidia-uvm-kvc-<ver> (dkms.conf) so the module is rebuilt
#      on kernel updates; otherwise copies it to /lib/modules/<rel>/updates/kvc/. Either way an
#      /etc/depmod.d override makes modprobe pick it over the distribution's nvidia-uvm;
#   5. reloads nvidia-uvm only if nothing holds it (refcnt 0); if the new module fails to load,
#      the original is put back and loaded again. Otherwise it says what to restart.
# KVC_DRY_RUN=1 prints the commands that change the system instead of running them.
set -euo pipefail

KMOD_DIR=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$KMOD_DIR/.." && pwd)
STATE=/var/lib/pyvattn-kvc
OVERRIDE=/etc/depmod.d/pyvattn-kvc.conf
DKMS_NAME=nvidia-uvm-kvc
REL=${KERNEL_RELEASE:-$(uname -r)}

say() { echo "install-driver: $*" >&2; }
die() { echo "install-driver: refused: $*" >&2; exit 1; }
run() {
    if [ -n "${KVC_DRY_RUN:-}" ]; then echo "+ $*" >&2; else "$@"; fi
}

driver_version() {
    if [ -n "${DRIVER_VERSION:-}" ]; then echo "$DRIVER_VERSION"; return; fi
    if [ -r /sys/module/nvidia/version ]; then cat /sys/module/nvidia/version; return; fi
    modinfo -F version nvidia 2>/dev/null | head -n 1 || true
}

uvm_refcnt() {
    if [ -r /sys/module/nvidia_uvm/refcnt ]; then cat /sys/module/nvidia_uvm/refcnt; else echo none; fi
}

# Reload nvidia-uvm if nothing uses it. Returns 1 if the module could not be loaded.
reload() {
    local refs
    refs=$(uvm_refcnt)
    if [ "$refs" != 0 ] && [ "$refs" != none ]; then
        say "nvidia-uvm is in use (refcnt $refs): the new module takes effect after all CUDA processes exit and nvidia-uvm is reloaded (modprobe -r nvidia-uvm; modprobe nvidia-uvm), or after a reboot"
        return 0
    fi
    if [ "$refs" = 0 ]; then
        run modprobe -r nvidia-uvm || { say "could not unload nvidia-uvm; reboot to use the new module"; return 0; }
    fi
    run modprobe nvidia-uvm || return 1
    say "nvidia-uvm loaded: version $(cat /sys/module/nvidia_uvm/version 2>/dev/null || echo '?')"
}

remove_installed() {
    if [ -f "$STATE/method" ] && [ "$(cat "$STATE/method")" = dkms ] && command -v dkms >/dev/null; then
        local v
        v=$(cat "$STATE/dkms_version")
        run dkms remove -m "$DKMS_NAME" -v "$v" --all || true
        run rm -rf "/usr/src/$DKMS_NAME-$v"
    fi
    run rm -f "$OVERRIDE"
    run rm -rf "/lib/modules/$REL/updates/kvc"
    run depmod -a "$REL"
}

cmd_install() {
    local ver ko current
    [ "$(id -u)" = 0 ] || [ -n "${KVC_DRY_RUN:-}" ] || die "run as root (sudo make install-driver)"
    ver=$(driver_version)
    [ -n "$ver" ] || die "no NVIDIA driver is installed (modinfo nvidia found nothing); nvidia-uvm must match nvidia.ko exactly"
    awk -v v="$ver" '!/^#/ && NF >= 2 && ($1 == v || index(v, $1 ".") == 1) {ok=1} END {exit !ok}' \
        "$ROOT/driver-patch/series" || die "driver $ver is not supported (see driver-patch/series)"
    [ -d "/lib/modules/$REL/build" ] || die "no kernel headers for the running kernel $REL (apt-get install linux-headers-$REL)"
    current=$(modinfo -n nvidia-uvm 2>/dev/null || true)
    [ -n "$current" ] || die "modprobe knows no nvidia-uvm for $REL; install the NVIDIA driver first"

    ko=$(DRIVER_VERSION=$ver KERNEL_RELEASE=$REL "$KMOD_DIR/kvc.sh" driver | tail -n 1)
    [ -f "$ko" ] || die "build failed"

    # Back up the module that is in use today, unless it is already ours.
    if ! modinfo -F version "$current" 2>/dev/null | grep -q -- '-kvc'; then
        run mkdir -p "$STATE/$REL"
        run cp -p "$current" "$STATE/$REL/nvidia-uvm.ko.orig"
        [ -n "${KVC_DRY_RUN:-}" ] || echo "$current" > "$STATE/$REL/orig-path"
        say "original module backed up: $current -> $STATE/$REL/nvidia-uvm.ko.orig"
    fi

    remove_installed
    if command -v dkms >/dev/null; then
        local dsrc=/usr/src/$DKMS_NAME-$ver
        run rm -rf "$dsrc"
        run cp -a "$(dirname "$ko")" "$dsrc"
        [ -n "${KVC_DRY_RUN:-}" ] || sed "s/@VERSION@/$ver/g" "$KMOD_DIR/dkms.conf.in" > "$dsrc/dkms.conf"
        run dkms add -m "$DKMS_NAME" -v "$ver"
        run dkms build -m "$DKMS_NAME" -v "$ver" -k "$REL"
        run dkms install -m "$DKMS_NAME" -v "$ver" -k "$REL" --force
        [ -n "${KVC_DRY_RUN:-}" ] || { echo dkms > "$STATE/method"; echo "$ver" > "$STATE/dkms_version"; }
    else
        run install -D -m 0644 "$ko" "/lib/modules/$REL/updates/kvc/nvidia-uvm.ko"
        [ -n "${KVC_DRY_RUN:-}" ] || echo copy > "$STATE/method"
        say "dkms is not installed: the module will NOT be rebuilt on kernel updates (rerun make install-driver)"
    fi
    [ -n "${KVC_DRY_RUN:-}" ] || printf '# pyvattn KVC nvidia-uvm (kmod/install.sh)\noverride nvidia-uvm * updates/kvc\noverride nvidia_uvm * updates/kvc\n' > "$OVERRIDE"
    run depmod -a "$REL"

    if ! reload; then
        say "the patched module failed to load: restoring the original"
        remove_installed
        run modprobe nvidia-uvm || say "WARNING: the original nvidia-uvm did not load either; check dmesg"
        exit 1
    fi
    say "installed nvidia-uvm $ver-kvc for $REL (uninstall: make uninstall-driver)"
}

cmd_uninstall() {
    [ "$(id -u)" = 0 ] || [ -n "${KVC_DRY_RUN:-}" ] || die "run as root (sudo make uninstall-driver)"
    if [ ! -f "$OVERRIDE" ] && [ ! -d "/lib/modules/$REL/updates/kvc" ] && [ ! -f "$STATE/method" ]; then
        say "the patched module is not installed; nothing to do"
        return 0
    fi
    remove_installed
    # The distribution's module was never overwritten (ours lives in updates/kvc); if it is gone
    # meanwhile, put the backup back where it was.
    if [ -f "$STATE/$REL/orig-path" ] && [ ! -f "$(cat "$STATE/$REL/orig-path")" ]; then
        run install -D -m 0644 "$STATE/$REL/nvidia-uvm.ko.orig" "$(cat "$STATE/$REL/orig-path")"
        run depmod -a "$REL"
    fi
    run rm -f "$STATE/method" "$STATE/dkms_version"
    reload || say "WARNING: nvidia-uvm did not load; check dmesg"
    say "original nvidia-uvm restored for $REL"
}

case "${1:-}" in
    install) cmd_install ;;
    uninstall) cmd_uninstall ;;
    *) echo "usage: install.sh install|uninstall" >&2; exit 2 ;;
esac
