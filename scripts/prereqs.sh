#!/bin/sh
# scripts/prereqs.sh PYTHON: check that this machine has the system packages listed in
# .ci/apt-prerequisites (the README's prerequisites) and name the first one missing.
# Run by `make` before it creates the virtual environment or runs a test. Exit status 1 if one
# is missing, with one line saying which and how to install it.
set -eu
python=${1:?usage: prereqs.sh PYTHON}
list="$(dirname "$0")/../.ci/apt-prerequisites"

missing() {
    echo "make: missing prerequisite $1 ($2); on Debian or Ubuntu: sudo apt-get install $1" >&2
    exit 1
}

for pkg in $(grep -v '^[[:space:]]*#' "$list"); do
    case $pkg in
        python3)
            command -v "$python" >/dev/null || missing python3 "no $python on PATH"
            version=$("$python" -c 'import sys; print(sys.version.split()[0])' 2>/dev/null) || version="not runnable"
            "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null ||
                missing python3 "$python is $version; pyvattn needs Python 3.10 or newer (or pass PYTHON=python3.X)" ;;
        python3-venv)
            "$python" -c 'import ensurepip, venv' 2>/dev/null || missing python3-venv "$python has no venv/ensurepip module" ;;
        make) ;;  # this is running under make
        gcc)
            command -v gcc >/dev/null || missing gcc "no C compiler: the tests and the driver check compile C" ;;
        libc6-dev)
            printf '#include <stdio.h>\nint main(void) { return 0; }\n' |
                gcc -x c -o /dev/null - 2>/dev/null || missing libc6-dev "gcc cannot build a program with the C library headers" ;;
        *)
            echo "scripts/prereqs.sh: no check for '$pkg' (listed in .ci/apt-prerequisites)" >&2
            exit 1 ;;
    esac
done
