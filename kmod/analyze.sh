# kmod/analyze.sh: static analysis of the driver patch's new files for `make driver-check`.
# Sourced by kmod/kvc.sh (uses its fetch, use_prefix, kbuild, NEW_OBJECTS, KOUT, KSRC, CACHE).
#
# Checks beyond the -Werror compile and sparse, each named on its own output line
# ("kvc: <check> <version>: OK|FINDINGS|FAILED ..."), each finding as file:line: message:
#   analyzer   gcc -fanalyzer on every new .c file, with exactly the flags kbuild compiled it
#              with (the command in its .cmd file), per driver version
#   debug-w1   a UVM_BUILD_TYPE=debug build (-DDEBUG -O1: UVM_ASSERT and the lock tracker
#              compiled in) of every patched object with the kernel's W=1 warnings, in a copy of
#              the checked tree, per version: a compile error fails it; so does any warning in a
#              new file (NVIDIA's own headers are not W=1 clean and are not judged)
#   coccinelle the kernel's semantic patches api/kvmalloc, locks/*, null/*, tests/* (from
#              Debian's linux-source, fetched), the lock ones also taught UVM's lock calls, on
#              driver-patch/src; null/badzero is left out: its OCaml rules need ocamlopt, and
#              what it reports (a pointer compared with 0) is style
#   modversions the install-time ABI guard, with the real kbuild of the checked headers: a
#              stand-in nvidia.ko (kmod/modversions) exporting a function that takes a struct;
#              kvc-module.sh symvers reads its CRCs; a stand-in nvidia-uvm.ko builds with them
#              and no KBUILD_MODPOST_WARN; kvc-module.sh check-crcs accepts it; after the struct
#              changes (a driver upgrade), check-crcs must refuse it
# Every analysis tool first runs on kmod/analysis-canary.c and must report its planted bugs, so
# a tool that silently stopped seeing anything fails instead of passing.
# Results are cached under $BUILD/analysis by a hash of all they depend on (the patch, the
# kernel headers' release, the tools' versions, this file, the semantic patches): a warm run
# with nothing changed runs no tool.
#
# What a check's findings do: "enforce" fails driver-check, "report" only prints them.
declare -A ANALYSIS_MODE=(
    [modversions]=enforce
    [debug-w1]=enforce
    [analyzer]=enforce
    [coccinelle]=enforce
)
# The kernel's semantic patches this runs (paths under scripts/coccinelle).
COCCI_SCRIPTS="api/kvmalloc.cocci locks/call_kern.cocci locks/double_lock.cocci locks/flags.cocci
    locks/mini_lock.cocci null/deref_null.cocci null/eno.cocci null/kmerr.cocci
    tests/doublebitand.cocci tests/doubletest.cocci tests/odd_ptr_err.cocci
    tests/unsigned_lesser_than_zero.cocci"
# UVM's lock calls, added next to mutex_lock in the locks/* scripts.
UVM_LOCK_CALLS="uvm_mutex_lock uvm_mutex_lock_nested uvm_down_read uvm_down_write
    uvm_va_space_down_read uvm_va_space_down_write uvm_spin_lock uvm_spin_lock_irqsave"
CANARY=$KMOD_DIR/analysis-canary.c

# What a finding looks like in each tool's output: a location in a new file.
NEW_FILE_RE='uvm_kvc[a-z_]*\.[ch]:[0-9]+'

# analysis_key NAME PARTS...: a hash naming one check's inputs.
analysis_key() {
    { printf '%s\n' "$@"; cat "$KMOD_DIR/analyze.sh" "$CANARY"; } | sha256sum | cut -c1-16
}

# result_file NAME KEY: where the findings of NAME with inputs KEY are kept.
result_file() { echo "$BUILD/analysis/$1-$2.findings"; }

# store_result NAME KEY FILE: FILE becomes NAME's findings for KEY (older keys' are dropped).
store_result() {
    rm -f "$BUILD/analysis/$1"-????????????????.findings
    mv "$3" "$(result_file "$1" "$2")"
}

