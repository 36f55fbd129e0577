#!/bin/bash
# kmod/kvc.sh: build, check, install and uninstall the KVC-patched nvidia-uvm.ko.
# Called by kmod/Makefile (make driver | driver-check | install-driver | uninstall-driver);
# every knob is an environment variable set there. Never loads or unloads a module except in
# `install` (root, explicit), and then only nvidia-uvm, only when nothing uses it.
# What a build or check needs and this machine lacks (NVIDIA's source as Debian packages it,
# Debian kernel headers, sparse, patch, xz; for the static analysis of kmod/analyze.sh also
# coccinelle, linux-source's semantic patches and kmod) is fetched into .cache/kvc by
# kmod/fetch.sh: nothing is installed on the system and /etc/apt is never written, as root or as
# any user.
KMOD_DIR=$(cd "$(dirname "$0")" && pwd)
. "$KMOD_DIR/lib.sh"

ROOT=$(cd "$KMOD_DIR/.." && pwd)
PATCH_DIR=$ROOT/driver-patch
CACHE=${KVC_CACHE:-$ROOT/.cache/kvc}
export KVC_CACHE=$CACHE
BUILD=${KVC_BUILD:-$ROOT/build/kmod}
JOBS=${JOBS:-$(nproc)}
# The suite that carries each supported version as Debian's nvidia-open-kernel-source (contrib).
declare -A DEBIAN_SUITE=([535.261.03]=bookworm [550.163.01]=trixie)
DEFAULT_VERSION=535.261.03

# --- tools -------------------------------------------------------------------------------------

fetch() { "$KMOD_DIR/fetch.sh" "$@"; }

# use_prefix PREFIX: run programs (and find their libraries) from a set kmod/fetch.sh unpacked.
use_prefix() {
    local p=$1 multiarch dir
    multiarch=$(gcc -dumpmachine 2>/dev/null || echo x86_64-linux-gnu)
    PATH=$p/usr/bin:$p/bin:$p/usr/sbin:$p/sbin:$PATH
    for dir in "$p/usr/lib/$multiarch" "$p/lib/$multiarch"; do
        [ ! -d "$dir" ] || LD_LIBRARY_PATH=$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    done
    export PATH LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}
}

# need_tool COMMAND PACKAGE: COMMAND on PATH; if this machine lacks it, PACKAGE alone is fetched
# (the tools asked for need nothing beyond libc) and must then run.
need_tool() {
    local cmd=$1 pkg=$2 prefix
    command -v "$cmd" >/dev/null && return 0
    prefix=$(fetch --name "tool-$pkg" --no-deps "$pkg")
    use_prefix "$prefix"
    "$cmd" --version >/dev/null 2>&1 ||
        die "$cmd (Debian's $pkg, fetched into $prefix) does not run on this machine; install $pkg"
}

# --- sources ---------------------------------------------------------------------------------

clone_hint() {
    cat >&2 <<EOF
kvc: To build for driver $1 from NVIDIA's published source, fetch it yourself and pass it in:
       git clone --depth 1 --branch $1 https://github.com/NVIDIA/open-gpu-kernel-modules.git /tmp/open-gpu-kernel-modules-$1
       make driver NVIDIA_SRC=/tmp/open-gpu-kernel-modules-$1
EOF
}

# debian_source VERSION -> prints the tree that contains nvidia-uvm/, unpacked under $CACHE/src
# from Debian's nvidia-open-kernel-source of that version.
debian_source() {
    local ver=$1 tree prefix
    tree=$CACHE/src/$ver/modules/nvidia-open-kernel
    mkdir -p "$CACHE/src"
    exec 8>"$CACHE/src/$ver.lock"
    flock 8 || die "cannot lock $CACHE/src/$ver.lock"
    if [ ! -f "$tree/nvidia-uvm/uvm.c" ]; then
        prefix=$(fetch --name "nvidia-$ver" --suite "${DEBIAN_SUITE[$ver]}" --component contrib --no-deps \
            "nvidia-open-kernel-source=$ver")
        need_tool xz xz-utils
        rm -rf "$CACHE/src/$ver" "$CACHE/src/$ver.part"
        mkdir -p "$CACHE/src/$ver.part"
        tar -xJf "$prefix/usr/src/nvidia-open-kernel.tar.xz" -C "$CACHE/src/$ver.part"
        mv "$CACHE/src/$ver.part" "$CACHE/src/$ver"
        [ -f "$tree/nvidia-uvm/uvm.c" ] || die "Debian's nvidia-open-kernel-source $ver has no nvidia-uvm/uvm.c ($prefix)"
    fi
    exec 8>&-
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
    if [ -z "${DEBIAN_SUITE[$ver]:-}" ]; then
        clone_hint "$ver"
        die "no source for driver $ver: NVIDIA_SRC is not set, and Debian's archive has only ${!DEBIAN_SUITE[*]}"
    fi
    debian_source "$ver"
}

