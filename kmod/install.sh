#!/bin/bash
# kmod/install.sh [--dry-run] install|uninstall: make the KVC-patched nvidia-uvm.ko the one
# modprobe loads for one kernel (root), or take it away again.
#
# install (KERNEL_RELEASE, default the running kernel):
#   1. refuses, changing nothing, unless: root; headers for the kernel; exactly one nvidia.ko and
#      one nvidia-uvm.ko installed for it; the nvidia.ko loaded now (if any, and the kernel is the
#      running one) is the version installed on disk (after a driver upgrade, reboot first);
#      that version is in driver-patch/series; and, where the kernel only loads signed modules
#      (Secure Boot, lockdown, module.sig_enforce), DKMS will sign with an enrolled MOK key
#      (else it prints the steps to set that up);
#   2. builds against that nvidia.ko's symbol CRCs (kvc-module.sh build), so the pair refuses to
#      load if either changes; with DKMS, registers the patched source as nvidia-uvm-kvc/<ver>,
#      built (and signed) by DKMS, for new kernels too but only where the nvidia.ko is <ver>;
#   3. puts it in /lib/modules/<kernel>/updates/kvc/ under the driver's own file name, with a
#      depmod.d override for that kernel only (kvc-module.sh place), and checks modprobe now
#      resolves nvidia-uvm to it;
#   4. on the running kernel, if nvidia-uvm is not in use: `rmmod nvidia_uvm` (never modprobe -r,
#      which would also unload nvidia.ko), `modprobe nvidia-uvm`, then a smoke test: the loaded
#      version carries the -kvc suffix and UVM_KVC_QUERY answers with the magic and ABI version
#      (kmod/kvc-probe.c). If loading or the smoke test fails, everything is removed again and the
#      driver's own nvidia-uvm is loaded (rollback). In use: says what to do, loads nothing.
# uninstall: removes exactly what install added (DKMS entry, source, modules, override, state),
#   runs depmod, and reloads the driver's own nvidia-uvm if nothing uses it.
#
# --dry-run (or KVC_DRY_RUN=1): every check runs, every action is printed ("+ command") and none
#   is done; needs no root. Actions are printed in real runs too.
# KVC_SYSROOT: a directory standing for / (lib/modules, etc, var, usr/src, sys, dev, proc): the
#   installer tests' sandbox (tests/test_install_driver.py); tools come from PATH.
# KVC_BUILDER: the command that prints a patched source tree (`$KVC_BUILDER tree VERSION`),
#   default kmod/kvc.sh.
KMOD_DIR=$(cd "$(dirname "$0")" && pwd)
. "$KMOD_DIR/lib.sh"
say() { echo "install-driver: $*" >&2; }
# refuse MSG: one "refused" line, recorded as this run's error (lib.sh), then exit 1.
refuse() {
    echo "install-driver: refused: $*" >&2
    echo "$*" > "$KVC_ERROR_MARK"
    exit 1
}

ROOT=$(cd "$KMOD_DIR/.." && pwd)
SYSROOT=${KVC_SYSROOT:-}
STATE=$SYSROOT/var/lib/pyvattn-kvc
DKMS_NAME=nvidia-uvm-kvc
MODULE=$KMOD_DIR/kvc-module.sh
BUILDER=${KVC_BUILDER:-$KMOD_DIR/kvc.sh}
BUILD=${KVC_BUILD:-$ROOT/build/kmod}
DRY=${KVC_DRY_RUN:-}
# The version suffix the hooks patch gives the module (MODULE_VERSION "<ver>-kvc<N>").
KVC_SUFFIX=-kvc

# act CMD...: an action that changes the system; printed, and run unless this is a dry run.
act() {
    echo "+ $*" >&2
    [ -n "$DRY" ] || "$@"
}

# --- facts about this machine (read only) ---------------------------------------------------

running_kernel() { uname -r; }
loaded_version() { cat "$SYSROOT/sys/module/$1/version" 2>/dev/null || true; }
uvm_refcnt() { cat "$SYSROOT/sys/module/nvidia_uvm/refcnt" 2>/dev/null || echo none; }