# report NAME LABEL FINDINGS_FILE NOTE: print the outcome by the check's mode; 1 if it must fail.
report() {
    local name=$1 label=$2 file=$3 note=$4 n mode=${ANALYSIS_MODE[$1]}
    n=$(grep -c . "$file" || true)
    if [ "$n" = 0 ]; then
        say "OK   $name $label: nothing found ($note)"
        return 0
    fi
    sed 's/^/kvc:   /' "$file" >&2
    if [ "$mode" = enforce ]; then
        report_error "FINDINGS $name $label: $n, listed above ($note; fix them: this check is enforced)"
        return 1
    fi
    say "REPORT $name $label: $n finding(s), listed above ($note; report-only, see ANALYSIS_MODE in kmod/analyze.sh)"
}

# --- gcc -fanalyzer ------------------------------------------------------------------------------

# kbuild_command TREE OBJ: the compiler command kbuild last ran for TREE/OBJ, output and
# dependency file options removed (run it in KOUT).
kbuild_command() {
    local cmdfile=$1/$(dirname "$2")/.$(basename "$2").cmd cmd
    cmd=$(sed -n 's/^\(saved\)\{0,1\}cmd_[^ ]* := //p' "$cmdfile" 2>/dev/null | sed -n 1p)
    [ -n "$cmd" ] || die "no compile command in $cmdfile"
    cmd=${cmd%%;*}  # objtool and friends follow
    sed 's/ -Wp,-MMD,[^ ]*//; s/ -o [^ ]*\.o / /' <<< "$cmd"
}

# analyzer_run TREE OBJ SRC OUT: OBJ's compile command on SRC with -fanalyzer (warnings, not
# errors); its output in OUT.
analyzer_run() {
    local cmd
    cmd=$(kbuild_command "$1" "$2")
    cmd=${cmd/" $1/$(dirname "$2")/$(basename "$2" .o).c"/" $3"}
    (cd "$KOUT" && eval "$cmd -fanalyzer -Wno-error -o /dev/null") > "$4" 2>&1
}

# analyze_analyzer VERSION TREE KEY: gcc -fanalyzer on the new files of TREE (already compiled).
analyze_analyzer() {
    local ver=$1 tree=$2 key=$3 result dir obj src
    local t0=$SECONDS note=cached
    result=$(result_file "analyzer-$ver" "$key")
    if [ ! -f "$result" ]; then
        dir=$BUILD/analysis/analyzer-$ver; rm -rf "$dir"; mkdir -p "$dir"
        obj=${NEW_OBJECTS%% *}
        analyzer_run "$tree" "$obj" "$CANARY" "$dir/canary.log" || die "gcc -fanalyzer could not compile kmod/analysis-canary.c with the flags of $obj (log: $dir/canary.log)"
        grep -q 'analysis-canary.c:[0-9]*:[0-9]*: warning: dereference of NULL' "$dir/canary.log" ||
            die "gcc -fanalyzer did not find the NULL dereference planted in kmod/analysis-canary.c (log: $dir/canary.log)"
        for obj in $NEW_OBJECTS; do
            src=$tree/${obj%.o}.c
            analyzer_run "$tree" "$obj" "$src" "$dir/$(basename "$obj" .o).log" ||
                die "gcc -fanalyzer failed to compile $src (log: $dir/$(basename "$obj" .o).log)"
        done
        { cat "$dir"/uvm_*.log | grep -E "$NEW_FILE_RE:[0-9]+: warning:" || true; } | sed "s|$tree/||" | sort -u > "$dir/findings"
        store_result "analyzer-$ver" "$key" "$dir/findings"
        note="$(( SECONDS - t0 ))s"
    fi
    report analyzer "$ver" "$result" "$(wc -w <<< "$NEW_OBJECTS") files, $note"
}

# --- UVM_BUILD_TYPE=debug with W=1 ---------------------------------------------------------------

