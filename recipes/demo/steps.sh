# Sourced by the demo recipes (copy_tune.sh, preference.sh), after they set OUT.
step() {  # step NAME COMMAND...: run COMMAND unless NAME finished before
  local name="$1"; shift
  if [[ -e "$OUT/.done-$name" ]]; then echo "== $name: done before, skipped"; return; fi
  echo "== $name"; local started=$SECONDS
  "$@"
  touch "$OUT/.done-$name"; echo "== $name: $((SECONDS - started)) s"
}
