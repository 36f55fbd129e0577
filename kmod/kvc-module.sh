#!/bin/bash
# kmod/kvc-module.sh: the patched nvidia-uvm.ko and the NVIDIA driver installed for one kernel.
# install.sh and kvc.sh use it, and it ships with the DKMS source (dkms.conf runs it), so it needs
# only lib.sh next to it, binutils (readelf) and kmod (modinfo).
#
#   kvc-module.sh nvidia-ko KERNEL        path of the nvidia.ko that KERNEL's modprobe loads
#   kvc-module.sh nvidia-version KERNEL   its version (modinfo), e.g. 535.261.03
#   kvc-module.sh uvm-stem KERNEL         file name, without .ko, of the driver's own nvidia-uvm
#                                         for KERNEL (nvidia-uvm; Debian: nvidia-current-uvm)
#   kvc-module.sh symvers KERNEL OUT      write OUT, a Module.symvers of what that nvidia.ko
#                                         exports, with the CRCs it carries (modversions)
#   kvc-module.sh check-crcs KO KERNEL    KO records, for every nvidia.ko symbol it uses, the CRC
#                                         the installed nvidia.ko exports (so a mismatched pair
#                                         refuses to load); prints how many it checked
#   kvc-module.sh build TREE KERNEL KOUT KSRC [JOBS]
#                                         build TREE/nvidia-uvm.ko against KERNEL's nvidia.ko
#                                         symbols (no KBUILD_MODPOST_WARN: a symbol nvidia.ko
#                                         does not export fails the build)
#   kvc-module.sh signed KO               exit 0 if KO carries a module signature
#   kvc-module.sh place KERNEL KO         make KO what modprobe loads as nvidia-uvm on KERNEL only:
#                                         copy to updates/kvc/<uvm-stem>.ko plus a depmod.d
#                                         override line naming KERNEL (the caller runs depmod)
#   kvc-module.sh unplace KERNEL          undo `place` for KERNEL
#   kvc-module.sh placed-kernels          the kernels `place` has an override line for
#   kvc-module.sh builds-for KERNEL VERSION
#                                         exit 0 only if KERNEL's nvidia.ko is driver VERSION
#                                         (dkms.conf's BUILD_EXCLUSIVE_KERNEL comes from this)
#   kvc-module.sh dkms-build KERNEL KSRC VERSION [JOBS]      DKMS MAKE[0] (in the build tree)
#   kvc-module.sh dkms-post-install KERNEL ARCH              DKMS POST_INSTALL
#   kvc-module.sh dkms-post-remove KERNEL                    DKMS POST_REMOVE
#
# KVC_SYSROOT (default empty) is prepended to every system path (/lib/modules, /etc/depmod.d)
# and given to modinfo as its base directory: the installer tests' sandbox, driver-check's
# modversions check.
KMOD_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$KMOD_DIR/lib.sh"
export LC_ALL=C  # sort and join agree on the order

SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/kvc-module.XXXXXX")
trap 'rm -rf "$SCRATCH"; error_mark_cleanup' EXIT

SYSROOT=${KVC_SYSROOT:-}
OVERRIDE=$SYSROOT/etc/depmod.d/pyvattn-kvc.conf
OVERRIDE_HEADER="# pyvattn KVC nvidia-uvm (kmod/kvc-module.sh place): one line per kernel it was built for"
PLACE_DIR=updates/kvc
# The DKMS package's own copy of the module (DEST_MODULE_NAME in dkms.conf.in); never loaded by
# that name, `place` copies it under the driver's own file name.
DKMS_MODULE=nvidia-uvm-kvc

modules_dir() { echo "$SYSROOT/lib/modules/$1"; }

# --- modules of a kernel --------------------------------------------------------------------