# --- kernel headers ----------------------------------------------------------------------------

# kernel_dirs RELEASE [ROOT] -> sets KOUT (build/output dir) and KSRC (source dir; differs on
# Debian): KERNEL_SRC, else the headers of RELEASE under ROOT (default: this system; or a prefix
# kmod/fetch.sh unpacked).
kernel_dirs() {
    local rel=$1 root=${2:-} inc
    KOUT=${KERNEL_SRC:-}
    if [ -z "$KOUT" ]; then
        if [ -d "$root/lib/modules/$rel/build" ]; then KOUT=$root/lib/modules/$rel/build
        elif [ -d "$root/usr/src/linux-headers-$rel" ]; then KOUT=$root/usr/src/linux-headers-$rel
        else return 1
        fi
    fi
    KOUT=$(readlink -f "$KOUT")
    KSRC=$KOUT
    if [ -z "${KERNEL_SRC:-}" ] && [ -d "$root/lib/modules/$rel/source" ]; then
        KSRC=$(readlink -f "$root/lib/modules/$rel/source")
    elif [ -f "$KOUT/Makefile" ]; then
        inc=$(sed -n 's/^include \(.*\)\/Makefile$/\1/p' "$KOUT/Makefile" | sed -n 1p)
        [ -z "$inc" ] || KSRC=$(cd "$KOUT" && readlink -f "$inc")
    fi
    [ -f "$KOUT/.config" ] || [ -f "$KOUT/include/config/auto.conf" ] || return 1
}

