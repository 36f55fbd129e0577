#!/bin/bash
# kmod/kvc.sh: build, check, install and uninstall the KVC-patched nvidia-uvm.ko.
# Called by kmod/Makefile (make driver | driver-check | install-driver | uninstall-driver);
# every knob is an environment variable set there. Never loads or unloads a module except in
# `install` (root, explicit), and then only nvidia-uvm, only when nothing uses it.
set -euo pipefail

KMOD_DIR=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$KMOD_DIR/.." && pwd)
PATCH_DIR=$ROOT/driver-patch
CACHE=${KVC_CACHE:-$ROOT/.cache/kvc}
BUILD=${KVC_BUILD:-$ROOT/build/kmod}
JOBS=${JOBS:-$(nproc)}
# The suite that carries each supported version as Debian's nvidia-open-kernel-source (contrib).
declare -A DEBIAN_SUITE=([535.261.03]=bookworm [550.163.01]=trixie)
DEFAULT_VERSION=535.261.03

say() { echo "kvc: $*" >&2; }
die() { echo "kvc: error: $*" >&2; exit 1; }

# --- sources ---------------------------------------------------------------------------------

clone_hint() {
    cat >&2 <<EOF
kvc: To build for driver $1 from NVIDIA's published source, fetch it yourself and pass it in:
       git clone --depth 1 --branch $1 https://github.com/NVIDIA/open-gpu-kernel-modules.git /tmp/open-gpu-kernel-modules-$1
       make driver NVIDIA_SRC=/tmp/open-gpu-kernel-modules-$1
EOF
}

# Enable contrib through its own sources file (nothing else changes in apt's configuration).
apt_contrib() {
    local f=/etc/apt/sources.list.d/pyvattn-contrib.sources
    if [ ! -f "$f" ]; then
        [ "$(id -u)" = 0 ] || die "need root to add $f (Debian contrib) for apt-get download"
        cat > "$f" <<'EOF'
# Added by pyvattn kmod/driver-check: contrib only (NVIDIA open kernel module sources).
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates trixie
Components: contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
        APT_UPDATED=
    fi
    if [ -z "${APT_UPDATED:-}" ] && ! apt-cache show nvidia-open-kernel-source >/dev/null 2>&1; then
        apt-get update -qq >&2 || die "apt-get update failed"
    fi
    APT_UPDATED=1
}

# debian_source VERSION -> prints the tree that contains nvidia-uvm/ (cached under $CACHE).
debian_source() {
    local ver=$1 deb tree
    tree=$CACHE/src/$ver/modules/nvidia-open-kernel
    if [ -f "$tree/nvidia-uvm/uvm.c" ]; then
        echo "$tree"; return 0
    fi
    deb=$(ls "$CACHE"/debs/nvidia-open-kernel-source_"$ver"-*_amd64.deb 2>/dev/null | head -n 1 || true)
    if [ -z "$deb" ]; then
        command -v apt-get >/dev/null || return 1
        apt_contrib
        local pkgver
        pkgver=$(apt-cache madison nvidia-open-kernel-source 2>/dev/null | awk -v v="$ver" '$3 ~ "^"v"-" {print $3; exit}')
        [ -n "$pkgver" ] || return 1
        mkdir -p "$CACHE/debs"
        # apt-get download: just the .deb, no dependency from another suite is installed.
        (cd "$CACHE/debs" && apt-get download -q "nvidia-open-kernel-source=$pkgver" >&2) || return 1
        deb=$(ls "$CACHE"/debs/nvidia-open-kernel-source_"$ver"-*_amd64.deb | head -n 1)
    fi
    rm -rf "$CACHE/x/$ver" "$CACHE/src/$ver"
    mkdir -p "$CACHE/x/$ver" "$CACHE/src/$ver"
    dpkg -x "$deb" "$CACHE/x/$ver"
    tar -xf "$CACHE/x/$ver/usr/src/nvidia-open-kernel.tar.xz" -C "$CACHE/src/$ver"
    rm -rf "$CACHE/x/$ver"
    [ -f "$tree/nvidia-uvm/uvm.c" ] || return 1
    echo "$tree"
}