# stems_named KERNEL NAME: the distinct file names (without .ko*) under KERNEL's modules whose
# module name (as the kernel sees it, nvidia_uvm) is NAME, ours left out. Distributions rename
# files (Debian: nvidia-current-uvm.ko, loaded through modprobe.d `install` lines).
stems_named() {
    local rel=$1 name=$2 dir files=() file names
    dir=$(modules_dir "$rel")
    [ -d "$dir" ] || return 0
    while IFS= read -r -d '' file; do
        case $file in "$dir/$PLACE_DIR"/*|*/"$DKMS_MODULE".ko*) continue ;; esac
        files+=("$file")
    done < <(find "$dir" -name 'nvidia*.ko*' -print0 2>/dev/null)
    [ ${#files[@]} -gt 0 ] || return 0
    # One modinfo for all of them: a "name" line per file, in order (file by file if some file
    # has no name, which would misalign the lines).
    names=$(modinfo -F name "${files[@]}" 2>/dev/null || true)
    if [ "$(grep -c . <<< "$names")" != ${#files[@]} ]; then
        names=$(for file in "${files[@]}"; do modinfo -F name "$file" 2>/dev/null | grep . || echo -; done)
    fi
    paste -d' ' <(tr - _ <<< "$names") <(printf '%s\n' "${files[@]}") |
        awk -v n="$name" '$1 == n { f = $2; sub(/.*\//, "", f); sub(/\.ko.*/, "", f); print f }' | sort -u
}

# one_stem KERNEL NAME WHAT: the single stem of NAME, or die naming what was found.
one_stem() {
    local rel=$1 name=$2 what=$3 stems
    stems=$(stems_named "$rel" "$name")
    [ -n "$stems" ] || die "no $what module is installed for kernel $rel (no nvidia*.ko named $name under $(modules_dir "$rel")); install the NVIDIA driver for it first"
    [ "$(wc -l <<< "$stems")" = 1 ] ||
        die "several $what modules are installed for kernel $rel ($(echo $stems)); cannot tell which one modprobe loads"
    echo "$stems"
}

cmd_nvidia_ko() {
    local rel=$1 stem path
    stem=$(one_stem "$rel" nvidia "NVIDIA (nvidia.ko)")
    path=$(modinfo ${SYSROOT:+-b "$SYSROOT"} -k "$rel" -n "$stem" 2>/dev/null) || true
    [ -n "$path" ] && [ -f "$path" ] || die "modinfo -k $rel finds no file for $stem (run depmod -a $rel?)"
    echo "$path"
}

cmd_nvidia_version() {
    local ko ver
    ko=$(cmd_nvidia_ko "$1")
    ver=$(modinfo -F version "$ko" 2>/dev/null | sed -n 1p) || true
    [ -n "$ver" ] || die "$ko has no version (modinfo -F version)"
    echo "$ver"
}

cmd_uvm_stem() { one_stem "$1" nvidia_uvm "NVIDIA UVM (nvidia-uvm.ko)"; }

# --- symbol versions ---------------------------------------------------------------------------

# elf_copy KO: KO itself, or a decompressed copy of it (.ko.xz, .ko.zst, .ko.gz) in SCRATCH.
elf_copy() {
    local ko=$1 out
    [ -f "$ko" ] || die "$ko: no such file"
    out=$(mktemp "$SCRATCH/elf.XXXXXX")
    case $ko in
        *.ko) echo "$ko"; return 0 ;;
        *.xz) xz -dc "$ko" > "$out" ;;
        *.zst) zstd -qdc "$ko" > "$out" ;;
        *.gz) gzip -dc "$ko" > "$out" ;;
        *) die "$ko: not a kernel module file name" ;;
    esac || die "cannot decompress $ko"
    echo "$out"
}

# sections ELF: "INDEX NAME OFFSET SIZE" per section (readelf's hexadecimal offset and size).
sections() {
    readelf -SW "$1" | sed -n 's/^ *\[ *\([0-9][0-9]*\)\] /\1 /p' |
        awk '$1 > 0 { print $1, $2, $5, $6 }'
}

