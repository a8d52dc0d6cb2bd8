#!/usr/bin/env bash
# Checks of the FreeBSD user files: rc.d/kqemu, kqemu.4 and
# devfs.rules.sample.
#
#  - rc.d/kqemu parses (sh -n) and, run under dash with a stand-in
#    rc.subr (tests/docs/rc.subr) and fake kldload/kldstat/kldunload/sysctl
#    that log their arguments, does what rc.conf(5) users expect;
#  - kqemu.4 is mandoc -Tlint clean and names every ioctl, errno, sysctl,
#    tunable and limit of the driver's contract, each errno under the
#    request that returns it, and every hw.kqemu sysctl the C shim declares;
#  - the devfs.rules recipe is the same in kqemu.4, README.md and
#    devfs.rules.sample.
#
# Prints one line per check and "N passed, N failed"; exits 1 on a failure.
set -uo pipefail

# DOCS_TOP: the tree to check (default: this repository); mutate.sh points
# it at altered copies to show that each check can fail.
HERE=$(cd "$(dirname "$0")" && pwd)
TOP=${DOCS_TOP:-$(cd "$HERE/../.." && pwd)}
RCD="$TOP/rc.d/kqemu"
MAN="$TOP/kqemu.4"
SAMPLE="$TOP/devfs.rules.sample"
README="$TOP/README.md"

passed=0
failed=0
pass() { passed=$((passed + 1)); echo "PASS  $1"; }
fail() { failed=$((failed + 1)); echo "FAIL  $1"; [ $# -gt 1 ] && printf '      %s\n' "${@:2}"; }
check() { # name command...
	local name=$1; shift
	if "$@"; then pass "$name"; else fail "$name"; fi
}

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# ---------------------------------------------------------------- rc.d/kqemu

check "rc.d/kqemu: sh -n" sh -n "$RCD"
check "rc.d/kqemu: is executable" test -x "$RCD"
for line in '# PROVIDE: kqemu' '# REQUIRE: FILESYSTEMS' '# KEYWORD: nojail' \
	'name="kqemu"' 'rcvar="kqemu_enable"' 'load_rc_config $name' \
	'run_rc_command "$1"'; do
	check "rc.d/kqemu: has line: $line" grep -qxF -- "$line" "$RCD"
done

# The script sources /etc/rc.subr; the copy under test sources the stand-in.
if [ "$(grep -cxF '. /etc/rc.subr' "$RCD")" = 1 ]; then
	pass "rc.d/kqemu: sources /etc/rc.subr once"
else
	fail "rc.d/kqemu: sources /etc/rc.subr once"
fi
mkdir -p "$WORK/bin" "$WORK/state"
sed "s|^\. /etc/rc\.subr\$|. \"$HERE/rc.subr\"|" "$RCD" >"$WORK/kqemu"

# Fake FreeBSD tools.  State: $KQ_STATE/loaded exists while the module is
# loaded.  Knobs: KQ_LOAD_FAIL (kldload fails), KQ_BUSY (kldunload: EBUSY),
# KQ_INSTANCES (value of hw.kqemu.instances).
cat >"$WORK/bin/kldload" <<'EOF'
#!/bin/sh
echo "kldload $*" >>"$KQ_LOG"
case "$*" in
"-n kqemu"|kqemu) ;;
*) echo "kldload: can't load $*: No such file or directory" >&2; exit 1 ;;
esac
if [ -n "${KQ_LOAD_FAIL:-}" ]; then
	echo "kldload: can't load kqemu: Exec format error" >&2; exit 1
fi
if [ -e "$KQ_STATE/loaded" ]; then
	[ "$1" = -n ] && exit 0
	echo "kldload: can't load kqemu: module already loaded or in kernel" >&2
	exit 1
fi
touch "$KQ_STATE/loaded"
EOF
cat >"$WORK/bin/kldunload" <<'EOF'
#!/bin/sh
echo "kldunload $*" >>"$KQ_LOG"
if [ "$*" != kqemu ] || [ ! -e "$KQ_STATE/loaded" ]; then
	echo "kldunload: can't find file $*" >&2; exit 1
