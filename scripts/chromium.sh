#!/usr/bin/env bash
# chromium.sh - Debian's Chromium for the report test (tests/test_workflow.py opens
# report.html in it, headless, through Playwright; no browser is downloaded).
#
#   chromium.sh install   apt-get install chromium (root; nothing to do when it is there),
#                         then print its path
#   chromium.sh path      print its path, or fail saying how to install it
set -euo pipefail

find_chromium() {
  local c
  for c in "${CHROMIUM:-}" chromium chromium-browser; do
    if [ -n "$c" ] && command -v "$c" >/dev/null; then command -v "$c"; return 0; fi
  done
  return 1
}

die() { echo "chromium.sh: $*" >&2; exit 1; }

case "${1:-}" in
  install)
    if ! find_chromium >/dev/null; then
      [ "$(id -u)" = 0 ] || die "Chromium is not installed and installing it needs root (apt-get install chromium)"
      command -v apt-get >/dev/null || die "Chromium is not installed and there is no apt-get: install chromium by hand"
      apt-get update -q >&2
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >&2
    fi
    find_chromium || die "apt-get installed chromium, but it is not on PATH"
    ;;
  path)
    find_chromium || die "Chromium not found: 'bash scripts/chromium.sh install' (root) or apt-get install chromium"
    ;;
  *)
    echo "usage: $0 install|path" >&2; exit 2
    ;;
esac
