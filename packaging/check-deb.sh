#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Builds the Debian package with cargo-deb, installs it on this machine, checks what a host
# gets from it, then removes and purges it and checks that nothing of it is left.
#
# Checked after `dpkg -i`: the installed binary runs, `man vhost-user-pcache` opens, the
# installed template unit passes `systemd-analyze verify`, the postinst applied the sysusers
# and tmpfiles entries (the service user, its directories with owner and mode). Checked after
# `dpkg -r` and `dpkg -P`: every file the package installed is gone, dpkg forgets it, purging
# removes the package's empty directories and keeps a file an operator left in them.
# The maintainer scripts must work without systemd as PID 1 (containers, chroots, CI).
#
# Needs Debian 12 and root or sudo. Refuses to run where the package is already installed.
# Whatever happens, the package is purged at the end, and the service user and directories are
# removed if this script brought them (a host that had them keeps them).
# Installs cargo-deb with `cargo install cargo-deb --locked` when it is missing.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec </dev/null

PACKAGE=vhost-user-pcache
USER_NAME=vhost-user-pcache
STATE_DIR=/var/lib/vhost-user-pcache
CONFIG_DIR=/etc/vhost-user-pcache
UNIT=/usr/lib/systemd/system/vhost-user-pcache@.service

SUDO=
if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; fi

say() { printf 'check-deb: %s\n' "$*"; }
fail() {
    printf 'check-deb: FAILED: %s\n' "$*" >&2
    exit 1
}

installed() {
    dpkg-query -W -f='${db:Status-Status}' "$PACKAGE" 2>/dev/null | grep -qx installed
}
known_to_dpkg() {
    dpkg-query -W -f='${db:Status-Status}' "$PACKAGE" 2>/dev/null | grep -qvx not-installed
}

if known_to_dpkg; then
    fail "$PACKAGE is already known to dpkg here; this check would remove it"
fi
user_existed=$(getent passwd "$USER_NAME" >/dev/null && echo yes || echo no)
state_existed=$([ -e "$STATE_DIR" ] && echo yes || echo no)
config_existed=$([ -e "$CONFIG_DIR" ] && echo yes || echo no)

cleanup() {
    if [ -n "${keep:-}" ] && [ -f "$keep" ]; then $SUDO rm "$keep"; fi
    if known_to_dpkg; then
        $SUDO dpkg --purge "$PACKAGE" >/dev/null || true
    fi
    # Only what this script brought, and only empty directories: never anyone's data.
    if [ "$state_existed" = no ] && [ -d "$STATE_DIR" ]; then $SUDO rmdir "$STATE_DIR" || true; fi
    if [ "$config_existed" = no ] && [ -d "$CONFIG_DIR" ]; then $SUDO rmdir "$CONFIG_DIR" || true; fi
    if [ "$user_existed" = no ] && getent passwd "$USER_NAME" >/dev/null; then
        $SUDO userdel "$USER_NAME" || true
    fi
}
trap cleanup EXIT

if ! cargo deb --version >/dev/null 2>&1; then
    say "installing cargo-deb (cargo install cargo-deb --locked)"
    cargo install cargo-deb --locked
fi
say "$(cargo deb --version)"

# cargo deb builds the release binary, strips its debug info into the dbgsym package and
# prints the path of the .deb last.
deb=$(cargo deb | tail -n 1)
[ -f "$deb" ] || fail "cargo deb did not report a package (got '$deb')"
say "built $deb"
version=$(dpkg-deb -f "$deb" Version)

# Without a running systemd, as in a container: the maintainer scripts must still succeed.
say "dpkg -i"
$SUDO dpkg -i "$deb"
installed || fail "dpkg does not list $PACKAGE as installed"
mapfile -t files < <(dpkg -L "$PACKAGE" | while read -r f; do [ -d "$f" ] || echo "$f"; done)
[ "${#files[@]}" -gt 0 ] || fail "dpkg -L lists no files"

say "the installed binary runs"
out=$(/usr/bin/vhost-user-pcache --version)
[ "$out" = "vhost-user-pcache ${version%-*}" ] ||
    fail "vhost-user-pcache --version printed '$out', the package is $version"

say "man vhost-user-pcache opens"
# The C locale keeps groff's dashes ASCII, so grep finds the words as typed.
page=$(LC_ALL=C man -P cat vhost-user-pcache 2>&1) || fail "man vhost-user-pcache: $page"
grep -q 'vhost-user-pcache ctl' <<<"$page" || fail "the manual page has no ctl section: $page"

say "systemd-analyze verify of an instance of the installed unit"
[ -f "$UNIT" ] || fail "$UNIT is not installed"
# An instance name expands %i as for a real disk; verify loads the template beside it, checks
# that ExecStart's binary exists and runs man for Documentation=, both from the package.
verify=$(systemd-analyze verify "${UNIT%@.service}@vm1-disk.service" 2>&1) ||
    fail "systemd-analyze verify: $verify"
# Unknown keys and bad values are only warnings (exit status 0), so any output fails.
[ -z "$verify" ] || fail "systemd-analyze verify: $verify"

say "postinst applied sysusers and tmpfiles"
IFS=: read -r _ _ uid _ _ home _ < <(getent passwd "$USER_NAME") ||
    fail "no user $USER_NAME"
[ "$uid" -lt 1000 ] || fail "$USER_NAME has uid $uid, not a system uid"
[ "$home" = "$STATE_DIR" ] || fail "$USER_NAME's home is $home, not $STATE_DIR"
[ "$(stat -c '%U:%G %a' "$STATE_DIR")" = "$USER_NAME:kvm 750" ] ||
    fail "$STATE_DIR is $(stat -c '%U:%G %a' "$STATE_DIR"), not $USER_NAME:kvm 750"
[ "$(stat -c '%U:%G %a' "$CONFIG_DIR")" = "root:root 755" ] ||
    fail "$CONFIG_DIR is $(stat -c '%U:%G %a' "$CONFIG_DIR"), not root:root 755"

say "dpkg -r"
# A disk image the operator keeps in the state directory: no removal may take it.
keep="$STATE_DIR/check-deb-keep.img"
$SUDO touch "$keep"
$SUDO dpkg -r "$PACKAGE"
installed && fail "$PACKAGE still installed after dpkg -r"
for f in "${files[@]}"; do
    [ ! -e "$f" ] || fail "$f is left after dpkg -r"
done

say "dpkg -P"
$SUDO dpkg -P "$PACKAGE"
known_to_dpkg && fail "dpkg still knows $PACKAGE after purging"
[ -f "$keep" ] || fail "purging removed $keep"
$SUDO rm "$keep"
if [ "$config_existed" = no ] && [ -e "$CONFIG_DIR" ]; then
    fail "purging left the empty $CONFIG_DIR"
fi

say "passed: $deb installed, checked, removed and purged"
