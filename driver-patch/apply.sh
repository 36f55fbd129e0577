#!/bin/sh
# Apply the KVC patch to an NVIDIA open kernel module source tree.
#
#   driver-patch/apply.sh TREE VERSION
#
# TREE is the directory that contains nvidia-uvm/ (Debian: modules/nvidia-open-kernel,
# GitHub: kernel-open). VERSION is the driver version (535.261.03, ...). The `series` file maps
# each supported version (or branch) to its hooks patch and compat header. Exits 2 for an
# unsupported version, 1 if the patch does not apply; changes nothing in either case.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
tree=${1:?usage: apply.sh TREE VERSION}
version=${2:?usage: apply.sh TREE VERSION}

if [ ! -f "$tree/nvidia-uvm/uvm.c" ]; then
    echo "apply.sh: $tree does not contain nvidia-uvm/uvm.c" >&2
    exit 1
fi
if [ -f "$tree/nvidia-uvm/uvm_kvc.c" ]; then
    echo "apply.sh: $tree is already patched" >&2
    exit 1
fi

# series: "<version or branch prefix> <patch dir>", first match wins (exact versions first).
dir=$(awk -v v="$version" '
    /^#/ || NF < 2 { next }
    $1 == v { print $2; exit }
    index(v, $1 ".") == 1 { if (!pfx) pfx = $2 }
    END { if (pfx) print pfx }' "$here/series" | head -n 1)
if [ -z "$dir" ]; then
    echo "apply.sh: driver $version is not supported (supported: $(awk '!/^#/ && NF >= 2 {printf "%s ", $1}' "$here/series"))" >&2
    exit 2
fi
if [ "$dir" != "$version" ]; then
    echo "apply.sh: note: no patch made for exactly $version; using the $dir one (same branch, not compile-checked by CI)" >&2
fi

patch -p1 --dry-run --batch --forward -s -d "$tree" < "$here/$dir/uvm-kvc-hooks.patch" >/dev/null || {
    echo "apply.sh: the $dir hooks patch does not apply to $tree" >&2
    exit 1
}
patch -p1 --batch --forward -s -d "$tree" < "$here/$dir/uvm-kvc-hooks.patch"
find "$tree/nvidia-uvm" -name '*.orig' -delete
cp "$here"/src/uvm_kvc*.c "$here"/src/uvm_kvc*.h \
   "$here/include/uvm_kvc_ioctl.h" "$here/$dir/uvm_kvc_compat.h" "$tree/nvidia-uvm/"
echo "$version $dir" > "$tree/nvidia-uvm/.uvm-kvc-applied"
echo "apply.sh: patched $tree for $version ($dir)"
