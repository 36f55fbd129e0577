#!/bin/bash
# kmod/fetch.sh: Debian packages unpacked into the project's cache, without touching the system.
#
#   kmod/fetch.sh [--suite SUITE] [--component COMP]... [--name NAME] [--no-deps] PKG[=VERSION]...
#
# Downloads each PKG, plus those of its dependencies this machine does not have installed (as
# apt's resolver sees them against the system's dpkg database, recommends left out), into
# $KVC_CACHE/debs, unpacks them all into one prefix, $KVC_CACHE/root/NAME, and prints that
# prefix on stdout. Progress and errors go to stderr.
#
#   --suite SUITE     take the named packages from this Debian suite (e.g. trixie); dependencies
#                     come from this machine's own release. Default: this machine's release
#                     (VERSION_CODENAME in /etc/os-release).
#   --component COMP  archive component(s) of SUITE to use: main, contrib, non-free; repeatable or
#                     comma-separated. Default: main. This machine's release always has main.
#   --name NAME       the prefix's name (default: the first package's name and a hash of the
#                     request). Asking again for a NAME with a different request replaces it.
#   --no-deps         only the named packages (for a caller that checks that the one binary it
#                     runs works, e.g. `sparse --version`, and so skips a large dependency tree).
#   PKG=VERSION       an exact Debian version (1.2-3), or an upstream one (1.2: its newest
#                     Debian revision in the archive).
#   KVC_CACHE         the cache directory (default: .cache/kvc in the repository).
#   FETCH_MIRROR      the Debian archive to use. Default: the one this machine's apt configuration
#                     (sources.list, sources.list.d) names for its own release. No archive host is
#                     written in this repository.
#
# The prefix holds the packages' files under their own paths (PREFIX/usr/bin, PREFIX/usr/lib/
# <multiarch>, PREFIX/usr/src, ...). Absolute symlinks that point at a file of the set are made
# relative, so the tree works where it is; paths written inside files are left alone. To run a
# tool from it, put PREFIX/usr/bin on PATH and PREFIX/usr/lib/<multiarch> on LD_LIBRARY_PATH.
#
# Nothing outside $KVC_CACHE is written: apt runs with its own state, cache and sources list
# (under $KVC_CACHE/apt), reads the system's dpkg database and apt.conf, and verifies against the
# archive keyring this machine has. Runs the same as root and as any user.
# Cached: a request already unpacked prints its prefix without running apt (no network I/O);
# downloaded .debs are checked against the archive's signed hashes and reused. Concurrent runs
# wait for each other (flock on $KVC_CACHE/fetch.lock).
# Exit status: 0; 1 with one "kvc: error: ..." line if a package cannot be had; 2 for bad usage.
KMOD_DIR=$(cd "$(dirname "$0")" && pwd)
. "$KMOD_DIR/lib.sh"

usage() {
    echo "usage: kmod/fetch.sh [--suite SUITE] [--component COMP]... [--name NAME] [--no-deps] PKG[=VERSION]..." >&2
    exit 2
}
usage_error() {
    echo "kvc: error: fetch.sh: $*" >&2
    usage
}

CACHE=${KVC_CACHE:-$(cd "$KMOD_DIR/.." && pwd)/.cache/kvc}
APT=$CACHE/apt
DEBS=$CACHE/debs

suite= name= deps=1 components=() packages=()
while [ $# -gt 0 ]; do
    case $1 in
        --suite) [ $# -ge 2 ] || usage_error "--suite needs a value"; suite=$2; shift 2 ;;
        --component) [ $# -ge 2 ] || usage_error "--component needs a value"
            IFS=, read -r -a more <<< "$2"; components+=("${more[@]}"); shift 2 ;;
        --name) [ $# -ge 2 ] || usage_error "--name needs a value"; name=$2; shift 2 ;;
        --no-deps) deps=0; shift ;;
        -h|--help) sed -n '2,/^KMOD_DIR=/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 0 ;;
        --) shift; packages+=("$@"); break ;;
        -*) usage_error "unknown option $1" ;;
        *) packages+=("$1"); shift ;;
    esac