# supported VERSION: driver-patch/series has it or its branch (what apply.sh accepts).
supported() {
    awk -v v="$1" '!/^#/ && NF >= 2 && ($1 == v || index(v, $1 ".") == 1) { ok = 1 } END { exit !ok }' \
        "$ROOT/driver-patch/series"
}

# signing_required: why this kernel refuses unsigned modules (empty: it does not).
signing_required() {
    local lockdown
    # (Output captured before grep: under pipefail a grep -q that stops early fails the pipe.)
    if [[ $(mokutil --sb-state 2>/dev/null || true) == *'SecureBoot enabled'* ]]; then
        echo "Secure Boot is on"; return
    fi
    lockdown=$(cat "$SYSROOT/sys/kernel/security/lockdown" 2>/dev/null || true)
    case $lockdown in *'[integrity]'*|*'[confidentiality]'*)
        echo "the kernel is locked down ($lockdown)"; return ;;
    esac
    if [ "$(cat "$SYSROOT/sys/module/module/parameters/sig_enforce" 2>/dev/null)" = Y ]; then
        echo "module.sig_enforce is on"
    fi
}

# dkms_signing_files: "KEY CERT" DKMS signs with (its framework.conf, else its default), as
# DKMS itself finds them (the variables may also come from the environment).
dkms_signing_files() {
    local key=${mok_signing_key:-} cert=${mok_certificate:-} f
    for f in "$SYSROOT"/etc/dkms/framework.conf "$SYSROOT"/etc/dkms/framework.conf.d/*.conf; do
        [ -f "$f" ] || continue
        key=$(. "$f" >/dev/null 2>&1; echo "${mok_signing_key:-$key}")
        cert=$(. "$f" >/dev/null 2>&1; echo "${mok_certificate:-$cert}")
    done
    echo "${key:-$SYSROOT/var/lib/dkms/mok.key} ${cert:-$SYSROOT/var/lib/dkms/mok.pub}"
}

signing_steps() {
    cat >&2 <<EOF
install-driver: to load modules of your own while Secure Boot is on, let DKMS sign them with a
Machine Owner Key (MOK) enrolled in the firmware, then install again:
  1. sudo apt-get install dkms                 (or your distribution's package)
  2. a key pair where DKMS looks (dkms 3.x creates it on its first build, or):
       sudo openssl req -new -x509 -nodes -days 36500 -subj "/CN=DKMS module signing key" \\
         -newkey rsa:2048 -keyout /var/lib/dkms/mok.key -outform DER -out /var/lib/dkms/mok.pub
  3. sudo mokutil --import /var/lib/dkms/mok.pub    (asks for a one-time password)
  4. reboot; in the blue MOK manager choose "Enroll MOK" and give that password
  5. check: mokutil --test-key /var/lib/dkms/mok.pub   says "is already enrolled"
  6. sudo make install-driver
Where things stand: mokutil --sb-state; cat /sys/kernel/security/lockdown.
EOF
}

# check_signing USE_DKMS: refuse unless unsigned modules load, or DKMS will sign with a key the
# firmware trusts. Prints "sign" when the module must come out signed.
check_signing() {
    local why key cert
    why=$(signing_required)
    [ -n "$why" ] || return 0
    if [ "$1" != 1 ]; then
        signing_steps
        refuse "$why, so only signed modules load, and DKMS (which signs with your MOK key) is not installed"
    fi
    read -r key cert < <(dkms_signing_files)
    if [ ! -f "$key" ] || [ ! -f "$cert" ] ||
        [[ $(mokutil --test-key "$cert" 2>/dev/null || true) != *'is already enrolled'* ]]; then
        signing_steps
        refuse "$why, so only signed modules load, and DKMS's signing key ($cert) is missing or not enrolled as a MOK"
    fi
    say "$why: DKMS signs the module with $key (enrolled)"
    echo sign
}

# --- state -------------------------------------------------------------------------------------

# The record of an install: KEY=VALUE lines (method, version, kernel).
state_get() {
    [ ! -f "$STATE/installed" ] || sed -n "s/^$1=//p" "$STATE/installed" | sed -n 1p
}

write_state() {
    act mkdir -p "$STATE"
    if [ -z "$DRY" ]; then
        printf 'method=%s\nversion=%s\nkernel=%s\n' "$1" "$2" "$3" > "$STATE/installed"
    fi
    echo "+ write $STATE/installed (method=$1 version=$2 kernel=$3)" >&2
}

# remove_installed: everything a previous install added, whatever it was; depmod for each
# kernel it touched. Safe to run when nothing is installed.
remove_installed() {
    local ver kernels rel
    kernels=$("$MODULE" placed-kernels)
    ver=$(state_get version)
    if [ "$(state_get method)" = dkms ] && [ -n "$ver" ] && command -v dkms >/dev/null; then
        if [ -n "$(dkms status -m "$DKMS_NAME" -v "$ver" 2>/dev/null || true)" ]; then
            act dkms remove -m "$DKMS_NAME" -v "$ver" --all
        fi
        act rm -rf "$SYSROOT/usr/src/$DKMS_NAME-$ver"
    fi
    for rel in $kernels; do
        act "$MODULE" unplace "$rel"
    done
    for rel in $kernels; do
        act depmod -a "$rel"
    done
    act rm -rf "$STATE"
}

# --- loading -----------------------------------------------------------------------------------

# probe: build kmod/kvc-probe.c (once per header) and run it on the UVM device node.
probe() {
    local exe=$BUILD/kvc-probe dev=$SYSROOT/dev/nvidia-uvm major
    if [ ! -x "$exe" ] || [ "$KMOD_DIR/kvc-probe.c" -nt "$exe" ] || [ "$ROOT/driver-patch/include/uvm_kvc_ioctl.h" -nt "$exe" ]; then
        mkdir -p "$BUILD"
        gcc -O2 -Wall -Werror -I "$ROOT/driver-patch/include" "$KMOD_DIR/kvc-probe.c" -o "$exe" ||
            { say "cannot compile kmod/kvc-probe.c"; return 1; }
    fi
    if [ ! -e "$dev" ]; then
        # What nvidia-modprobe does when a CUDA program starts.
        major=$(awk '$2 == "nvidia-uvm" { print $1 }' "$SYSROOT/proc/devices" 2>/dev/null)
        [ -n "$major" ] || { say "no $dev and no nvidia-uvm in /proc/devices"; return 1; }
        act mknod -m 666 "$dev" c "$major" 0 || return 1
    fi
    "$exe" "$dev"
}

# load_and_test VERSION: rmmod nvidia_uvm if loaded, modprobe nvidia-uvm, smoke test.
load_and_test() {
    local ver=$1 loaded
    if [ "$(uvm_refcnt)" != none ]; then
        act rmmod nvidia_uvm || { say "rmmod nvidia_uvm failed"; return 1; }
    fi
    act modprobe nvidia-uvm || { say "modprobe nvidia-uvm failed (see dmesg)"; return 1; }
    [ -z "$DRY" ] || return 0
    loaded=$(loaded_version nvidia_uvm)
    case $loaded in
        "$ver$KVC_SUFFIX"*) ;;
        *) say "the nvidia-uvm loaded is version '${loaded:-?}', not the patched $ver$KVC_SUFFIX*"; return 1 ;;
    esac
    probe || { say "smoke test failed: UVM_KVC_QUERY did not answer as the patched module"; return 1; }
    say "nvidia-uvm $loaded loaded; smoke test passed"
}

# rollback: remove what this install added; the driver's own nvidia-uvm is loaded again if a
# nvidia-uvm was loaded when the install began (ours is unloaded first if it got loaded).
rollback() {
    : > "$KVC_ERROR_MARK"  # what fails from here on reports itself
    say "rolling back: removing the patched module"
    case $(loaded_version nvidia_uvm) in *"$KVC_SUFFIX"*) act rmmod nvidia_uvm || true ;; esac
    remove_installed
    if [ "$UVM_WAS_LOADED" = 1 ] && [ "$(uvm_refcnt)" = none ]; then
        if act modprobe nvidia-uvm; then
            say "the driver's own nvidia-uvm is loaded again (version $(loaded_version nvidia_uvm))"
        else
            say "WARNING: the driver's own nvidia-uvm did not load either; see dmesg"
        fi
    fi
    exit 1
}

# --- install -----------------------------------------------------------------------------------

# preflight: every refusal, before anything changes. Sets REL, RUNNING, VER, STEM, USE_DKMS,
# SIGN (non-empty: the module must come out signed) and UVM_WAS_LOADED.
preflight() {
    local loaded
    REL=${KERNEL_RELEASE:-$(running_kernel)}
    RUNNING=$(running_kernel)
    UVM_WAS_LOADED=0
    [ "$(uvm_refcnt)" = none ] || UVM_WAS_LOADED=1
    [ "$(id -u)" = 0 ] || [ -n "$DRY" ] || refuse "run as root (sudo make install-driver), or see what it would do with make install-driver DRY_RUN=1"
    [ -d "$SYSROOT/lib/modules/$REL/build" ] ||
        refuse "no kernel headers for $REL ($SYSROOT/lib/modules/$REL/build): install linux-headers-$REL"
    VER=$("$MODULE" nvidia-version "$REL") || refuse "no usable nvidia.ko for kernel $REL (the reason is above)"
    if [ -n "${DRIVER_VERSION:-}" ] && [ "$DRIVER_VERSION" != "$VER" ]; then
        refuse "DRIVER_VERSION=$DRIVER_VERSION, but the nvidia.ko installed for $REL is $VER (the module must match it exactly)"
    fi
    loaded=$(loaded_version nvidia)
    if [ "$REL" = "$RUNNING" ] && [ -n "$loaded" ] && [ "$loaded" != "$VER" ]; then
        refuse "nvidia.ko $loaded is loaded but $VER is installed for $REL (a driver upgrade waiting for a reboot): reboot, then run make install-driver again"
    fi
    supported "$VER" || refuse "driver $VER is not supported (driver-patch/series lists what is)"
    STEM=$("$MODULE" uvm-stem "$REL") || refuse "no usable nvidia-uvm.ko for kernel $REL (the reason is above)"
    USE_DKMS=0
    if command -v dkms >/dev/null; then USE_DKMS=1; fi
    SIGN=$(check_signing $USE_DKMS)
    say "driver $VER, kernel $REL, nvidia-uvm file name $STEM, $([ $USE_DKMS = 1 ] && echo "DKMS" || echo "no DKMS: built here, not rebuilt for new kernels")"
}

# put_in_place: build (here, or through DKMS), replace a previous install, place the module for
# REL, check modprobe now resolves to it. Rolls back on failure.
put_in_place() {
    local tree ko
    if [ -n "$DRY" ]; then
        echo "+ $BUILDER tree $VER   (the patched source tree)" >&2
        tree="<patched tree of $VER>"
    else
        tree=$("$BUILDER" tree "$VER") || refuse "no patched source tree for driver $VER (the reason is above); nothing was changed"
    fi
    [ $USE_DKMS = 1 ] || ko=$(build_here "$tree" "$VER" "$REL")
    remove_installed  # a previous install, of any version
    # Recorded first, so a rollback from any later step knows what to remove.
    write_state "$([ $USE_DKMS = 1 ] && echo dkms || echo copy)" "$VER" "$REL"
    if [ $USE_DKMS = 1 ]; then
        install_dkms "$tree" "$VER" "$REL"
    else
        act "$MODULE" place "$REL" "$ko" || rollback
        act depmod -a "$REL" || rollback
    fi
    [ -n "$DRY" ] || verify_placed "$REL" "$STEM" "$SIGN" || rollback
}

cmd_install() {
    local refs
    preflight
    put_in_place
    if [ "$REL" != "$RUNNING" ]; then
        say "installed for kernel $REL (not the running $RUNNING): it loads when that kernel boots"
        return 0
    fi
    refs=$(uvm_refcnt)
    if [ "$refs" != none ] && [ "$refs" != 0 ]; then
        say "nvidia-uvm is in use (refcnt $refs): installed, not loaded. Stop every CUDA process (sudo lsof /dev/nvidia-uvm), then run make install-driver again to load and smoke-test it (or it loads at the next boot)"
        return 0
    fi
    load_and_test "$VER" || rollback
    say "installed nvidia-uvm $(loaded_version nvidia_uvm) for $REL (uninstall: sudo make uninstall-driver)"
}

# build_here TREE VERSION KERNEL -> the module built from a copy of TREE against KERNEL.
build_here() {
    local tree=$1 ver=$2 rel=$3 work kout ksrc
    work=$BUILD/install-$ver-$rel
    kout=$(readlink -f "$SYSROOT/lib/modules/$rel/build")
    ksrc=$(readlink -e "$SYSROOT/lib/modules/$rel/source" 2>/dev/null || echo "$kout")
    if [ -n "$DRY" ]; then
        echo "+ $MODULE build $work/tree $rel $kout $ksrc   (a copy of the patched tree)" >&2
        echo "$work/tree/nvidia-uvm.ko"
        return 0
    fi
    rm -rf "$work"; mkdir -p "$work"
    cp -a "$tree" "$work/tree"
    "$MODULE" build "$work/tree" "$rel" "$kout" "$ksrc" >&2 || refuse "the build failed (the reason is above); nothing was changed"
    echo "$work/tree/nvidia-uvm.ko"
}

install_dkms() {
    local tree=$1 ver=$2 rel=$3 dsrc
    dsrc=$SYSROOT/usr/src/$DKMS_NAME-$ver
    act rm -rf "$dsrc"
    act cp -a "$tree" "$dsrc"
    act install -m 0755 "$MODULE" "$KMOD_DIR/lib.sh" "$dsrc/"
    echo "+ write $dsrc/dkms.conf (from kmod/dkms.conf.in)" >&2
    [ -n "$DRY" ] || sed "s/@VERSION@/$ver/g" "$KMOD_DIR/dkms.conf.in" > "$dsrc/dkms.conf"
    act dkms add -m "$DKMS_NAME" -v "$ver" || rollback
    act dkms build -m "$DKMS_NAME" -v "$ver" -k "$rel" || rollback
    act dkms install -m "$DKMS_NAME" -v "$ver" -k "$rel" || rollback
}

# verify_placed KERNEL STEM SIGN: modprobe resolves STEM to our module for KERNEL, its CRCs are
# nvidia.ko's, and it is signed if it must be.
verify_placed() {
    local rel=$1 stem=$2 sign=$3 path
    path=$(modinfo -k "$rel" -n "$stem" 2>/dev/null || true)
    case $path in
        */updates/kvc/*) ;;
        *) say "after depmod, modprobe still resolves $stem to '${path:-nothing}' for $rel, not updates/kvc/"; return 1 ;;
    esac
    say "modprobe resolves $stem to $path for $rel; $("$MODULE" check-crcs "$path" "$rel")" || return 1
    if [ -n "$sign" ] && ! "$MODULE" signed "$path"; then
        say "$path is not signed, and this kernel loads only signed modules"
        return 1
    fi
}

cmd_uninstall() {
    [ "$(id -u)" = 0 ] || [ -n "$DRY" ] || refuse "run as root (sudo make uninstall-driver)"
    if [ ! -f "$STATE/installed" ] && [ -z "$("$MODULE" placed-kernels)" ]; then
        say "the patched module is not installed; nothing to do"
        return 0
    fi
    local was_ours=0
    case $(loaded_version nvidia_uvm) in *"$KVC_SUFFIX"*) was_ours=1 ;; esac
    remove_installed
    if [ $was_ours = 1 ]; then
        local refs
        refs=$(uvm_refcnt)
        if [ "$refs" = 0 ]; then
            act rmmod nvidia_uvm && act modprobe nvidia-uvm ||
                say "WARNING: could not reload nvidia-uvm; see dmesg"
        else
            say "the patched nvidia-uvm stays loaded until nothing uses it (refcnt $refs): stop CUDA processes, then sudo rmmod nvidia_uvm && sudo modprobe nvidia-uvm, or reboot"
        fi
    fi
    say "removed; modprobe loads the driver's own nvidia-uvm"
}

args=()
for arg in "$@"; do
    case $arg in
        --dry-run) DRY=1 ;;
        *) args+=("$arg") ;;
    esac
done
case "${args[0]:-}" in
    install) cmd_install ;;
    uninstall) cmd_uninstall ;;
    *) echo "usage: install.sh [--dry-run] install|uninstall" >&2; exit 2 ;;
esac