fi
if [ -n "${KQ_BUSY:-}" ]; then
	echo "kldunload: can't unload file: Device busy" >&2; exit 1
fi
rm -f "$KQ_STATE/loaded"
EOF
cat >"$WORK/bin/kldstat" <<'EOF'
#!/bin/sh
echo "kldstat $*" >>"$KQ_LOG"
[ "$*" = "-q -m kqemu" ] || { echo "kldstat: unexpected arguments" >&2; exit 2; }
[ -e "$KQ_STATE/loaded" ]
EOF
cat >"$WORK/bin/sysctl" <<'EOF'
#!/bin/sh
echo "sysctl $*" >>"$KQ_LOG"
if [ "$*" = "-n hw.kqemu.instances" ] && [ -e "$KQ_STATE/loaded" ]; then
	echo "${KQ_INSTANCES:-0}"; exit 0
fi
echo "sysctl: unknown oid '$*'" >&2; exit 1
EOF
chmod +x "$WORK/bin/"*

# rc_case NAME ENABLE LOADED ARG [KNOB=VALUE...]
# Runs the script with kqemu_enable=ENABLE ("" = unset) and the module
# loaded or not; leaves status in $rc, output in $out/$err, calls in $log.
rc_case() {
	local enable=$1 loaded=$2 arg=$3; shift 3
	rm -f "$WORK/state/loaded" "$WORK/log" "$WORK/rc.conf"
	touch "$WORK/log" "$WORK/rc.conf"
	[ -n "$enable" ] && echo "kqemu_enable=\"$enable\"" >"$WORK/rc.conf"
	[ "$loaded" = yes ] && touch "$WORK/state/loaded"
	env -i PATH="$WORK/bin:/usr/bin:/bin" RC_CONF="$WORK/rc.conf" \
		KQ_LOG="$WORK/log" KQ_STATE="$WORK/state" "$@" \
		dash "$WORK/kqemu" "$arg" >"$WORK/out" 2>"$WORK/err"
	rc=$?
	out=$(cat "$WORK/out"); err=$(cat "$WORK/err"); log=$(cat "$WORK/log")
	if [ -e "$WORK/state/loaded" ]; then now=loaded; else now=unloaded; fi
}
# expect NAME CONDITION...: each condition is a shell test on $rc/$out/...
expect() {
	local name=$1; shift
	local c bad=()
	for c in "$@"; do eval "$c" || bad+=("not: $c"); done
	if [ ${#bad[@]} -eq 0 ]; then pass "$name"
	else fail "$name" "${bad[@]}" "rc=$rc out=[$out] err=[$err]" "calls=[${log//$'\n'/; }]"; fi
}
calls() { grep -cxF -- "$1" <<<"$log"; }

rc_case "" no start
expect "rc.d start: kqemu_enable defaults to NO, nothing loaded" \
	'[ $rc = 0 ]' '[ -z "$log" ]' '[ $now = unloaded ]' '[[ $out == *"Cannot '"'"'start'"'"' kqemu"* ]]'

rc_case NO no start
expect "rc.d start: kqemu_enable=NO loads nothing" '[ $rc = 0 ]' '[ -z "$log" ]'

rc_case YES no start
expect "rc.d start: runs kldload -n kqemu once" \
	'[ $rc = 0 ]' '[ "$(calls "kldload -n kqemu")" = 1 ]' '[ $now = loaded ]' '[ -z "$err" ]'

rc_case YES yes start
expect "rc.d start: module already loaded is success" \
	'[ $rc = 0 ]' '[ $now = loaded ]' '[ -z "$err" ]'

rc_case NO no onestart
expect "rc.d onestart: loads even when disabled" \
	'[ $rc = 0 ]' '[ "$(calls "kldload -n kqemu")" = 1 ]' '[ $now = loaded ]'

rc_case YES no start KQ_LOAD_FAIL=1
expect "rc.d start: kldload failure is reported and fails" \
	'[ $rc != 0 ]' '[ $now = unloaded ]' '[[ $err == *"unable to load"* ]]'

rc_case YES yes stop
expect "rc.d stop: runs kldunload kqemu" \
	'[ $rc = 0 ]' '[ "$(calls "kldunload kqemu")" = 1 ]' '[ $now = unloaded ]'

rc_case YES yes stop KQ_BUSY=1
expect "rc.d stop: EBUSY says QEMU still has /dev/kqemu open, fails" \
	'[ $rc != 0 ]' '[ $now = loaded ]' '[[ $err == *"in use"* ]]' \
	'[[ $err == *"/dev/kqemu"* ]]' '[[ $err == *QEMU* ]]'

rc_case YES no stop
expect "rc.d stop: not loaded is reported, no kldunload" \
	'[ $rc != 0 ]' '[ "$(calls "kldunload kqemu")" = 0 ]' '[[ $err == *"not loaded"* ]]'

rc_case NO yes onestop
expect "rc.d onestop: unloads even when disabled" \
	'[ $rc = 0 ]' '[ $now = unloaded ]'

rc_case YES yes status KQ_INSTANCES=2
expect "rc.d status: loaded, shows instance count" \
	'[ $rc = 0 ]' '[[ $out == *"kqemu is loaded"* ]]' '[[ $out == *"2 open instances"* ]]'

rc_case NO no status
expect "rc.d status: not loaded fails (works without kqemu_enable)" \
	'[ $rc != 0 ]' '[[ $out == *"kqemu is not loaded"* ]]'

rc_case YES yes restart
expect "rc.d restart: unloads, then loads" \
	'[ $rc = 0 ]' '[ $now = loaded ]' \
	'[ "$(grep -n . <<<"$log" | grep -E "kldunload kqemu|kldload -n kqemu" | cut -d: -f2 | tr "\n" ,)" = "kldunload kqemu,kldload -n kqemu," ]'

rc_case YES no rcvar
expect "rc.d rcvar: names kqemu_enable" '[ $rc = 0 ]' '[ "$out" = kqemu_enable ]'

# ------------------------------------------------------------------ kqemu.4

lint=$(mandoc -Tlint -W warning "$MAN" 2>&1)
lint_rc=$?
if [ $lint_rc = 0 ] && [ -z "$lint" ]; then
	pass "kqemu.4: mandoc -Tlint -W warning prints nothing"
else
	fail "kqemu.4: mandoc -Tlint -W warning prints nothing" "exit $lint_rc" "$lint"
fi

# The driver's contract: every ioctl, errno, sysctl, tunable, limit and
# value a user can meet must be in the page.
CONTRACT_NAMES=(
	KQEMU_GET_VERSION KQEMU_INIT KQEMU_SET_PHYS_MEM KQEMU_EXEC KQEMU_MODIFY_RAM_PAGES
	EPERM EIO EINVAL EFAULT ENOMEM ENOSPC EBUSY ENOTTY
	hw.kqemu.version hw.kqemu.instances hw.kqemu.gid hw.kqemu.mode
	hw.kqemu.max_locked_pages hw.kqemu.locked_pages
	kqemu_load kqemu_enable vm.max_user_wired
	KQEMU_MAX_RAM_SIZE KQEMU_MAX_GUEST_PHYS KQEMU_MAX_PHYS_RANGES KQEMU_MAX_MODIFIED_RAM_PAGES
	KQEMU_RET_ABORT KQEMU_RET_EXCEPTION KQEMU_RET_INT KQEMU_RET_SOFTMMU KQEMU_RET_INTR KQEMU_RET_SYSCALL
	KQEMU_IO_MEM_RAM KQEMU_IO_MEM_ROM KQEMU_IO_MEM_COMM KQEMU_IO_MEM_UNASSIGNED
	KQEMU_FLUSH_ALL KQEMU_RAM_PAGES_UPDATE_ALL
	/dev/kqemu /boot/modules/kqemu.ko
	0x010400 66560 0660 0xC2487101 0x80307102 0x40047103 0x80047104 0x80207105
	'64 GiB' 2^52 1024 512 513
)
missing=()
for n in "${CONTRACT_NAMES[@]}"; do
	grep -qF -- "$n" "$MAN" || missing+=("$n")
done
if [ ${#missing[@]} -eq 0 ]; then
	pass "kqemu.4: names all ${#CONTRACT_NAMES[@]} contract items"
else
	fail "kqemu.4: names all ${#CONTRACT_NAMES[@]} contract items" "missing: ${missing[*]}"
fi

# ERRORS has one subsection per call; each errno must sit under the call
# that returns it, and no call may list an errno the contract does not give.
errors_of() { # subsection title -> errno names listed under it
	awk -v t="$1" '
		/^\.Sh / { in_err = ($0 == ".Sh ERRORS"); sub_ok = 0; next }
		in_err && /^\.Ss / { sub_ok = (substr($0, 5) == t); next }
		in_err && sub_ok && /^\.It Bq Er / { print $4 }' "$MAN" | sort | tr '\n' ' '
}
declare -A WANT=(
	[open]="EPERM "
	[KQEMU_INIT]="EFAULT EINVAL EIO ENOMEM "
	[KQEMU_SET_PHYS_MEM]="EBUSY EINVAL EIO ENOSPC EPERM "
	[KQEMU_EXEC]="EBUSY EFAULT EIO EPERM "
	[KQEMU_MODIFY_RAM_PAGES]="EBUSY EFAULT EINVAL EIO EPERM "
	["Other requests"]="ENOTTY "
	[kldunload]="EBUSY "
)
for call in open KQEMU_INIT KQEMU_SET_PHYS_MEM KQEMU_EXEC KQEMU_MODIFY_RAM_PAGES \
	"Other requests" kldunload; do
	got=$(errors_of "$call")
	if [ "$got" = "${WANT[$call]}" ]; then
		pass "kqemu.4 ERRORS: $call -> ${got% }"
	else
		fail "kqemu.4 ERRORS: $call" "want: ${WANT[$call]}" "got:  $got"
	fi
done

# Every sysctl the kld declares under hw.kqemu (SYSCTL_*(_hw_kqemu, OID_AUTO,
# name, ...) or a "hw.kqemu.name" string) must be documented.
mapfile -t code_sysctls < <(
	{
		grep -rhoE 'SYSCTL_[A-Z_]+\(_hw_kqemu, *OID_AUTO, *[a-z_0-9]+' \
			--include='*.c' --include='*.h' "$TOP/sys" "$TOP/src" 2>/dev/null |
			sed -E 's/.*OID_AUTO, *//; s/^/hw.kqemu./'
		grep -rhoE '"hw\.kqemu\.[a-z_0-9]+"' \
			--include='*.c' --include='*.h' --include='*.rs' "$TOP/sys" "$TOP/src" 2>/dev/null |
			tr -d '"'
	} | sort -u)
undocumented=()
for s in "${code_sysctls[@]}"; do
	grep -qE -- "(^\.| )Va ${s//./\\.}( |$)" "$MAN" || undocumented+=("$s")
done
if [ ${#undocumented[@]} -eq 0 ]; then
	pass "kqemu.4: documents all ${#code_sysctls[@]} hw.kqemu sysctls found in sys/ and src/"
else
	fail "kqemu.4: documents all hw.kqemu sysctls found in sys/ and src/" \
		"undocumented: ${undocumented[*]}"
fi

# --------------------------------------------------------- devfs.rules recipe

for line in '[localrules=10]' "add path 'kqemu' mode 0660 group kqemu"; do
	if grep -qxF -- "$line" "$SAMPLE" && grep -qxF -- "$line" "$MAN" &&
		grep -qxF -- "$line" "$README"; then
		pass "devfs.rules recipe in kqemu.4, README.md, devfs.rules.sample: $line"
	else
		fail "devfs.rules recipe in kqemu.4, README.md, devfs.rules.sample: $line"
	fi
done

echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