# The newest installed Debian headers (for machines without headers of the running kernel).
installed_debian_release() {
    local d rels=()
    for d in /usr/src/linux-headers-*-amd64; do
        [ ! -f "$d/.config" ] || rels+=("${d#/usr/src/linux-headers-}")
    done
    [ ${#rels[@]} = 0 ] || printf '%s\n' "${rels[@]}" | sort -rV | sed -n 1p
}

# fetched_headers: Debian's current kernel headers for this machine's release, fetched into the
# cache; sets REL, KOUT and KSRC.
fetched_headers() {
    local prefix dirs
    prefix=$(fetch --name headers linux-headers-amd64)
    dirs=("$prefix"/usr/src/linux-headers-*-amd64)
    [ -f "${dirs[0]}/.config" ] || die "the fetched kernel headers in $prefix have no usr/src/linux-headers-*-amd64/.config"
    REL=${dirs[0]#"$prefix"/usr/src/linux-headers-}
    # The -amd64 Makefile includes the -common one by its installed path; kbuild runs in KOUT.
    sed -i 's#^include /usr/src/\(linux-headers-[^/]*\)/Makefile$#include ../\1/Makefile#' "${dirs[0]}/Makefile"
    use_prefix "$prefix"  # the kbuild tools' libraries (libelf) where the system lacks them
    kernel_dirs "$REL" "$prefix" || die "the fetched kernel headers $REL in $prefix are incomplete"
    say "using Debian's kernel headers $REL (fetched into $prefix)"
}

# check_kernel: the headers to compile against; sets REL, KOUT and KSRC. KERNEL_RELEASE /
# KERNEL_SRC if given, else the newest installed Debian headers, else Debian's current ones.
check_kernel() {
    local cc
    if [ -n "${KERNEL_SRC:-}" ] || [ -n "${KERNEL_RELEASE:-}" ]; then
        REL=${KERNEL_RELEASE:-$(basename "$(readlink -f "$KERNEL_SRC")")}
        REL=${REL#linux-headers-}
        kernel_dirs "$REL" || die "no kernel headers for $REL (install linux-headers-$REL, or pass KERNEL_SRC=/path)"
    else
        REL=$(installed_debian_release)
        if [ -z "$REL" ]; then
            fetched_headers
        else
            kernel_dirs "$REL" || die "the installed headers /usr/src/linux-headers-$REL are incomplete"
        fi
    fi
    # Debian's headers name the compiler the kernel was built with (gcc-12 for 6.1).
    cc=$(sed -n 's/^CC = .*[^A-Za-z0-9_.-]\(gcc-[0-9.]*\)$/\1/p' "$KOUT/.kernelvariables" 2>/dev/null | sed -n 1p || true)
    [ -z "$cc" ] || command -v "$cc" >/dev/null ||
        die "the kernel headers $REL are built with $cc, which this machine lacks (apt-get install $cc), or pass KERNEL_SRC= headers of your own"
}

# --- build -------------------------------------------------------------------------------------

# module_facts ARGS...: kmod/kvc-module.sh (its own error record: a failure it reports here
# and the caller handles does not silence later errors of this run).
module_facts() { env -u KVC_ERROR_MARK "$KMOD_DIR/kvc-module.sh" "$@"; }

ko_version() {
    if command -v modinfo >/dev/null; then modinfo -F version "$1" 2>/dev/null || true; return; fi
    strings "$1" 2>/dev/null | sed -n 's/^version=//p' | sed -n 1p || true
}

# The objects of the patch's own files (driver-patch/src/*.c), and those plus the stock objects
# the hooks change (driver-check compiles these; `make driver` links all).
NEW_OBJECTS=$(cd "$PATCH_DIR/src" && ls *.c | sed 's|^|nvidia-uvm/|; s|\.c$|.o|' | tr '\n' ' ')
CHECK_OBJECTS="$NEW_OBJECTS nvidia-uvm/uvm.o nvidia-uvm/uvm_test.o nvidia-uvm/uvm_va_space.o
    nvidia-uvm/uvm_map_external.o nvidia-uvm/uvm_lock.o nvidia-uvm/uvm_va_range.o"
# What a check tree adds to nvidia-uvm.Kbuild after applying the patch: -Werror (after NVIDIA's
# own -Wno-error) and missing-prototype checks on the new files only. NVIDIA's macro sets CFLAGS_
# under both names kbuild may look up (with and without the nvidia-uvm/ prefix); a bare
# CFLAGS_uvm_kvc.o is silently ignored for M= builds on 6.x.
CHECK_KBUILD_LINE="\$(call ASSIGN_PER_OBJ_CFLAGS, ${NEW_OBJECTS% }, -Werror -Wmissing-prototypes)"

# Files whose change means the patched tree must be made again.
patch_stamp() {
    (cd "$PATCH_DIR" && cat series apply.sh src/* include/* */uvm-kvc-hooks.patch */uvm_kvc_compat.h
     echo "$CHECK_KBUILD_LINE") | sha256sum | cut -c1-16
}

kbuild() {
    make -C "$KOUT" M="$tree" ARCH=x86_64 \
        NV_KERNEL_SOURCES="$KSRC" NV_KERNEL_OUTPUT="$KOUT" NV_KERNEL_MODULES="nvidia nvidia-uvm" \
        KBUILD_MODPOST_WARN=1 -j"$JOBS" "$@"
}

# prepare_tree VERSION OUTDIR [check]: OUTDIR/tree is NVIDIA's VERSION source with the patch
# applied (and, for check, the check flags), made again only when the patch changed; holds
# OUTDIR.lock from here to the end of the calling process (one build per directory at a time:
# CI and a developer may run concurrently). Sets tree.
prepare_tree() {
    local ver=$1 out=$2 check=${3:-} src rc stamp
    src=$(source_tree "$ver")
    need_tool patch patch  # driver-patch/apply.sh
    tree=$out/tree
    mkdir -p "$out"
    exec 9>"$out.lock"
    flock 9 || die "cannot lock $out.lock"
    stamp="$(patch_stamp) $src $check"
    if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] && [ -f "$tree/nvidia-uvm/uvm_kvc.c" ]; then
        say "reusing the patched tree $tree (patch unchanged)"
    else
        rm -rf "$tree" "$out/stamp"; mkdir -p "$out"
        cp -a "$src" "$tree"
        rc=0
        "$PATCH_DIR/apply.sh" "$tree" "$ver" >&2 || rc=$?
        if [ $rc != 0 ]; then
            [ $rc != 2 ] || clone_hint "$ver"
            die "driver-patch/apply.sh could not patch NVIDIA's $ver source (status $rc; its message is above)"
        fi
        if [ -n "$check" ]; then
            printf '\n%s\n' "$CHECK_KBUILD_LINE" >> "$tree/nvidia-uvm/nvidia-uvm.Kbuild"
        fi
        echo "$stamp" > "$out/stamp"
    fi
}

# build VERSION RELEASE OUTDIR [check|symvers] -> prints OUTDIR/tree/nvidia-uvm.ko (or the tree
# for check). Compiles against KOUT/KSRC (set by kernel_dirs or check_kernel); symvers: against
# the symbol versions of RELEASE's installed nvidia.ko (kvc-module.sh build), as install does.
build() {
    local ver=$1 rel=$2 out=$3 mode=${4:-} tree t0
    prepare_tree "$ver" "$out" "$([ "$mode" != check ] || echo check)"
    t0=$(date +%s)
    if [ "$mode" = symvers ]; then
        module_facts build "$tree" "$rel" "$KOUT" "$KSRC" "$JOBS" >&2 || die "the build against nvidia.ko's symbols failed (the reason is above)"
        say "built $tree/nvidia-uvm.ko in $(( $(date +%s) - t0 ))s (version $(ko_version "$tree/nvidia-uvm.ko"))"
        echo "$tree/nvidia-uvm.ko"
        return 0
    fi
    if [ "$mode" = check ]; then
        say "compiling the patched nvidia-uvm objects for driver $ver, kernel $rel ($KOUT)"
        kbuild ${KVC_FULL:+nvidia-uvm.ko} $CHECK_OBJECTS > "$out/build.log" 2>&1 || {
            grep -E 'error|Error' "$out/build.log" | grep -v '^NV_CONFTEST\|^KBUILD_CFLAGS' | sed -n 1,40p >&2 || true
            die "build failed for $ver on $rel (log: $out/build.log)"
        }
        if grep -E 'uvm_kvc[a-z_]*\.[ch]:[0-9]+:[0-9]+: warning' "$out/build.log" >&2; then
            die "compiler warnings in the new files for driver $ver"
        fi
        say "compiled in $(( $(date +%s) - t0 ))s"
        local sparse_log=$out/sparse.log obj
        for obj in $NEW_OBJECTS; do touch "$tree/${obj%.o}.c"; done
        kbuild C=1 CHECK=sparse $NEW_OBJECTS > "$sparse_log" 2>&1 ||
            die "sparse pass failed to build (log: $sparse_log)"
        if grep -E 'uvm_kvc[a-z_]*\.[ch]:[0-9]+:[0-9]+: (warning|error)' "$sparse_log" >&2; then
            die "sparse reported the lines above for driver $ver"
        fi
        for obj in $NEW_OBJECTS; do
            grep -q "CHECK .*${obj%.o}\.c" "$sparse_log" || die "sparse did not run on ${obj%.o}.c (log: $sparse_log)"
        done
        say "sparse: no warnings in $(cd "$PATCH_DIR/src" && echo *.c)"
        echo "$tree"
        return 0
    fi
    say "building nvidia-uvm.ko for driver $ver, kernel $rel ($KOUT), without an installed nvidia.ko's symbol versions: for checking only (install-driver builds its own)"
    # nvidia's conftest is generated by nvidia.Kbuild, so both modules are named, but only the
    # nvidia-uvm.ko target is built (nvidia.ko's own files need not compile on these headers);
    # nvidia.ko's symbols stay unresolved (KBUILD_MODPOST_WARN=1): no CRCs, no load-time guard.
    kbuild nvidia-uvm.ko > "$out/build.log" 2>&1 || {
        grep -E 'error|Error' "$out/build.log" | grep -v '^NV_CONFTEST\|^KBUILD_CFLAGS' | sed -n 1,40p >&2 || true
        die "build failed for $ver on $rel (log: $out/build.log)"
    }
    [ -f "$tree/nvidia-uvm.ko" ] || die "no nvidia-uvm.ko produced (log: $out/build.log)"
    say "built $tree/nvidia-uvm.ko in $(( $(date +%s) - t0 ))s (version $(ko_version "$tree/nvidia-uvm.ko"))"
    echo "$tree/nvidia-uvm.ko"
}

cmd_driver() {
    local ver installed note= mode=
    REL=${KERNEL_RELEASE:-$(uname -r)}
    # The nvidia.ko installed for this kernel (what the module must match), if any.
    installed=$(module_facts nvidia-version "$REL" 2>/dev/null) || installed=
    ver=${DRIVER_VERSION:-$installed}
    if [ -z "$ver" ]; then
        ver=$DEFAULT_VERSION
        note="no NVIDIA driver installed for $REL: building for $ver from Debian's source, for checking only"
    fi
    if ! kernel_dirs "$REL"; then
        [ -z "${KERNEL_SRC:-}${KERNEL_RELEASE:-}" ] ||
            die "no kernel headers for $REL (install linux-headers-$REL, or pass KERNEL_SRC=/path)"
        check_kernel
        say "no headers for the running kernel $(uname -r): building against the $REL headers instead (the module will not load on this kernel)"
        installed=
    fi
    [ -z "$note" ] || say "$note"
    [ -z "$installed" ] || [ "$ver" != "$installed" ] || mode=symvers
    build "$ver" "$REL" "$BUILD/$ver-$REL" $mode
}

# cmd_tree VERSION: print a patched source tree of VERSION, never built in (DKMS copies it).
cmd_tree() {
    local tree
    [ -n "${1:-}" ] || die "usage: kvc.sh tree VERSION"
    prepare_tree "$1" "$BUILD/src-$1"
    echo "$tree"
}

cmd_check() {
    local t0 ver out rc failed=()
    t0=$(date +%s)
    need_tool sparse sparse
    check_kernel
    # Debian's sources by default; NVIDIA_SRC checks one tree of your own (e.g. a 580 tag).
    local own_src=${NVIDIA_SRC:-}
    if [ -n "$own_src" ] && [ "$(wc -w <<< "${CHECK_VERSIONS:-}")" != 1 ]; then
        die "NVIDIA_SRC=$own_src: also say which version it is, e.g. CHECK_VERSIONS=580.142"
    fi
    for ver in ${CHECK_VERSIONS:-535.261.03 550.163.01}; do
        out=$BUILD/check-$ver-$REL
        if [ -z "$own_src" ] && compile_cached "$ver" && analysis_cached "$ver"; then
            say "OK   $ver on $REL: patch applies, patched objects compile, new files -Werror and sparse clean (cached: nothing they depend on changed)"
        else
            NVIDIA_SRC=$own_src run_step rc build "$ver" "$REL" "$out" check > /dev/null
            if [ "$rc" != 0 ]; then
                say "FAIL $ver on $REL"; failed+=("$ver"); continue
            fi
            say "OK   $ver on $REL: patch applies, patched objects compile, new files -Werror and sparse clean"
            [ -n "$own_src" ] || { : > "$BUILD/analysis/compile.part"; store_result "compile-sparse-$ver" "$(compile_key "$ver")" "$BUILD/analysis/compile.part"; }
        fi
        run_step rc analyze_version "$ver" "$out/tree"
        [ "$rc" = 0 ] || failed+=("$ver (static analysis)")
    done
    run_step rc analyze_cocci
    [ "$rc" = 0 ] || failed+=("coccinelle")
    run_step rc analyze_modversions
    [ "$rc" = 0 ] || failed+=("modversions")
    say "driver-check took $(( $(date +%s) - t0 ))s"
    [ ${#failed[@]} = 0 ] || die "driver-check failed for ${failed[*]} on $REL (the reasons are above)"
}

# compile_key VERSION: a hash of what the compile + sparse check of VERSION depends on; a
# passed check leaves an (empty) result under it.
compile_key() {
    mkdir -p "$BUILD/analysis"
    analysis_key compile "$1" "$REL" "$(patch_stamp)" "$(gcc --version | sed -n 1p)" "$(sparse --version 2>&1)" \
        "$KOUT" "$(sha256sum < "$KMOD_DIR/kvc.sh")"
}
compile_cached() { [ -f "$(result_file "compile-sparse-$1" "$(compile_key "$1")")" ]; }

. "$KMOD_DIR/analyze.sh"

case "${1:-}" in
    driver) cmd_driver ;;
    tree) cmd_tree "${2:-}" ;;
    check) cmd_check ;;
    install|uninstall) error_mark_cleanup; unset KVC_ERROR_MARK; exec "$KMOD_DIR/install.sh" "$1" ;;
    *) die "usage: kvc.sh driver|tree VERSION|check|install|uninstall" ;;
esac