# analyze_debug_w1 VERSION TREE KEY: the debug W=1 build in a copy of TREE.
analyze_debug_w1() {
    local ver=$1 tree=$2 key=$3 result var log obj
    local t0=$SECONDS note=cached
    result=$(result_file "debug-w1-$ver" "$key")
    if [ ! -f "$result" ]; then
        var=$BUILD/analysis/debug-w1-$ver
        log=$var.log
        rm -rf "$var"; mkdir -p "$var"
        cp -a "$tree" "$var/tree"  # conftest results and all; kbuild rebuilds what the flags change
        # Warnings are judged below, file by file: -Werror would stop at NVIDIA's headers.
        sed -i 's/, -Werror -Wmissing-prototypes)$/, -Wmissing-prototypes)/' "$var/tree/nvidia-uvm/nvidia-uvm.Kbuild"
        say "compiling the patched objects for driver $ver with UVM_BUILD_TYPE=debug W=1"
        if ! (tree=$var/tree; kbuild UVM_BUILD_TYPE=debug W=1 $CHECK_OBJECTS) > "$log" 2>&1; then
            grep -E '(error|Error)' "$log" | grep -v '^NV_CONFTEST\|^KBUILD_CFLAGS' | sed -n 1,20p >&2 || true
            report_error "FAILED debug-w1 $ver: the UVM_BUILD_TYPE=debug W=1 build does not compile (log: $log)"
            return 1
        fi
        for obj in $NEW_OBJECTS; do
            grep -q "CC \[M\] *$var/tree/$obj\$" "$log" || die "the debug W=1 build did not compile $obj (log: $log)"
        done
        grep -q -- '-DDEBUG' "$var/tree/nvidia-uvm/.$(basename "${NEW_OBJECTS%% *}").cmd" ||
            die "the debug W=1 build did not compile with -DDEBUG (log: $log)"
        { grep -E "$NEW_FILE_RE:[0-9]+: (warning|error):" "$log" || true; } | sed "s|$var/tree/||" | sort -u > "$var.findings"
        store_result "debug-w1-$ver" "$key" "$var.findings"
        rm -rf "$var"  # 200 MB; the result is what is kept
        note="$(( SECONDS - t0 ))s"
    fi
    report debug-w1 "$ver" "$result" "UVM_BUILD_TYPE=debug W=1 compiles, $note"
}

# --- coccinelle -----------------------------------------------------------------------------------

# cocci_tools: spatch on PATH (fetched if missing) and the kernel's scripts/coccinelle, unpacked
# once from Debian's linux-source; sets COCCI_DIR (with uvm/ lock variants) and SPATCH_VERSION.
cocci_tools() {
    local prefix tarball src_ver dir
    if ! command -v spatch >/dev/null; then
        prefix=$(fetch --name tool-coccinelle coccinelle)
        use_prefix "$prefix"
        export COCCINELLE_HOME=$prefix/usr/lib/coccinelle
    fi
    SPATCH_VERSION=$(spatch --version 2>&1 | sed -n 1p)
    [[ $SPATCH_VERSION == spatch* ]] || die "spatch does not run: $SPATCH_VERSION"
    prefix=$(fetch --name linux-source linux-source)
    tarball=$(ls "$prefix"/usr/src/linux-source-*.tar.xz 2>/dev/null | sort -V | tail -n 1)
    [ -n "$tarball" ] || die "Debian's linux-source in $prefix has no usr/src/linux-source-*.tar.xz"
    src_ver=$(basename "$tarball" .tar.xz)
    COCCI_DIR=$CACHE/cocci/$src_ver
    if [ ! -f "$COCCI_DIR/.complete" ]; then
        need_tool xz xz-utils
        say "unpacking scripts/coccinelle from $(basename "$tarball") (once)"
        rm -rf "$COCCI_DIR"; mkdir -p "$COCCI_DIR"
        tar -xJf "$tarball" -C "$COCCI_DIR" --strip-components=3 --wildcards "$src_ver/scripts/coccinelle/*"
        for dir in locks; do
            mkdir -p "$COCCI_DIR/uvm/$dir"
            for script in "$COCCI_DIR/$dir"/*.cocci; do
                awk -v calls="$UVM_LOCK_CALLS" '
                    { print }
                    $1 == "mutex_lock@p1" {
                        indent = $0; sub(/[^ \t].*/, "", indent)
                        n = split(calls, c, " ")
                        for (i = 1; i <= n; i++) print "|\n" indent c[i] "@p1"
                    }' "$script" > "$COCCI_DIR/uvm/$dir/$(basename "$script")"
            done
        done
        touch "$COCCI_DIR/.complete"
    fi
}

