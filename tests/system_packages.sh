#!/usr/bin/env bash
# Debian packages that some tests need, installed where missing and where this runs as root:
# SLURM (tests/test_slurm.py) and Chromium (tests/test_serve.py's browser test, driven by Playwright;
# `playwright install` is never run). Where an install is impossible those tests skip, saying why.
set -uo pipefail
missing() { for b in "$@"; do command -v "$b" >/dev/null || [ -x "/usr/sbin/$b" ] || [ -x "/usr/bin/$b" ] || return 0; done; return 1; }
packages=()
missing slurmctld slurmd sbatch munged && packages+=(slurmctld slurmd slurm-client munge)
missing chromium && packages+=(chromium)
[ ${#packages[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "not root: ${packages[*]} not installed; the tests that need them will be skipped"
    exit 0
fi
start=$SECONDS
if (export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get install -y -qq --no-install-recommends \
        "${packages[@]}") >/dev/null 2>&1; then
    echo "installed ${packages[*]} in $((SECONDS - start)) s"
else
    echo "${packages[*]} could not be installed (after $((SECONDS - start)) s); the tests that need them will be skipped"
fi