# source_tree VERSION -> the directory with nvidia-uvm/ (NVIDIA_SRC or Debian's package).
source_tree() {
    local ver=$1
    if [ -n "${NVIDIA_SRC:-}" ]; then
        local d
        for d in "$NVIDIA_SRC" "$NVIDIA_SRC/kernel-open" "$NVIDIA_SRC/modules/nvidia-open-kernel"; do
            if [ -f "$d/nvidia-uvm/uvm.c" ]; then echo "$d"; return 0; fi
        done
        die "NVIDIA_SRC=$NVIDIA_SRC has no nvidia-uvm/uvm.c (nor kernel-open/nvidia-uvm/uvm.c)"
    fi
    if [ -n "${DEBIAN_SUITE[$ver]:-}" ] && debian_source "$ver"; then
        return 0
    fi
    say "no source for driver $ver: not in NVIDIA_SRC, and Debian has no nvidia-open-kernel-source $ver"
    clone_hint "$ver"
    exit 1
}

# --- kernel headers ----------------------------------------------------------------------------

# kernel_dirs RELEASE -> sets KOUT (build/output dir) and KSRC (source dir; differs on Debian).
kernel_dirs() {
    local rel=$1
    KOUT=${KERNEL_SRC:-}
    if [ -z "$KOUT" ]; then
        if [ -d "/lib/modules/$rel/build" ]; then KOUT=/lib/modules/$rel/build
        elif [ -d "/usr/src/linux-headers-$rel" ]; then KOUT=/usr/src/linux-headers-$rel
        else return 1
        fi
    fi
    KOUT=$(readlink -f "$KOUT")
    KSRC=$KOUT
    if [ -d "/lib/modules/$rel/source" ]; then
        KSRC=$(readlink -f "/lib/modules/$rel/source")
    elif [ -f "$KOUT/Makefile" ] && grep -q '^include .*/Makefile$' "$KOUT/Makefile"; then
        KSRC=$(dirname "$(sed -n 's/^include \(.*\)$/\1/p' "$KOUT/Makefile" | head -n 1)")
    fi
    [ -f "$KOUT/.config" ] || [ -f "$KOUT/include/config/auto.conf" ] || return 1
}

# Installed Debian headers, newest first (for machines without headers of the running kernel).
any_kernel_release() {
    ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sed 's#.*/linux-headers-##' | sort -rV | head -n 1
}

# --- build -------------------------------------------------------------------------------------

installed_driver_version() {
    if [ -r /sys/module/nvidia/version ]; then cat /sys/module/nvidia/version; return; fi
    command -v modinfo >/dev/null && modinfo -F version nvidia 2>/dev/null | head -n 1 || true
}

ko_version() {
    if command -v modinfo >/dev/null; then modinfo -F version "$1" 2>/dev/null; return; fi
    strings "$1" 2>/dev/null | sed -n 's/^version=//p' | head -n 1
}

# Files whose change means the patched tree must be made again.
patch_stamp() {
    # kvc.sh too: it edits the tree (the check-only CFLAGS) after applying the patch.
    (cd "$PATCH_DIR" && cat series apply.sh src/* include/* */uvm-kvc-hooks.patch */uvm_kvc_compat.h "$KMOD_DIR/kvc.sh") |
        sha256sum | cut -c1-16
}

# The objects the patch adds or changes (driver-check compiles these; `make driver` links all).
KVC_OBJECTS="nvidia-uvm/uvm_kvc.o nvidia-uvm/uvm_kvc_pool.o nvidia-uvm/uvm_kvc_map.o nvidia-uvm/uvm_kvc_test.o"
CHECK_OBJECTS="$KVC_OBJECTS nvidia-uvm/uvm.o nvidia-uvm/uvm_test.o
    nvidia-uvm/uvm_va_space.o nvidia-uvm/uvm_map_external.o nvidia-uvm/uvm_lock.o nvidia-uvm/uvm_va_range.o"