# exported_crcs ELF: "0xCRC NAME EXPORT_SYMBOL[_GPL]" for every symbol ELF exports with a CRC.
# A CRC is either an absolute __crc_NAME symbol (kernels before 5.19) or the 4 bytes a
# __crc_NAME label points at in a __kcrctab section (5.19 and later): each such section is read
# once, as little-endian words.
exported_crcs() {
    local elf=$1 secs syms ndx sec off size out
    secs=$(sections "$elf")
    syms=$(readelf -sW "$elf" | awk '$8 ~ /^__crc_/ { print $7, $2, substr($8, 7) }')
    [ -n "$syms" ] || return 0
    out=$(awk '$1 == "ABS" { print "0x" substr($2, length($2) - 7), $3, "EXPORT_SYMBOL" }' <<< "$syms")
    for ndx in $(awk '$1 != "ABS" { print $1 }' <<< "$syms" | sort -u); do
        read -r sec off size < <(awk -v n="$ndx" '$1 == n { print $2, $3, $4 }' <<< "$secs")
        [ -n "$off" ] || die "$elf: no section $ndx for its __crc_ symbols"
        out+=$'\n'$(awk -v n="$ndx" -v sec="$sec" '
            NR == FNR { for (i = 1; i <= NF; i++) word[w++] = $i; next }
            $1 == n {
                v = 0; hex = "0123456789abcdef"; s = tolower($2)
                for (i = 1; i <= length(s); i++) v = v * 16 + index(hex, substr(s, i, 1)) - 1
                if (v % 4 || !((v / 4) in word)) { print "bad", $3; next }
                print "0x" word[v / 4], $3, (sec ~ /_gpl/ ? "EXPORT_SYMBOL_GPL" : "EXPORT_SYMBOL")
            }' <(od -An -v -tx4 --endian=little -j $((16#$off)) -N $((16#$size)) "$elf") - <<< "$syms")
    done
    ! grep -q '^bad ' <<< "$out" || die "$elf: __crc_ labels that point at no CRC: $(grep '^bad ' <<< "$out" | cut -d' ' -f2 | tr '\n' ' ')"
    grep . <<< "$out" || true
}

# exported_names ELF: names ELF exports (__ksymtab_NAME), for kernels without modversions.
exported_names() {
    readelf -sW "$1" | awk '$8 ~ /^__ksymtab_/ && $8 !~ /^__ksymtab_(gpl|strings)$/ { print substr($8, 11) }' | sort -u
}

# kernel_config KOUT NAME: y/m/empty for CONFIG_NAME of the kernel whose build dir is KOUT.
kernel_config() {
    sed -n "s/^CONFIG_$2=\(.*\)/\1/p" "$1/include/config/auto.conf" "$1/.config" 2>/dev/null | sed -n 1p
}

cmd_symvers() {
    local rel=$1 out=$2 ko elf lines kout ref order
    ko=$(cmd_nvidia_ko "$rel")
    elf=$(elf_copy "$ko")
    lines=$(exported_crcs "$elf")
    kout=$(modules_dir "$rel")/build
    if [ -z "$lines" ]; then
        if [ "$(kernel_config "$kout" MODVERSIONS)" = y ]; then
            die "$ko carries no symbol CRCs but kernel $rel checks them (CONFIG_MODVERSIONS): cannot build a module that refuses a mismatched nvidia.ko"
        fi
        lines=$(exported_names "$elf" | awk '{ print "0x00000000", $1, "EXPORT_SYMBOL" }')
    fi
    [ -n "$lines" ] || die "$ko exports no symbols (readelf finds no __crc_ or __ksymtab_ symbol)"
    # The field order of the kernel's own Module.symvers: 5.10+ "crc sym module export ns",
    # 5.4-5.9 "crc sym ns module export", older "crc sym module export".
    ref=$(sed -n 1p "$kout/Module.symvers" 2>/dev/null || true)
    order=new
    if [ -n "$ref" ]; then
        case $(awk -F'\t' '{ print NF ":" ($4 ~ /^EXPORT/) ":" ($5 ~ /^EXPORT/) }' <<< "$ref") in
            5:0:1) order=ns-third ;;
            4:*) order=old ;;
        esac
    fi
    mkdir -p "$(dirname "$out")"
    awk -v order="$order" 'BEGIN { OFS = "\t" }
        order == "new" { print $1, $2, "nvidia", $3, "" }
        order == "ns-third" { print $1, $2, "", "nvidia", $3 }
        order == "old" { print $1, $2, "nvidia", $3 }' <<< "$lines" > "$out"
    say "symbol versions of $ko: $(wc -l < "$out") exports -> $out"
}

