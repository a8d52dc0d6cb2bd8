#!/usr/bin/env bash
# Shows that tests/docs/run.sh can fail: for each mutation, copy the user
# files into a scratch tree, break one thing, run the checks on the copy and
# require the named check to FAIL (and run.sh to exit non-zero).
# Prints "N passed, N failed"; exits 1 if a mutation went unnoticed.
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
TOP=$(cd "$HERE/../.." && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

passed=0
failed=0

# mutant NAME EXPECTED-FAIL-LINE-PREFIX COMMAND (run inside the copy)
mutant() {
	local name=$1 want=$2 cmd=$3 tree="$WORK/tree" out
	rm -rf "$tree"
	mkdir -p "$tree/rc.d" "$tree/sys"
	cp -p "$TOP/rc.d/kqemu" "$tree/rc.d/kqemu"
	cp "$TOP/kqemu.4" "$TOP/devfs.rules.sample" "$TOP/README.md" "$tree/"
	(cd "$tree" && eval "$cmd")
	if out=$(DOCS_TOP="$tree" bash "$HERE/run.sh" 2>&1); then
		failed=$((failed + 1)); echo "FAIL  mutant '$name' went unnoticed (run.sh passed)"
	elif grep -qF -- "FAIL  $want" <<<"$out"; then
		passed=$((passed + 1)); echo "PASS  mutant '$name' caught by: $want"
	else
		failed=$((failed + 1)); echo "FAIL  mutant '$name': no FAIL line starting '$want'"
		grep '^FAIL' <<<"$out" | sed 's/^/      /'
	fi
}

mutant "kldload without -n" "rc.d start: module already loaded is success" \
	"sed -i 's/kldload -n kqemu/kldload kqemu/' rc.d/kqemu"
mutant "stop does not unload" "rc.d stop: runs kldunload kqemu" \
	"sed -i 's/kldunload kqemu 2>&1/true/' rc.d/kqemu"
mutant "EBUSY not explained" "rc.d stop: EBUSY says QEMU" \
	"sed -i 's/kqemu is in use/kqemu: unload failed/' rc.d/kqemu"
mutant "status always succeeds" "rc.d status: not loaded fails" \
	"sed -i '/echo \"kqemu is not loaded.\"/{n;s/return 1/return 0/}' rc.d/kqemu"
mutant "default kqemu_enable YES" "rc.d start: kqemu_enable defaults to NO" \
	"sed -i 's/kqemu_enable:=\"NO\"/kqemu_enable:=\"YES\"/' rc.d/kqemu"
mutant "shell syntax error" "rc.d/kqemu: sh -n" \
	"sed -i 's/^kqemu_start()\$/kqemu_start() {(/' rc.d/kqemu"
mutant "ENOSPC dropped from kqemu.4" "kqemu.4: names all" \
	"sed -i 's/ENOSPC/ENOBUFS/g' kqemu.4"
mutant "EBUSY listed under the wrong call" "kqemu.4 ERRORS: KQEMU_EXEC" \
	"sed -i '/^\\.Ss KQEMU_EXEC\$/,/^\\.Ss /s/Er EBUSY/Er EAGAIN/' kqemu.4"
mutant "mandoc warning" "kqemu.4: mandoc -Tlint" \
	"sed -i 's/^\\.Sh AUTHORS\$/.Sh AUTHORS\\n.Pp/' kqemu.4"
mutant "undocumented sysctl in the shim" "kqemu.4: documents all hw.kqemu sysctls" \
	"echo 'SYSCTL_UINT(_hw_kqemu, OID_AUTO, max_wired_pages, CTLFLAG_RW, &cap, 0, \"\");' >sys/shim.c"
mutant "devfs recipe drifts" "devfs.rules recipe" \
	"sed -i \"s/mode 0660 group kqemu/mode 0666 group kqemu/\" devfs.rules.sample"

echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