done
[ ${#packages[@]} -gt 0 ] || usage_error "no package named"
for tool in apt-get apt-cache dpkg-deb; do
    command -v "$tool" >/dev/null ||
        die "cannot fetch ${packages[*]}: this machine has no $tool (kmod/fetch.sh reads Debian's archive with apt); install the packages yourself"
done
[ ${#components[@]} -gt 0 ] || components=(main)
for word in "$suite" "${components[@]}" "${packages[@]}"; do
    [[ $word =~ ^[A-Za-z0-9.+~:=_-]*$ ]] || usage_error "'$word' is not a Debian package, version, suite or component name"
done
[[ $name =~ ^[A-Za-z0-9.+_-]*$ ]] || usage_error "--name '$name' must be a plain file name"

# This machine's distribution and release, from /etc/os-release.
os_field() {
    [ -r /etc/os-release ] || return 0
    (. /etc/os-release && printf '%s\n' "${!1:-}")
}
HOST_ID=$(os_field ID)
HOST_RELEASE=$(os_field VERSION_CODENAME)
suite=${suite:-$HOST_RELEASE}
[ -n "$suite" ] || die "cannot tell this machine's release (no VERSION_CODENAME in /etc/os-release): pass --suite"

request=$(printf '%s\n' "suite=$suite" "components=${components[*]}" "deps=$deps" "${packages[@]}")
key=$(sha256sum <<< "$request" | cut -c1-10)
name=${name:-${packages[0]%%=*}-$key}
PREFIX=$CACHE/root/$name

already_fetched() {
    [ -f "$PREFIX/.fetch-request" ] && [ "$(cat "$PREFIX/.fetch-request")" = "$request" ]
}
if already_fetched; then
    echo "$PREFIX"
    exit 0
fi

mkdir -p "$CACHE" "$DEBS" "$CACHE/root" "$APT/sources.list.d" "$APT/state/lists/partial" \
    "$APT/cache/archives/partial"
exec 9>"$CACHE/fetch.lock"
flock -w 1800 9 || die "another kmod/fetch.sh has held $CACHE/fetch.lock for 30 minutes"
if already_fetched; then  # a concurrent run made it while this one waited
    echo "$PREFIX"
    exit 0
fi

# --- the archive and apt's private configuration -----------------------------------------------

# The archive this machine's apt configuration uses for SUITE, else (on Debian) for its own release.
machine_mirror() {
    local targets
    targets=$(apt-get indextargets --no-release-info --format '$(TARGET_OF) $(RELEASE) $(REPO_URI)' 2>/dev/null || true)
    [ "$HOST_ID" = debian ] || HOST_RELEASE=
    awk -v s="$suite" -v h="$HOST_RELEASE" '$1 == "deb" && $2 == s { print $3; exit }
        $1 == "deb" && $2 == h && !host { host = $3 }
        END { if (host) print host }' <<< "$targets" | sed -n 1p
}
MIRROR=${FETCH_MIRROR:-$(machine_mirror)}
[ -n "$MIRROR" ] || die "cannot fetch ${packages[*]}: this machine's apt configuration (/etc/apt/sources.list*) names no Debian archive for '$suite'; add one, or pass FETCH_MIRROR=<a Debian mirror URL>"
# Dependencies come from this machine's release, when that is in the same archive.
with_host=0
if [ -n "$HOST_RELEASE" ] && { [ "$suite" = "$HOST_RELEASE" ] || [ "$HOST_ID" = debian ]; }; then
    with_host=1
fi

APT_OPTS=(
    -o "Dir::State=$APT/state" -o "Dir::State::status=/var/lib/dpkg/status"
    -o "Dir::Cache=$APT/cache" -o "Dir::Cache::pkgcache=pkgcache.bin" -o "Dir::Cache::srcpkgcache=srcpkgcache.bin"
    -o "Dir::Etc::SourceList=$APT/sources.list" -o "Dir::Etc::SourceParts=$APT/sources.list.d"
    -o "Acquire::Languages=none" -o "APT::Install-Recommends=false"
)
# As root apt downloads as user _apt, who may not reach a cache inside a private home.
[ "$(id -u)" != 0 ] || APT_OPTS+=(-o "APT::Sandbox::User=root")

# The suites and components used so far (this machine's release's main always among them), so
# one set of package lists serves every request.
targets_file=$APT/targets
{
    [ "$with_host" = 0 ] || echo "$HOST_RELEASE main"
    for c in "${components[@]}"; do echo "$suite $c"; done
    cat "$targets_file" 2>/dev/null || true
} | sort -u > "$targets_file.new"
mv "$targets_file.new" "$targets_file"
[ "$with_host" = 0 ] || APT_OPTS+=(-o "APT::Default-Release=$HOST_RELEASE")

keyring=
[ -r /usr/share/keyrings/debian-archive-keyring.gpg ] && keyring=/usr/share/keyrings/debian-archive-keyring.gpg
awk -v m="$MIRROR" -v k="${keyring:+[signed-by=$keyring] }" '
    { comps[$1] = comps[$1] " " $2 }
    END { for (s in comps) print "deb " k m " " s comps[s] }' "$targets_file" | sort > "$APT/sources.list.new"
mv "$APT/sources.list.new" "$APT/sources.list"

# The suites and components apt reads, e.g. "bookworm/main bookworm/contrib trixie/contrib".
suites_read() { sort -u "$targets_file" | awk '{ printf "%s%s/%s", (NR > 1 ? " " : ""), $1, $2 }'; }
apt_get() { apt-get "${APT_OPTS[@]}" "$@"; }
apt_cache() { apt-cache "${APT_OPTS[@]}" "$@"; }

# First error lines of an apt log, on one line.
apt_errors() { grep -E '^(W|E|Err):' "$1" | sed -n 1,3p | tr '\n' ' ' || true; }

update_lists() {
    local log=$APT/update.log
    say "reading the package lists of $MIRROR ($(suites_read))"
    if ! apt_get -q update > "$log" 2>&1 || grep -qE '^(E|Err):|^W: Failed to fetch' "$log"; then
        die "cannot fetch ${packages[*]}: apt-get update could not read every package list of $MIRROR: $(apt_errors "$log")(log: $log); check the network to that mirror or pass FETCH_MIRROR=<a Debian mirror URL>, or install the packages yourself"
    fi
    sha256sum < "$APT/sources.list" > "$APT/lists.stamp"
}
lists_current() {
    [ -f "$APT/lists.stamp" ] && [ "$(sha256sum < "$APT/sources.list")" = "$(cat "$APT/lists.stamp")" ]
}

# --- resolving, downloading, unpacking ---------------------------------------------------------

# pin PKG[=VERSION]: the apt argument for it (PKG=exact version, PKG/SUITE, or PKG).
pin() {
    local pkg=${1%%=*} want versions v
    if [ "$pkg" = "$1" ]; then
        if [ "$suite" != "$HOST_RELEASE" ]; then echo "$pkg/$suite"; else echo "$pkg"; fi
        return 0
    fi
    want=${1#*=}
    versions=$(apt_cache madison "$pkg" 2>/dev/null | awk -F'|' '{ gsub(/ /, "", $2); print $2 }')
    for v in $versions; do
        if [ "$v" = "$want" ]; then echo "$pkg=$v"; return 0; fi
    done
    for v in $versions; do
        case $v in "$want"-*|"$want"+*|"$want"~*) echo "$pkg=$v"; return 0 ;; esac
    done
    die "no $pkg $want in $MIRROR ($(suites_read)); it has: ${versions:-none}"
}

# resolve: the apt arguments of every package to download (named ones, and missing dependencies),
# one per package.
resolve() {
    local spec pins=() log=$APT/resolve.log
    for spec in "${packages[@]}"; do pins+=("$(pin "$spec")"); done
    if [ "$deps" = 1 ]; then
        apt_get -s install "${pins[@]}" > "$log" 2>&1 ||
            die "apt cannot resolve the dependencies of ${packages[*]} against this machine's packages: $(apt_errors "$log")(log: $log)"
        # Inst NAME [INSTALLED] (VERSION RELEASE [ARCH]): what this machine lacks or has too old.
        awk '$1 == "Inst" { v = ($3 ~ /^\[/) ? $4 : $3; sub(/^\(/, "", v); print $2 "=" v }' "$log"
    fi
    printf '%s\n' "${pins[@]}"
}
one_per_package() { awk -F'[=/]' '!seen[$1]++'; }

# download PIN...: fetch the .debs into $DEBS (apt verifies each against the signed lists and
# skips files it already has) and print their paths.
download() {
    local log=$APT/download.log uris
    uris=$(apt_get download --print-uris "$@" 2> "$log") || return 1
    local missing
    missing=$(awk -v d="$DEBS" '(getline line < (d "/" $2)) < 0 { n++; mb += $3 / 1e6; names = names " " $2 }
        END { if (n) printf "%d package(s), %.1f MB:%s", n, mb, names }' <<< "$uris")
    [ -z "$missing" ] || say "downloading $missing"
    (cd "$DEBS" && apt_get -q download "$@") >> "$log" 2>&1 || return 1
    awk -v d="$DEBS" '{ print d "/" $2 }' <<< "$uris"
}

# relink_absolute DIR: an absolute symlink to a path inside DIR becomes relative.
relink_absolute() {
    local dir=$1 link target
    while IFS= read -r -d '' link; do
        target=$(readlink "$link")
        if [ -e "$dir$target" ] || [ -L "$dir$target" ]; then
            ln -sfn "$(realpath -ms --relative-to="$(dirname "$link")" "$dir$target")" "$link"
        fi
    done < <(find "$dir" -type l -lname '/*' -print0)
}

lists_current || update_lists
pins=$(resolve | one_per_package)
if ! debs=$(download $pins); then
    # The lists may be older than the archive (a package replaced by a newer revision): refresh once.
    update_lists
    pins=$(resolve | one_per_package)
    debs=$(download $pins) || die "cannot download ${packages[*]} from $MIRROR: $(apt_errors "$APT/download.log")(log: $APT/download.log)"
fi

tmp=$(mktemp -d "$CACHE/root/.$name.XXXXXX")
trap 'rm -rf "$tmp"; error_mark_cleanup' EXIT
for deb in $debs; do
    dpkg-deb -x "$deb" "$tmp" || die "cannot unpack $deb"
done
relink_absolute "$tmp"
printf '%s\n' ${debs//$DEBS\//} > "$tmp/.fetch-debs"
echo "$request" > "$tmp/.fetch-request"
rm -rf "$PREFIX"
mv "$tmp" "$PREFIX"
echo "$PREFIX"
