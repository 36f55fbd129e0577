# kmod/lib.sh: messages and error reporting shared by kmod's scripts (sourced, not run).
#
# After `. kmod/lib.sh` a script runs under `set -Eeuo pipefail` (command substitutions too) and has:
#   say MSG   progress on stderr: "kvc: MSG"
#   die MSG   one "kvc: error: MSG" line on stderr, then exit 1
#   an ERR trap: a failing command that no explicit check caught still names itself
#             ("kvc: error: kvc.sh line 120: 'tar -xf ...' failed with status 2") instead of
#             ending the script silently.
# Only the first error of a run is printed, so a failure deep in a command substitution is not
# echoed again by every caller; the scripts one kmod script runs share that record
# (KVC_ERROR_MARK). A script that sets its own EXIT trap must call `error_mark_cleanup` from it.
#   run_step VAR CMD...  runs CMD in a subshell that stops at its first failure, stores its exit
#             status in VAR and starts a fresh error record, so one failing step of a loop does
#             not end the loop nor silence the next step's error. (A function run inside
#             `if`, `&&` or `||` runs with `set -e` off, whatever it sets: hence this helper.)
set -Eeuo pipefail
shopt -s inherit_errexit

say() { echo "kvc: $*" >&2; }

if [ -z "${KVC_ERROR_MARK:-}" ]; then
    KVC_ERROR_MARK=$(mktemp "${TMPDIR:-/tmp}/kvc-error.XXXXXX")
    export KVC_ERROR_MARK
    error_mark_cleanup() { rm -f "$KVC_ERROR_MARK"; }
    trap error_mark_cleanup EXIT
else
    error_mark_cleanup() { :; }
fi

# report_error MSG: print "kvc: error: MSG" unless an error of this run was printed already.
report_error() {
    if [ -s "$KVC_ERROR_MARK" ]; then return 0; fi
    echo "kvc: error: $*" >&2
    echo "$*" > "$KVC_ERROR_MARK" 2>/dev/null || true
}

die() {
    report_error "$*"
    exit 1
}

# The ERR trap's report: the script, line and command that failed and its status.
on_error() {
    report_error "${3##*/} line $2: '$4' failed with status $1"
}
err_trap_on() { trap 'on_error $? $LINENO "${BASH_SOURCE[0]}" "$BASH_COMMAND"' ERR; }
err_trap_on

run_step() {
    local _var=$1 _rc
    shift
    trap - ERR  # the step reports its own failure
    set +e
    (err_trap_on; set -e; "$@")
    _rc=$?
    set -e
    err_trap_on
    : > "$KVC_ERROR_MARK"
    printf -v "$_var" %d "$_rc"
}
