#!/usr/bin/env bash
# System packages the stations need on a Debian machine; a rerun installs nothing new.
set -euo pipefail
packages=(procps chromium fonts-dejavu-core)  # chromium renders the HTML cost report headless in the tests
# python3-apt: Ansible's apt module needs it (also in --check runs); the playbook installs Slurm, munge and MariaDB
packages+=(python3-apt)
# prometheus: promtool for the alert-rule unit tests (the monitoring role installs the rest of the stack)
packages+=(prometheus)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