kbuild() {
    make -C "$KOUT" M="$tree" ARCH=x86_64 \
        NV_KERNEL_SOURCES="$KSRC" NV_KERNEL_OUTPUT="$KOUT" NV_KERNEL_MODULES="nvidia nvidia-uvm" \
        KBUILD_MODPOST_WARN=1 -j"$JOBS" "$@"
}

# build VERSION RELEASE OUTDIR [check] -> prints OUTDIR/tree/nvidia-uvm.ko (or the tree for check)
build() {
    local ver=$1 rel=$2 out=$3 check=${4:-} src tree t0 rc stamp
    src=$(source_tree "$ver")
    kernel_dirs "$rel" || die "no kernel headers for $rel (install linux-headers-$rel, or pass KERNEL_SRC=/path)"
    tree=$out/tree
    # One build per output directory at a time (CI and a developer may run concurrently).
    mkdir -p "$out"
    exec 9>"$out.lock"
    flock 9 || die "cannot lock $out.lock"
    stamp="$(patch_stamp) $src $check"
    if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] && [ -f "$tree/nvidia-uvm/uvm_kvc.c" ]; then
        say "reusing the patched tree $tree (patch unchanged)"
    else
        rm -rf "$tree" "$out/stamp"; mkdir -p "$out"
        cp -a "$src" "$tree"
        "$PATCH_DIR/apply.sh" "$tree" "$ver" >&2 || { rc=$?; [ $rc = 2 ] && clone_hint "$ver"; exit $rc; }
        if [ -n "$check" ]; then
            # -Werror (after NVIDIA's own -Wno-error) and missing-prototype checks on the new files only.
            # NVIDIA's macro sets CFLAGS_ under both names kbuild may look up (with and without the
            # nvidia-uvm/ prefix); a bare CFLAGS_uvm_kvc.o is silently ignored for M= builds on 6.x.
            printf '\n$(call ASSIGN_PER_OBJ_CFLAGS, %s, -Werror -Wmissing-prototypes)\n' "$KVC_OBJECTS" \
                >> "$tree/nvidia-uvm/nvidia-uvm.Kbuild"
        fi
        echo "$stamp" > "$out/stamp"
    fi
    t0=$(date +%s)
    if [ -n "$check" ]; then
        say "compiling the patched nvidia-uvm objects for driver $ver, kernel $rel ($KOUT)"
        kbuild ${KVC_FULL:+nvidia-uvm.ko} $CHECK_OBJECTS > "$out/build.log" 2>&1 || {
            grep -E 'error|Error' "$out/build.log" | grep -v '^NV_CONFTEST\|^KBUILD_CFLAGS' | head -n 40 >&2
            die "build failed for $ver on $rel (log: $out/build.log)"
        }
        if grep -E 'uvm_kvc[a-z_]*\.[ch]:[0-9]+:[0-9]+: warning' "$out/build.log" >&2; then
            die "compiler warnings in the new files for driver $ver"
        fi
        say "compiled in $(( $(date +%s) - t0 ))s"
        local sparse_log=$out/sparse.log
        touch "$tree"/nvidia-uvm/uvm_kvc*.c
        kbuild C=1 CHECK=sparse $KVC_OBJECTS > "$sparse_log" 2>&1 ||
            die "sparse pass failed to build (log: $sparse_log)"
        if grep -E 'uvm_kvc[a-z_]*\.[ch]:[0-9]+:[0-9]+: (warning|error)' "$sparse_log" >&2; then
            die "sparse reported the lines above for driver $ver"
        fi
        grep -q 'CHECK .*uvm_kvc\.c' "$sparse_log" || die "sparse did not run on uvm_kvc.c (log: $sparse_log)"
        say "sparse: no warnings in uvm_kvc.c, uvm_kvc_pool.c, uvm_kvc_map.c, uvm_kvc_test.c"
        echo "$tree"
        return 0
    fi
    say "building nvidia-uvm.ko for driver $ver, kernel $rel ($KOUT)"
    # nvidia's conftest is generated by nvidia.Kbuild, so both modules are named, but only the
    # nvidia-uvm.ko target is built (nvidia.ko's own files need not compile on these headers);
    # nvidia.ko's symbols are resolved at load time (KBUILD_MODPOST_WARN=1).
    kbuild nvidia-uvm.ko > "$out/build.log" 2>&1 || {
        grep -E 'error|Error' "$out/build.log" | grep -v '^NV_CONFTEST\|^KBUILD_CFLAGS' | head -n 40 >&2
        die "build failed for $ver on $rel (log: $out/build.log)"
    }
    [ -f "$tree/nvidia-uvm.ko" ] || die "no nvidia-uvm.ko produced (log: $out/build.log)"
    say "built $tree/nvidia-uvm.ko in $(( $(date +%s) - t0 ))s (version $(ko_version "$tree/nvidia-uvm.ko"))"
    echo "$tree/nvidia-uvm.ko"
}

