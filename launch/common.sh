# Helpers the launch scripts share; sourced, not run. Each script sets SCRIPT before sourcing.

die() { echo "$SCRIPT: $*" >&2; exit 2; }

quote() {  # Shell-quotes its arguments, readably ('...' only where needed), joined by spaces.
  local out=() a
  for a; do
    if [[ $a =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then out+=("$a"); else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}