# spatch_report SCRIPT DIR: the script's report-mode findings on the C files of DIR, with the
# options its "// Options:" line asks for (as the kernel's coccicheck does).
spatch_report() {
    local script=$1 dir=$2 opts
    opts=$(sed -n 's|^// Options:||p' "$script" | sed -n 1p)
    spatch --very-quiet --no-show-diff -D report $opts --sp-file "$script" --dir "$dir" 2>&1
}

# cocci_script NAME: the script to run for NAME (the UVM variant where there is one).
cocci_script() {
    if [ -f "$COCCI_DIR/uvm/$1" ]; then echo "$COCCI_DIR/uvm/$1"; else echo "$COCCI_DIR/$1"; fi
}

analyze_cocci() {
    local key result dir canary_dir name out
    cocci_tools
    key=$(analysis_key coccinelle "$SPATCH_VERSION" "$COCCI_DIR" "$COCCI_SCRIPTS" "$UVM_LOCK_CALLS" \
        "$(cat "$PATCH_DIR"/src/* | sha256sum)")
    local t0=$SECONDS note=cached
    result=$(result_file coccinelle "$key")
    if [ ! -f "$result" ]; then
        dir=$BUILD/analysis/coccinelle; rm -rf "$dir"; mkdir -p "$dir/canary" "$dir/src"
        cp "$CANARY" "$dir/canary/"
        for name in locks/double_lock.cocci locks/mini_lock.cocci null/deref_null.cocci; do
            out=$(spatch_report "$(cocci_script "$name")" "$dir/canary")
            grep -q 'analysis-canary.c:[0-9]' <<< "$out" ||
                die "coccinelle's $name found nothing in kmod/analysis-canary.c, which has its bug planted: $(echo $out | cut -c1-200)"
        done
        cp "$PATCH_DIR"/src/* "$dir/src/"
        say "coccinelle: $(wc -w <<< "$COCCI_SCRIPTS") semantic patches of $(basename "$COCCI_DIR") on driver-patch/src"
        for name in $COCCI_SCRIPTS; do
            spatch_report "$(cocci_script "$name")" "$dir/src" | sed "s|^$dir/src/|driver-patch/src/|; s|^|$name: |"
        done > "$dir/all.log"
        # A script that cannot run is a failure of the check, not a finding.
        if [ -n "$(grep -Ev "$NEW_FILE_RE" "$dir/all.log" || true)" ]; then
            grep -Ev "$NEW_FILE_RE" "$dir/all.log" | sed -n 1,10p >&2 || true
            die "coccinelle did not run cleanly (log: $dir/all.log)"
        fi
        sort -u "$dir/all.log" > "$dir/findings"
        store_result coccinelle "$key" "$dir/findings"
        note="$(( SECONDS - t0 ))s"
    fi
    report coccinelle "driver-patch/src" "$result" "$(wc -w <<< "$COCCI_SCRIPTS") scripts, $note"
}

# --- modversions ---------------------------------------------------------------------------------

# standin_build DIR NAME ARGS...: kbuild the stand-in module in DIR/src/NAME (from scratch).
standin_build() {
    local dir=$1 name=$2
    shift 2
    rm -rf "$dir/src/$name"; cp -r "$KMOD_DIR/modversions/$name" "$dir/src/$name"
    make -C "$KOUT" M="$dir/src/$name" "$@" modules > "$dir/$name.log" 2>&1 ||
        { grep -E 'error|ERROR' "$dir/$name.log" | sed -n 1,10p >&2 || true
          die "the stand-in $name module did not build (log: $dir/$name.log)"; }
}

# standin_install DIR ROOT: the stand-in nvidia.ko becomes ROOT's nvidia.ko for REL.
standin_install() {
    install -D -m 0644 "$1/src/nvidia/nvidia.ko" "$2/lib/modules/$REL/updates/nvidia.ko"
    depmod -b "$2" "$REL" 2>/dev/null
}

analyze_modversions() {
    local key result dir root t0=$SECONDS note=cached out
    command -v depmod >/dev/null && command -v modinfo >/dev/null || use_prefix "$(fetch --name tool-kmod kmod)"
    key=$(analysis_key modversions "$REL" "$KOUT" "$(gcc --version | sed -n 1p)" \
        "$(cat "$KMOD_DIR"/modversions/*/* "$KMOD_DIR"/modversions/*.h "$KMOD_DIR/kvc-module.sh" | sha256sum)")
    result=$(result_file modversions "$key")
    if [ ! -f "$result" ]; then
        dir=$BUILD/analysis/modversions; root=$dir/root
        rm -rf "$dir"; mkdir -p "$dir/src" "$root/lib/modules/$REL"
        cp "$KMOD_DIR/modversions/standin.h" "$dir/src/"
        ln -s "$KOUT" "$root/lib/modules/$REL/build"
        touch "$root/lib/modules/$REL/"{modules.order,modules.builtin,modules.builtin.modinfo}
        say "modversions: building stand-ins of nvidia.ko and nvidia-uvm.ko against $REL"
        standin_build "$dir" nvidia KVC_STANDIN_LAYOUT=1
        standin_install "$dir" "$root"
        KVC_SYSROOT=$root module_facts symvers "$REL" "$dir/nvidia.symvers" 2>/dev/null ||
            die "kvc-module.sh symvers could not read the stand-in nvidia.ko's CRCs"
        standin_build "$dir" uvm KBUILD_EXTRA_SYMBOLS="$dir/nvidia.symvers"
        ! grep -q 'WARNING: modpost' "$dir/uvm.log" || die "modpost warned building the stand-in nvidia-uvm.ko (log: $dir/uvm.log)"
        out=$(KVC_SYSROOT=$root module_facts check-crcs "$dir/src/uvm/kvc_standin_uvm.ko" "$REL" 2>&1) ||
            die "kvc-module.sh check-crcs refused a module built against the very nvidia.ko: $out"
        # The driver upgrade: same symbol, another struct layout. The same module must be refused.
        standin_build "$dir" nvidia KVC_STANDIN_LAYOUT=2
        standin_install "$dir" "$root"
        if out=$(KVC_SYSROOT=$root module_facts check-crcs "$dir/src/uvm/kvc_standin_uvm.ko" "$REL" 2>&1); then
            die "kvc-module.sh check-crcs accepted a module built against another nvidia.ko layout: $out"
        fi
        [[ $out == *"built against another nvidia.ko"* ]] || die "check-crcs failed for another reason: $out"
        : > "$dir/findings"
        store_result modversions "$key" "$dir/findings"
        note="$(( SECONDS - t0 ))s"
    fi
    report modversions "$REL" "$result" "stand-in nvidia.ko's CRCs read, built with, checked; its changed layout refused; $note"
}

# analyze_version VERSION TREE: analyzer and debug-w1 for one driver version (TREE compiled).
analyze_version() {
    local ver=$1 tree=$2 key rc=0
    key=$(analysis_key "$ver" "$REL" "$(patch_stamp)" "$(gcc --version | sed -n 1p)" "$KOUT")
    mkdir -p "$BUILD/analysis"
    analyze_analyzer "$ver" "$tree" "$key" || rc=1
    analyze_debug_w1 "$ver" "$tree" "$key" || rc=1
    return $rc
}

# analysis_cached VERSION: every per-version check has a result for the current inputs (so the
# tree need not be compiled at all).
analysis_cached() {
    local key
    key=$(analysis_key "$1" "$REL" "$(patch_stamp)" "$(gcc --version | sed -n 1p)" "$KOUT")
    [ -f "$(result_file "analyzer-$1" "$key")" ] && [ -f "$(result_file "debug-w1-$1" "$key")" ]
}
