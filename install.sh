#!/usr/bin/env bash
# Creates .venv here and installs meshserve into it: `./install.sh` for running it,
# `./install.sh test` with the test tools too.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/pip install -e ".${1:+[$1]}"