cmd_driver() {
    local ver rel note=
    ver=${DRIVER_VERSION:-$(installed_driver_version)}
    if [ -z "$ver" ]; then
        ver=$DEFAULT_VERSION
        note="no NVIDIA driver on this machine: building for $ver from Debian's source, for checking only"
    fi
    rel=${KERNEL_RELEASE:-$(uname -r)}
    if [ -z "${KERNEL_SRC:-}" ] && ! kernel_dirs "$rel" 2>/dev/null; then
        local alt
        alt=$(any_kernel_release)
        [ -n "$alt" ] || die "no kernel headers for $rel and none installed (apt-get install linux-headers-$rel)"
        say "no headers for the running kernel $rel: building against the installed $alt headers instead (the module will not load on this kernel)"
        rel=$alt
    fi
    [ -n "$note" ] && say "$note"
    build "$ver" "$rel" "$BUILD/$ver-$rel"
}

cmd_check() {
    local t0 rel ver out status=0
    t0=$(date +%s)
    command -v sparse >/dev/null || {
        [ "$(id -u)" = 0 ] || die "sparse is not installed (apt-get install sparse)"
        apt_contrib; apt-get install -y -qq sparse >&2
    }
    rel=${KERNEL_RELEASE:-}
    if [ -z "$rel" ]; then
        rel=$(any_kernel_release)
        if [ -z "$rel" ]; then
            [ "$(id -u)" = 0 ] || die "no linux headers installed (apt-get install linux-headers-amd64)"
            apt-get install -y -qq linux-headers-amd64 >&2
            rel=$(any_kernel_release)
        fi
    fi
    # Debian's sources by default; NVIDIA_SRC checks one tree of your own (e.g. a 580 tag).
    local own_src=${NVIDIA_SRC:-}
    if [ -n "$own_src" ] && [ "$(wc -w <<< "${CHECK_VERSIONS:-}")" != 1 ]; then
        die "NVIDIA_SRC=$own_src: also say which version it is, e.g. CHECK_VERSIONS=580.142"
    fi
    for ver in ${CHECK_VERSIONS:-535.261.03 550.163.01}; do
        out=$BUILD/check-$ver-$rel
        if ( NVIDIA_SRC=$own_src build "$ver" "$rel" "$out" check >/dev/null ); then
            say "OK   $ver on $rel: patch applies, patched objects compile, new files -Werror and sparse clean"
        else
            say "FAIL $ver on $rel"; status=1
        fi
    done
    say "driver-check took $(( $(date +%s) - t0 ))s"
    return $status
}

case "${1:-}" in
    driver) cmd_driver ;;
    check) cmd_check ;;
    install) exec "$KMOD_DIR/install.sh" install ;;
    uninstall) exec "$KMOD_DIR/install.sh" uninstall ;;
    *) die "usage: kvc.sh driver|check|install|uninstall" ;;
esac