# used_crcs ELF: "0xCRC NAME" for every symbol ELF records a CRC of (its __versions section:
# 64-byte entries, an unsigned long CRC then the NUL-padded name).
used_crcs() {
    local elf=$1 off size
    read -r off size < <(sections "$elf" | awk '$2 == "__versions" { print $3, $4 }')
    [ -n "$off" ] || return 0
    paste -d' ' \
        <(od -An -v -w64 -tx4 --endian=little -j $((16#$off)) -N $((16#$size)) "$elf" | awk '{ print "0x" $1 }') \
        <(od -An -v -w64 -tu1 -j $((16#$off)) -N $((16#$size)) "$elf" |
          awk '{ s = ""; for (i = 9; i <= NF && $i != 0; i++) s = s sprintf("%c", $i); print s }')
}

cmd_check_crcs() {
    local ko=$1 rel=$2 nv mine theirs checked bad
    nv=$(cmd_nvidia_ko "$rel")
    theirs=$(exported_crcs "$(elf_copy "$nv")" | awk '{ print $2, $1 }' | sort)
    mine=$(used_crcs "$(elf_copy "$ko")" | awk '{ print $2, $1 }' | sort)
    [ -n "$theirs" ] || die "$nv carries no symbol CRCs: nothing to check $ko against"
    # Symbols both name: every CRC must agree; at least one must be there.
    checked=$(join <(echo "$mine") <(echo "$theirs"))
    [ -n "$checked" ] || die "$ko records no CRC of any symbol $nv exports (built without its Module.symvers?): it would load against any nvidia.ko"
    bad=$(awk '$2 != $3 { print $1 " (" $2 " here, " $3 " in nvidia.ko)" }' <<< "$checked")
    [ -z "$bad" ] || die "$ko was built against another nvidia.ko than $nv: $(echo $bad | cut -c1-300)"
    echo "$(wc -l <<< "$checked") symbol CRCs of $nv match"
}

# --- building -----------------------------------------------------------------------------------

cmd_build() {
    local tree=$1 rel=$2 kout=$3 ksrc=$4 jobs=${5:-$(nproc)} log
    [ -f "$tree/nvidia-uvm/uvm_kvc.c" ] || die "$tree is not a KVC-patched NVIDIA source tree (no nvidia-uvm/uvm_kvc.c)"
    cmd_symvers "$rel" "$tree/nvidia.symvers"
    log=$tree/build.log
    say "building $tree/nvidia-uvm.ko against kernel $rel ($kout) and its nvidia.ko's symbols"
    # nvidia's conftest is generated by nvidia.Kbuild, so both modules are named; only the
    # nvidia-uvm.ko target is built.
    make -C "$kout" M="$tree" NV_KERNEL_SOURCES="$ksrc" NV_KERNEL_OUTPUT="$kout" \
        NV_KERNEL_MODULES="nvidia nvidia-uvm" KBUILD_EXTRA_SYMBOLS="$tree/nvidia.symvers" \
        -j"$jobs" nvidia-uvm.ko > "$log" 2>&1 || {
        grep -E 'error|ERROR' "$log" | grep -v '^NV_CONFTEST\|^KBUILD_CFLAGS' | sed -n 1,40p >&2 || true
        die "building nvidia-uvm.ko for kernel $rel failed (log: $log)"
    }
    [ -f "$tree/nvidia-uvm.ko" ] || die "the build made no $tree/nvidia-uvm.ko (log: $log)"
    say "$(cmd_check_crcs "$tree/nvidia-uvm.ko" "$rel")"
}

# The kernel's MODULE_SIG_STRING, the last bytes of a signed module.
cmd_signed() {
    tail -c 28 "$(elf_copy "$1")" | cmp -s - <(printf '~Module signature appended~\n')
}

# --- placing the module for one kernel ------------------------------------------------------------

cmd_place() {
    local rel=$1 ko=$2 stem dir dest suffix
    stem=$(cmd_uvm_stem "$rel")
    dir=$(modules_dir "$rel")/$PLACE_DIR
    suffix=.ko${ko##*.ko}
    dest=$dir/$stem$suffix
    cmd_unplace "$rel"
    mkdir -p "$dir"
    install -m 0644 "$ko" "$dest"
    mkdir -p "$(dirname "$OVERRIDE")"
    { [ -s "$OVERRIDE" ] || echo "$OVERRIDE_HEADER"; } >> "$OVERRIDE"
    # depmod compares the override with the file's path literally (dashes are not underscores).
    echo "override $stem $rel $PLACE_DIR" >> "$OVERRIDE"
    say "placed $dest for kernel $rel (override in $OVERRIDE)"
}

cmd_unplace() {
    local rel=$1 dir rest
    dir=$(modules_dir "$rel")/$PLACE_DIR
    rm -rf "$dir"
    rmdir "$(dirname "$dir")" 2>/dev/null || true   # updates/, if this made it empty
    [ -f "$OVERRIDE" ] || return 0
    rest=$(awk -v r="$rel" '!($1 == "override" && $3 == r)' "$OVERRIDE")
    if grep -q '^override ' <<< "$rest"; then
        echo "$rest" > "$OVERRIDE"
    else
        rm -f "$OVERRIDE"
    fi
}

cmd_placed_kernels() {
    [ ! -f "$OVERRIDE" ] || awk '$1 == "override" { print $3 }' "$OVERRIDE" | sort -u
}

# --- DKMS hooks -------------------------------------------------------------------------------------

cmd_builds_for() {
    local rel=$1 want=$2 have
    [ -n "$rel" ] || return 1
    have=$(cmd_nvidia_version "$rel" 2>/dev/null) || return 1
    [ "$have" = "$want" ]
}

cmd_dkms_build() {
    local rel=$1 ksrc=$2 want=$3 jobs=${4:-} have kout
    have=$(cmd_nvidia_version "$rel")
    [ "$have" = "$want" ] ||
        die "not building nvidia-uvm-kvc $want for kernel $rel: its nvidia.ko is driver $have (run make install-driver again for $have)"
    kout=$ksrc
    ksrc=$(readlink -e "$(modules_dir "$rel")/source" 2>/dev/null || echo "$kout")
    cmd_build "$PWD" "$rel" "$kout" "$ksrc" $jobs
}

cmd_dkms_post_install() {
    local rel=$1 arch=$2 here ko
    here=$(cd "$KMOD_DIR/.." && pwd)  # $dkms_tree/<module>/<version> (KMOD_DIR is its source/)
    ko=$(ls "$here/$rel/$arch/module/$DKMS_MODULE".ko* 2>/dev/null | sed -n 1p)
    [ -n "$ko" ] || die "DKMS built no $DKMS_MODULE.ko for $rel/$arch under $here"
    cmd_place "$rel" "$ko"
}

usage() {
    echo "usage: kvc-module.sh $(sed -n 's/^#   kvc-module.sh \([a-z-]*\).*/\1/p' "${BASH_SOURCE[0]}" | paste -sd'|') ARGS..." >&2
    echo "       (the header of ${BASH_SOURCE[0]} says what each one takes and does)" >&2
    exit 2
}
# need N ARGS...: exactly N arguments (M optional ones may follow when called as need N M).
need() {
    local min=$1 max=$2; shift 2
    [ $# -ge "$min" ] && [ $# -le "$max" ] || usage
}

cmd=${1:-}
[ $# = 0 ] || shift
case $cmd in
    nvidia-ko) need 1 1 "$@"; cmd_nvidia_ko "$1" ;;
    nvidia-version) need 1 1 "$@"; cmd_nvidia_version "$1" ;;
    uvm-stem) need 1 1 "$@"; cmd_uvm_stem "$1" ;;
    symvers) need 2 2 "$@"; cmd_symvers "$1" "$2" ;;
    check-crcs) need 2 2 "$@"; cmd_check_crcs "$1" "$2" ;;
    build) need 4 5 "$@"; cmd_build "$@" ;;
    signed) need 1 1 "$@"; cmd_signed "$1" ;;
    place) need 2 2 "$@"; cmd_place "$1" "$2" ;;
    unplace) need 1 1 "$@"; cmd_unplace "$1" ;;
    placed-kernels) need 0 0 "$@"; cmd_placed_kernels ;;
    builds-for) need 2 2 "$@"; cmd_builds_for "$1" "$2" ;;
    dkms-build) need 3 4 "$@"; cmd_dkms_build "$@" ;;
    dkms-post-install) need 2 2 "$@"; cmd_dkms_post_install "$1" "$2" ;;
    dkms-post-remove) need 1 1 "$@"; cmd_unplace "$1" ;;
    *) usage ;;
esac
